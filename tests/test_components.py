"""Component loader: discovery, overrides, manifests, importing integrations."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import voluptuous as vol

from driver_core.components import (
    ComponentError,
    Manifest,
    builtin_components_dir,
    discover_components,
    import_integration,
    integration_schema,
    integration_schemas,
)
from driver_core.config import ensure_config_dir, load_configuration

REPO = Path(__file__).resolve().parent.parent
FAKE_DOMAINS = ("fake_mqtt", "fake_family", "fake_broken", "fake_noflow", "fake_badschema")


@pytest.fixture(autouse=True)
def forget_fake_modules() -> Iterator[None]:
    """Fake integrations must not outlive their test (other tests import real ones)."""
    yield
    for name in list(sys.modules):
        if any(name.startswith(f"custom_components.{d}") for d in FAKE_DOMAINS):
            del sys.modules[name]


def component(
    base: Path, domain: str, manifest: str | None, files: dict[str, str] | None = None
) -> Path:
    folder = base / domain
    folder.mkdir(parents=True)
    if manifest is not None:
        (folder / "manifest.yaml").write_text(textwrap.dedent(manifest).lstrip("\n"))
    for name, text in (files or {}).items():
        (folder / name).write_text(textwrap.dedent(text).lstrip("\n"))
    return folder


def integration_manifest(domain: str, version: str = "1.0.0") -> str:
    return f"""
        domain: {domain}
        name: Fake MQTT
        version: "{version}"
        type: integration
        requirements:
          - aiomqtt>=2.3
    """


INTEGRATION_INIT = """
    from .config_flow import SETTINGS_SCHEMA
    from . import helpers

    ORIGIN = helpers.ORIGIN
"""
CONFIG_FLOW = """
    import voluptuous as vol

    SETTINGS_SCHEMA = vol.Schema({vol.Optional("qos", default=0): vol.In([0, 1, 2])})
"""


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    builtin = tmp_path / "repo" / "custom_components"
    user = tmp_path / "config" / "custom_components"
    component(
        builtin,
        "fake_mqtt",
        integration_manifest("fake_mqtt"),
        {
            "__init__.py": INTEGRATION_INIT,
            "config_flow.py": CONFIG_FLOW,
            "helpers.py": "ORIGIN = 'builtin'\n",
        },
    )
    component(
        builtin,
        "fake_family",
        """
        domain: fake_family
        name: Fake Transmitter
        version: "2024.1"
        type: device_family
        hw_types: [14, 16]
        """,
    )
    # A Home Assistant integration (manifest.json) and a cache folder: not ours, skipped.
    component(builtin, "coap_driver", None, {"manifest.json": '{"domain": "coap_driver"}'})
    (builtin / "__pycache__").mkdir()
    (builtin / "README.md").write_text("not a folder\n")
    return builtin, user


def test_builtin_dir_is_repo_custom_components() -> None:
    assert builtin_components_dir() == REPO / "custom_components"


def test_discover(dirs: tuple[Path, Path]) -> None:
    builtin, user = dirs  # user dir does not exist: skipped
    found = discover_components([builtin, user])
    assert found == {
        "fake_family": Manifest(
            domain="fake_family",
            name="Fake Transmitter",
            version="2024.1",
            type="device_family",
            requirements=[],
            path=builtin / "fake_family",
            extra={"hw_types": [14, 16]},
        ),
        "fake_mqtt": Manifest(
            domain="fake_mqtt",
            name="Fake MQTT",
            version="1.0.0",
            type="integration",
            requirements=["aiomqtt>=2.3"],
            path=builtin / "fake_mqtt",
        ),
    }
    assert type(found["fake_family"].extra["hw_types"]) is list


def test_import_integration_and_schema(dirs: tuple[Path, Path]) -> None:
    builtin, _ = dirs
    manifest = discover_components([builtin])["fake_mqtt"]
    module = import_integration(manifest)
    assert module.__name__ == "custom_components.fake_mqtt"
    assert module.ORIGIN == "builtin"
    assert sys.modules["custom_components.fake_mqtt"] is module
    assert import_integration(manifest) is module  # cached

    schema = integration_schema(module)
    assert schema is sys.modules["custom_components.fake_mqtt.config_flow"].SETTINGS_SCHEMA
    assert schema({}) == {"qos": 0}


def test_user_component_overrides_builtin(dirs: tuple[Path, Path]) -> None:
    builtin, user = dirs
    builtin_module = import_integration(discover_components([builtin])["fake_mqtt"])
    assert builtin_module.ORIGIN == "builtin"

    component(
        user,
        "fake_mqtt",
        integration_manifest("fake_mqtt", version="9.9.9"),
        {
            "__init__.py": INTEGRATION_INIT,
            "config_flow.py": CONFIG_FLOW.replace("[0, 1, 2]", "[0, 1]"),
            "helpers.py": "ORIGIN = 'user'\n",
        },
    )
    found = discover_components([builtin, user])
    assert found["fake_mqtt"].version == "9.9.9"
    assert found["fake_mqtt"].path == user / "fake_mqtt"
    assert found["fake_family"].path == builtin / "fake_family"

    module = import_integration(found["fake_mqtt"])
    assert module is not builtin_module
    assert module.ORIGIN == "user"
    assert sys.modules["custom_components.fake_mqtt.helpers"].ORIGIN == "user"
    assert integration_schema(module)({"qos": 1}) == {"qos": 1}
    with pytest.raises(vol.Invalid):
        integration_schema(module)({"qos": 2})


def test_integration_schemas_feed_load_configuration(
    dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    builtin, _ = dirs
    schemas = integration_schemas(discover_components([builtin]))
    assert list(schemas) == ["fake_mqtt"]  # device families have no settings schema

    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "configuration.yaml").write_text("fake_mqtt:\n  qos: 2\n")
    config = load_configuration(config_dir, schemas)
    assert config.integrations == {"fake_mqtt": {"qos": 2}}
    (config_dir / "configuration.yaml").write_text("fake_mqtt:\n  qos: 7\n")
    with pytest.raises(Exception) as info:
        load_configuration(config_dir, schemas)
    assert str(info.value) == (
        f"{config_dir}/configuration.yaml:2: fake_mqtt.qos: value must be one of [0, 1, 2]"
    )


BROKEN_MANIFESTS = [
    pytest.param(
        "domain: fake_broken\nname: [unclosed\n",
        "3: invalid YAML: expected ',' or ']', but got '<stream end>'",
        id="yaml-syntax",
    ),
    pytest.param(
        "domain: fake_broken\nname: Broken\nversion: '1'\n",
        "1: type: required key is missing",
        id="missing-key",
    ),
    pytest.param(
        "domain: fake_broken\nname: Broken\nversion: 1.10\ntype: integration\n",
        '3: version: expected a string; quote it: version: "1.1"',
        id="unquoted-version",
    ),
    pytest.param(
        "domain: fake_broken\nname: Broken\nversion: '1'\ntype: plugin\n",
        "4: type: expected one of: device_family, integration",
        id="bad-type",
    ),
    pytest.param(
        "domain: fake_broken\nname: ''\nversion: '1'\ntype: integration\n",
        "2: name: expected a non-empty string",
        id="empty-name",
    ),
    pytest.param(
        "domain: fake_broken\nname: B\nversion: '1'\ntype: integration\nrequirements: aiomqtt\n",
        "5: requirements: expected a list",
        id="requirements-not-list",
    ),
    pytest.param(
        "domain: fake_broken\nname: B\nversion: '1'\ntype: integration\nrequirements:\n  - 3\n",
        "6: requirements[0]: expected a requirement string",
        id="requirement-not-string",
    ),
    pytest.param(
        "domain: other_name\nname: B\nversion: '1'\ntype: integration\n",
        "1: domain: must equal the folder name 'fake_broken'",
        id="domain-mismatch",
    ),
    pytest.param(
        "domain: Fake-Broken\nname: B\nversion: '1'\ntype: integration\n",
        "1: domain: expected lower-case letters, digits and '_', starting with a letter",
        id="domain-syntax",
    ),
    pytest.param("- a list\n", "1: expected a mapping (domain:, name: ...)", id="not-a-mapping"),
    pytest.param(
        "domain: fake_broken\nname: !secret x\n",
        "2: !secret x: secrets are not allowed in this file",
        id="secret-in-manifest",
    ),
]


@pytest.mark.parametrize(("text", "expected"), BROKEN_MANIFESTS)
def test_broken_manifest(dirs: tuple[Path, Path], text: str, expected: str) -> None:
    builtin, _ = dirs
    folder = component(builtin, "fake_broken", text)
    with pytest.raises(ComponentError) as info:
        discover_components([builtin])
    assert str(info.value) == f"{folder}/manifest.yaml:{expected}"


def test_import_failure_is_reported_and_forgotten(tmp_path: Path) -> None:
    folder = component(
        tmp_path,
        "fake_broken",
        integration_manifest("fake_broken"),
        {"__init__.py": "import not_installed_package_xyz\n"},
    )
    manifest = discover_components([tmp_path])["fake_broken"]
    with pytest.raises(ComponentError) as info:
        import_integration(manifest)
    assert str(info.value) == (
        f"{folder}/__init__.py: import failed: "
        "ModuleNotFoundError: No module named 'not_installed_package_xyz'"
    )
    assert "custom_components.fake_broken" not in sys.modules


def test_integration_without_package(tmp_path: Path) -> None:
    folder = component(tmp_path, "fake_broken", integration_manifest("fake_broken"))
    with pytest.raises(ComponentError) as info:
        import_integration(discover_components([tmp_path])["fake_broken"])
    assert str(info.value) == (
        f"{folder}/__init__.py: missing (a component must be a Python package)"
    )


def test_integration_without_config_flow(tmp_path: Path) -> None:
    folder = component(
        tmp_path, "fake_noflow", integration_manifest("fake_noflow"), {"__init__.py": ""}
    )
    module = import_integration(discover_components([tmp_path])["fake_noflow"])
    with pytest.raises(ComponentError) as info:
        integration_schema(module)
    assert str(info.value) == f"{folder}/config_flow.py: missing (it must define SETTINGS_SCHEMA)"


def test_config_flow_with_broken_import(tmp_path: Path) -> None:
    folder = component(
        tmp_path,
        "fake_noflow",
        integration_manifest("fake_noflow"),
        {"__init__.py": "", "config_flow.py": "from .missing_helper import X\n"},
    )
    module = import_integration(discover_components([tmp_path])["fake_noflow"])
    with pytest.raises(ComponentError) as info:
        integration_schema(module)
    assert str(info.value) == (
        f"{folder}/config_flow.py: import failed: "
        "No module named 'custom_components.fake_noflow.missing_helper'"
    )


def test_settings_schema_must_be_a_schema(tmp_path: Path) -> None:
    folder = component(
        tmp_path,
        "fake_badschema",
        integration_manifest("fake_badschema"),
        {"__init__.py": "", "config_flow.py": "SETTINGS_SCHEMA = {'qos': int}\n"},
    )
    module = import_integration(discover_components([tmp_path])["fake_badschema"])
    with pytest.raises(ComponentError) as info:
        integration_schema(module)
    assert str(info.value) == (
        f"{folder}/config_flow.py: SETTINGS_SCHEMA must be a voluptuous Schema"
    )


def test_shipped_components_load_and_default_configuration_validates(tmp_path: Path) -> None:
    """The repo's own components have valid manifests and the first-run file loads with them."""
    found = discover_components([builtin_components_dir()])
    assert "coap_driver" not in found  # the Home Assistant integration (manifest.json)
    schemas = integration_schemas(found)
    assert "mqtt" in schemas
    ensure_config_dir(tmp_path)
    config = load_configuration(tmp_path, schemas)
    assert set(config.integrations) == {"mqtt", "callbacks"}
