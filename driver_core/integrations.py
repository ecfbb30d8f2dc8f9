"""Running integrations: their settings (configuration.yaml, then saved overrides) and live reloads.

Like Home Assistant config entries: a setting saved from the web panel, the
REST API or the CLI is stored in the database and wins over the YAML section.
Every instance polls the settings' change time, so a save applies within
seconds without a restart, on every driver instance sharing the database.

Fields an integration's schema marks secret (``form_field(..., secret=True)``:
a broker password, an HMAC key) are stored encrypted with the driver's secret
key, as ``{"fernet": "<token>"}``, so a copy of the database alone does not
reveal them. A plain string in a secret field is a row written by an older
release: it is accepted, and encrypted in place when the driver starts.
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

from .integration_base import SettingsError, schema_errors, secret_fields
from .storage.health import log_retry
from .storage.models import IntegrationSettings
from .storage.secretbox import SecretBox, SecretBoxError
from .tasks import cancel_and_wait
from .timefmt import utcnow

if TYPE_CHECKING:
    from .driver import Driver

_LOGGER = logging.getLogger(__name__)
POLL_SECONDS = 2.0
SEALED = "fernet"  # key of a stored secret: {"fernet": "<Fernet token>"}


def seal(data: Mapping[str, Any], fields: frozenset[str], box: SecretBox) -> dict[str, Any]:
    """``data`` with every non-empty text in a secret field encrypted, as it is stored.

    An empty value stays as it is: it only says that no secret is set.
    """
    stored = dict(data)
    for name in fields & stored.keys():
        value = stored[name]
        if isinstance(value, str) and value:
            stored[name] = {SEALED: box.encrypt(value.encode("utf-8")).decode("ascii")}
    return stored


def plaintext_secrets(data: Mapping[str, Any], fields: frozenset[str]) -> list[str]:
    """Secret fields of a stored row still in clear (written before secrets were encrypted)."""
    return sorted(name for name in fields & data.keys() if isinstance(data[name], str) and data[name])


def unseal(
    data: Mapping[str, Any], fields: frozenset[str], box: SecretBox, domain: str
) -> dict[str, Any]:
    """A stored row with its secrets decrypted; a plain string (older release) is taken as is.

    A secret that does not decrypt (the key file was replaced) is left out, so the
    YAML value or the default applies, and the error log says to save it again.
    """
    settings = dict(data)
    for name in fields & settings.keys():
        value = settings[name]
        if not isinstance(value, dict):
            continue
        try:
            token = value[SEALED]
            if not isinstance(token, str):
                raise SecretBoxError("the stored value is not a Fernet token")
            settings[name] = box.decrypt(token.encode("ascii")).decode("utf-8")
        except (KeyError, UnicodeError, SecretBoxError) as exc:
            del settings[name]
            _LOGGER.error(
                "The saved %s.%s cannot be decrypted (%s); it is ignored until saved again",
                domain, name, exc if isinstance(exc, SecretBoxError) else "malformed value",
            )
    return settings


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

    def secret_fields(self, domain: str) -> frozenset[str]:
        return secret_fields(self.schema(domain))

    @property
    def _box(self) -> SecretBox:
        box = self._driver.box
        if box is None:
            raise RuntimeError("the secret key is not loaded; integration settings need it")
        return box

    async def _saved(self) -> dict[str, dict]:
        """Saved settings by domain, secrets decrypted (rows of unloaded integrations left out)."""
        async with self._driver.db.session() as session:
            rows = (await session.execute(select(IntegrationSettings))).scalars().all()
        return {
            row.domain: unseal(row.data, self.secret_fields(row.domain), self._box, row.domain)
            for row in rows
            if row.domain in self.modules
        }

    async def seal_plaintext(self) -> list[str]:
        """Encrypt secrets an older release stored in clear; ``domain.field`` of each one.

        Runs at start, in one transaction with the rows locked (PostgreSQL), so two
        instances starting together or a save at the same moment cannot lose a change.
        ``updated_at`` is kept: the settings themselves do not change.
        """
        sealed = []
        async with self._driver.db.session() as session, session.begin():
            query = select(IntegrationSettings).with_for_update()
            for row in (await session.execute(query)).scalars().all():
                if row.domain not in self.modules:
                    continue
                fields = self.secret_fields(row.domain)
                plain = plaintext_secrets(row.data, fields)
                if plain:
                    row.data = seal(row.data, fields, self._box)
                    sealed += [f"{row.domain}.{name}" for name in plain]
        if sealed:
            _LOGGER.info(
                "Encrypted saved secrets stored in clear by an older release: %s", ", ".join(sealed)
            )
        return sealed

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
        await self.seal_plaintext()
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
        stored = seal({**saved, **changes}, self.secret_fields(domain), self._box)
        async with self._driver.db.session() as session, session.begin():
            row = await session.get(IntegrationSettings, domain)
            if row is None:
                session.add(IntegrationSettings(domain=domain, data=stored, updated_at=utcnow()))
            else:
                row.data = stored
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
            except Exception as exc:
                log_retry(_LOGGER, "Applying saved integration settings", exc)
