"""Running integrations: their settings (configuration.yaml, then saved overrides) and live reloads.

Like Home Assistant config entries: a setting saved from the web panel, the
REST API or the CLI is stored in the database and wins over the YAML section.
Every instance polls the settings' change time, so a save applies within
seconds without a restart, on every driver instance sharing the database.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import voluptuous as vol
from sqlalchemy import func, select

from .integration_base import SettingsError, schema_errors
from .storage.models import IntegrationSettings
from .tasks import cancel_and_wait
from .timefmt import utcnow

if TYPE_CHECKING:
    from .driver import Driver

_LOGGER = logging.getLogger(__name__)
POLL_SECONDS = 2.0


def dependency_order(modules: Mapping[str, ModuleType]) -> dict[str, ModuleType]:
    """Integrations ordered so each starts after the ones its manifest lists in `dependencies`."""
    from .components import read_manifest

    needs = {}
    for domain, module in modules.items():
        extra = read_manifest(Path(module.__file__).parent).extra
        needs[domain] = [d for d in extra.get("dependencies") or [] if d in modules]
    ordered: dict[str, ModuleType] = {}

    def visit(domain: str, path: tuple[str, ...]) -> None:
        if domain in ordered:
            return
        if domain in path:
            raise SettingsError({domain: f"circular dependencies: {' -> '.join((*path, domain))}"})
        for dependency in needs[domain]:
            visit(dependency, (*path, domain))
        ordered[domain] = modules[domain]

    for domain in sorted(modules):
        visit(domain, ())
    return ordered


class IntegrationManager:
    def __init__(self, driver: Driver, modules: Mapping[str, ModuleType], yaml_sections: Mapping[str, dict]):
        self._driver = driver
        self.modules = dependency_order(modules)
        self._yaml = dict(yaml_sections)
        self.running: dict[str, Any] = {}
        self._settings: dict[str, dict] = {}
        self._stamp: Any = None
        self._task: asyncio.Task[None] | None = None
        self._applying = asyncio.Lock()  # the watcher and an explicit apply never overlap

    def schema(self, domain: str) -> vol.Schema:
        return self.modules[domain].config_flow.SETTINGS_SCHEMA

    def settings(self, domain: str) -> dict:
        return dict(self._settings.get(domain, {}))

    async def _saved(self) -> dict[str, dict]:
        async with self._driver.db.session() as session:
            rows = (await session.execute(select(IntegrationSettings))).scalars().all()
        return {row.domain: row.data for row in rows}

    async def _effective(self) -> dict[str, dict]:
        saved = await self._saved()
        effective = {}
        for domain in self.modules:
            if domain not in self._yaml and domain not in saved:
                continue
            merged = {**self._yaml.get(domain, {}), **saved.get(domain, {})}
            try:
                effective[domain] = self.schema(domain)(merged)
            except vol.Invalid as exc:
                _LOGGER.error("Saved settings of %s are invalid, keeping YAML ones: %s", domain, exc)
                effective[domain] = self.schema(domain)(self._yaml.get(domain, {}))
        return effective

    async def start(self) -> None:
        self._stamp = await self._latest_change()
        self._settings = await self._effective()
        for domain, settings in self._settings.items():
            self.running[domain] = await self.modules[domain].async_setup(self._driver, settings)
            _LOGGER.info("Integration %s set up", domain)
        self._task = asyncio.create_task(self._watch(), name="integration-settings-watch")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        for domain, handle in reversed(list(self.running.items())):
            try:
                await handle.async_unload()
            except Exception:
                _LOGGER.exception("Unloading %s failed", domain)
        self.running.clear()

    async def save(self, domain: str, changes: dict) -> dict:
        """Validate and store settings for `domain`; the watcher applies them."""
        if domain not in self.modules:
            raise SettingsError({"domain": f"unknown integration {domain!r}"})
        saved = (await self._saved()).get(domain, {})
        merged = {**self._yaml.get(domain, {}), **saved, **changes}
        try:
            validated = self.schema(domain)(merged)
        except vol.Invalid as exc:
            raise SettingsError(schema_errors(exc)) from None
        check = getattr(self.modules[domain].config_flow, "async_validate", None)
        if check is not None:
            errors = await check(validated)
            if errors:
                raise SettingsError(errors)
        async with self._driver.db.session() as session, session.begin():
            row = await session.get(IntegrationSettings, domain)
            if row is None:
                session.add(IntegrationSettings(domain=domain, data={**saved, **changes}, updated_at=utcnow()))
            else:
                row.data = {**saved, **changes}
                row.updated_at = utcnow()
        return validated

    async def apply_saved(self) -> None:
        """Reload every integration whose effective settings changed."""
        async with self._applying:
            await self._apply_saved()

    async def _apply_saved(self) -> None:
        effective = await self._effective()
        for domain, settings in effective.items():
            if settings == self._settings.get(domain):
                continue
            handle = self.running.get(domain)
            if handle is None:
                self.running[domain] = await self.modules[domain].async_setup(self._driver, settings)
            else:
                await handle.async_reload(settings)
            self._settings[domain] = settings
            _LOGGER.info("Integration %s reloaded with new settings", domain)

    async def _latest_change(self) -> Any:
        async with self._driver.db.session() as session:
            return (await session.execute(select(func.max(IntegrationSettings.updated_at)))).scalar()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(POLL_SECONDS)
            try:
                stamp = await self._latest_change()
                if stamp != self._stamp:
                    self._stamp = stamp
                    await self.apply_saved()
            except Exception:
                _LOGGER.exception("Applying saved integration settings failed")
