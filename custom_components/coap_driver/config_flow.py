"""Config flow: the driver's URL and an API token, checked with one authenticated request."""

from __future__ import annotations

from typing import Any

import voluptuous as vol
from homeassistant import config_entries
from homeassistant.data_entry_flow import FlowResult
from homeassistant.helpers.aiohttp_client import async_get_clientsession

from .api import DriverApi, DriverApiError
from .const import (
    CONF_STATUS_TOPIC,
    CONF_TOKEN,
    CONF_URL,
    DEFAULT_STATUS_TOPIC,
    DEFAULT_URL,
    DOMAIN,
)


def _schema(defaults: dict[str, Any]) -> vol.Schema:
    return vol.Schema(
        {
            vol.Required(CONF_URL, default=defaults.get(CONF_URL, DEFAULT_URL)): str,
            vol.Required(CONF_TOKEN, default=defaults.get(CONF_TOKEN, "")): str,
            vol.Required(
                CONF_STATUS_TOPIC, default=defaults.get(CONF_STATUS_TOPIC, DEFAULT_STATUS_TOPIC)
            ): str,
        }
    )


def _status_topic_problem(topic: str) -> str | None:
    if not topic or "#" in topic[:-1] or any(
        "+" in level and level != "+" for level in topic.split("/")
    ):
        return "invalid_topic"
    return None


class CoapDriverConfigFlow(config_entries.ConfigFlow, domain=DOMAIN):
    """Ask for the driver URL and token; refuse them when the driver does not accept them."""

    VERSION = 1

    async def async_step_user(self, user_input: dict[str, Any] | None = None) -> FlowResult:
        errors: dict[str, str] = {}
        placeholders = {"detail": ""}
        if user_input is not None:
            url = user_input[CONF_URL].strip().rstrip("/")
            token = user_input[CONF_TOKEN].strip()
            topic = user_input[CONF_STATUS_TOPIC].strip()
            if not url.startswith(("http://", "https://")):
                errors[CONF_URL] = "invalid_url"
            elif _status_topic_problem(topic):
                errors[CONF_STATUS_TOPIC] = "invalid_topic"
            else:
                api = DriverApi(async_get_clientsession(self.hass), url, token)
                try:
                    await api.check()
                except DriverApiError as exc:
                    placeholders["detail"] = str(exc)
                    errors["base"] = "invalid_auth" if exc.status == 401 else "cannot_connect"
                else:
                    await self.async_set_unique_id(url)
                    self._abort_if_unique_id_configured()
                    return self.async_create_entry(
                        title=url,
                        data={CONF_URL: url, CONF_TOKEN: token, CONF_STATUS_TOPIC: topic},
                    )
        return self.async_show_form(
            step_id="user",
            data_schema=_schema(user_input or {}),
            errors=errors,
            description_placeholders=placeholders,
        )
