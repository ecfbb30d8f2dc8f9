"""Integrations start after the integrations they depend on."""

from __future__ import annotations

import types
from pathlib import Path

import pytest

from driver_core.integration_base import SettingsError
from driver_core.integrations import dependency_order


def fake_integration(root: Path, domain: str, dependencies: list[str]) -> types.ModuleType:
    folder = root / domain
    folder.mkdir()
    (folder / "manifest.yaml").write_text(
        f"domain: {domain}\nname: {domain}\nversion: '1.0'\ntype: integration\nrequirements: []\n"
        f"dependencies: {dependencies}\n",
        encoding="utf-8",
    )
    (folder / "__init__.py").write_text("", encoding="utf-8")
    module = types.ModuleType(domain)
    module.__file__ = str(folder / "__init__.py")
    return module


def test_dependencies_start_first(tmp_path: Path):
    modules = {
        "alpha": fake_integration(tmp_path, "alpha", ["zeta"]),
        "beta": fake_integration(tmp_path, "beta", []),
        "zeta": fake_integration(tmp_path, "zeta", ["beta"]),
    }
    assert list(dependency_order(modules)) == ["beta", "zeta", "alpha"]


def test_circular_dependencies_are_refused(tmp_path: Path):
    modules = {
        "alpha": fake_integration(tmp_path, "alpha", ["beta"]),
        "beta": fake_integration(tmp_path, "beta", ["alpha"]),
    }
    with pytest.raises(SettingsError) as refused:
        dependency_order(modules)
    assert str(refused.value) == "alpha: circular dependencies: alpha -> beta -> alpha"
