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

## The whole test suite, as CI runs it. Uses Mosquitto on 127.0.0.1:1883 and PostgreSQL on
## 127.0.0.1:5432, or starts private ones for the run (scripts/test_services.py).
test: install lint
	$(VENV)/bin/python scripts/test_services.py $(VENV)/bin/pytest -p no:cacheprovider
