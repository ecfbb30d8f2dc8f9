"""Finding and importing components (device families and integrations).

Modelled on Home Assistant's loader: every component is a folder
`<domain>/` with a `manifest.yaml`; the built-in folders ship in the repo's
`custom_components/`, and a user's `<config>/custom_components/` may add new
ones or replace a built-in one of the same domain.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import voluptuous as vol

from .config import invalid_details
from .yaml_loader import YamlError, format_location, load_yaml, to_plain

MANIFEST_FILE = "manifest.yaml"
PACKAGE = "custom_components"
COMPONENT_TYPES = ("device_family", "integration")

ComponentType = Literal["device_family", "integration"]


class ComponentError(Exception):
    """A component cannot be used; `str()` is one line naming the file (and key)."""


@dataclass(frozen=True)
class Manifest:
    domain: str
    name: str
    version: str
    type: ComponentType
    requirements: list[str]
    path: Path
    extra: dict[str, Any] = field(default_factory=dict)  # keys we do not interpret


def _text(what: str) -> Any:
    def validate(value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise vol.Invalid(f"expected {what}")
        return value

    return validate


def _version(value: Any) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise vol.Invalid(f'expected a string; quote it: version: "{value}"')
    return _text("a version string")(value)


def _domain(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", value):
        raise vol.Invalid("expected lower-case letters, digits and '_', starting with a letter")
    return value


MANIFEST_SCHEMA = vol.Schema(
    {
        vol.Required("domain"): _domain,
        vol.Required("name"): _text("a non-empty string"),
        vol.Required("version"): _version,
        vol.Required("type"): vol.In(
            COMPONENT_TYPES, msg=f"expected one of: {', '.join(COMPONENT_TYPES)}"
        ),
        vol.Optional("requirements", default=list): vol.All(
            lambda v: [] if v is None else v, [_text("a requirement string")]
        ),
    },
    extra=vol.ALLOW_EXTRA,
)


def builtin_components_dir() -> Path:
    """The repo's `custom_components/` (next to the driver_core package)."""
    return Path(__file__).resolve().parent.parent / PACKAGE


def read_manifest(folder: Path) -> Manifest:
    """Parse and validate `<folder>/manifest.yaml`; the domain must equal the folder name."""
    manifest_file = folder / MANIFEST_FILE
    try:
        raw = load_yaml(manifest_file)
    except YamlError as err:
        raise ComponentError(str(err)) from err
    if not isinstance(raw, dict):
        raise ComponentError(
            format_location(str(manifest_file), 1, "expected a mapping (domain:, name: ...)")
        )
    try:
        data = MANIFEST_SCHEMA(raw)
    except vol.Invalid as err:
        file, line, key_path, problem = invalid_details(err, raw, MANIFEST_SCHEMA)
        raise ComponentError(format_location(file, line, key_path, problem)) from None
    if data["domain"] != folder.name:
        file, line = str(manifest_file), raw.key_lines["domain"][1]
        raise ComponentError(
            format_location(file, line, "domain", f"must equal the folder name '{folder.name}'")
        )
    known = {"domain", "name", "version", "type", "requirements"}
    return Manifest(
        domain=data["domain"],
        name=data["name"],
        version=data["version"],
        type=data["type"],
        requirements=list(data["requirements"]),
        path=folder.resolve(),
        extra={key: to_plain(value) for key, value in data.items() if key not in known},
    )


def discover_components(search_dirs: list[Path]) -> dict[str, Manifest]:
    """Manifests of all components found, by domain; later dirs override earlier ones.

    Folders without manifest.yaml (such as the Home Assistant integration
    with its manifest.json, or __pycache__) are skipped; missing search dirs
    are skipped too.
    """
    found: dict[str, Manifest] = {}
    for search_dir in search_dirs:
        search_dir = Path(search_dir)
        if not search_dir.is_dir():
            continue
        for folder in sorted(search_dir.iterdir()):
            if folder.is_dir() and (folder / MANIFEST_FILE).is_file():
                manifest = read_manifest(folder)
                found[manifest.domain] = manifest
    return dict(sorted(found.items()))


def _forget(module_name: str) -> None:
    for name in [n for n in sys.modules if n == module_name or n.startswith(module_name + ".")]:
        del sys.modules[name]


def import_integration(manifest: Manifest) -> types.ModuleType:
    """Import `<path>/__init__.py` as module `custom_components.<domain>`.

    The module is a package, so relative imports inside it work. It is cached
    in sys.modules; a cached module from another folder (an overridden
    domain) is replaced.
    """
    module_name = f"{PACKAGE}.{manifest.domain}"
    init_file = manifest.path / "__init__.py"
    cached = sys.modules.get(module_name)
    if cached is not None:
        cached_file = getattr(cached, "__file__", None)
        if cached_file and Path(cached_file).resolve() == init_file.resolve():
            return cached
        _forget(module_name)
    if not init_file.is_file():
        raise ComponentError(f"{init_file}: missing (a component must be a Python package)")
    spec = importlib.util.spec_from_file_location(
        module_name, init_file, submodule_search_locations=[str(manifest.path)]
    )
    if spec is None or spec.loader is None:
        raise ComponentError(f"{init_file}: cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        _forget(module_name)
        raise ComponentError(f"{init_file}: import failed: {type(err).__name__}: {err}") from err
    return module


def integration_schema(module: types.ModuleType) -> vol.Schema:
    """The integration's settings schema: `<module>.config_flow.SETTINGS_SCHEMA`."""
    flow_name = f"{module.__name__}.config_flow"
    flow_file = Path(module.__file__ or "").parent / "config_flow.py"
    try:
        flow = importlib.import_module(flow_name)
    except ModuleNotFoundError as err:
        if err.name != flow_name:
            raise ComponentError(f"{flow_file}: import failed: {err}") from err
        raise ComponentError(f"{flow_file}: missing (it must define SETTINGS_SCHEMA)") from err
    except Exception as err:
        raise ComponentError(f"{flow_file}: import failed: {type(err).__name__}: {err}") from err
    schema = getattr(flow, "SETTINGS_SCHEMA", None)
    if not isinstance(schema, vol.Schema):
        raise ComponentError(f"{flow_file}: SETTINGS_SCHEMA must be a voluptuous Schema")
    return schema


def integration_schemas(manifests: dict[str, Manifest]) -> dict[str, vol.Schema]:
    """Import every integration and collect the schemas `load_configuration` needs."""
    return {
        domain: integration_schema(import_integration(manifest))
        for domain, manifest in manifests.items()
        if manifest.type == "integration"
    }
