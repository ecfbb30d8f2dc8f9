# Two entry points for a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PYTHON ?= python3

.PHONY: install demo run test lint

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

## Start the driver with its embedded defaults plus three simulated devices; print their uplinks.
demo: install
	$(VENV)/bin/coap-driver --config config demo

## Run the driver alone (configuration in ./config).
run: install
	$(VENV)/bin/coap-driver --config config run

lint: install
	$(VENV)/bin/ruff check .

## The whole test suite, as CI runs it.
test: install lint
	$(VENV)/bin/pytest -p no:cacheprovider
