"""REST API over real HTTP against a running driver: tokens, devices, downlinks, errors, docs page."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin

import cbor2
import pytest
from sqlalchemy import update

from driver_core.storage.models import ApiToken
from driver_core.tokens import (
    TOKEN_PREFIX,
    TokenError,
    create_token,
    hash_token,
    list_tokens,
    revoke_token,
    verify_token,
)
from tests.conftest import make_device, session_for

if TYPE_CHECKING:
    from tests.api_fixtures import ApiClient


RX_PRESSURE = cbor2.dumps({1: 87, 3: -71, 14: 2310})
ZULU = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
UNAUTHORIZED_MISSING = {
    "error": "unauthorized",
    "detail": "a bearer token is required: send 'Authorization: Bearer <token>'",
}
UNAUTHORIZED_INVALID = {"error": "unauthorized", "detail": "the bearer token is invalid or revoked"}


def parse_time(text: str) -> datetime:
    assert ZULU.fullmatch(text), text
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def pop_times(body: dict[str, Any], *names: str) -> dict[str, datetime | None]:
    """Remove the timestamp fields (checked for format) so the rest compares exactly."""
    values = {name: body.pop(name) for name in names}
    return {name: None if text is None else parse_time(text) for name, text in values.items()}


DOWNLINK_TIMES = ("inserted_at", "dispatched_at", "acknowledged_at", "canceled_at", "unacknowledged_at")


def downlink(command_id: str, serial: str, command: str, code: int, parameter: Any, **extra: Any):
    """Expected downlink JSON without its timestamps (see pop_times)."""
    body = {
        "command_id": command_id,
        "serial": serial,
        "command": command,
        "code": code,
        "parameter": parameter,
        "state": 0,
        "state_name": "Pending, waiting for the device to come online",
        "callback_url": None,
        "result": None,
    }
    body.update(extra)
    return body


async def enroll_via_api(api: ApiClient, serial: str, hw_type: int, index: int, **extra: Any):
    device = make_device(serial, hw_type, index)
    body = {
        "serial": serial,
        "hw_type": hw_type,
        "sender_id": device.sender_id.hex(),
        "master_secret": device.master_secret.hex(),
        "master_salt": device.master_salt.hex(),
        **extra,
    }
    reply = await api.call("POST", "/devices", json=body)
    assert reply.status == 201, reply.body
    return device, reply


def strip_downlink_id(body: dict[str, Any]) -> int:
    value = body.pop("downlink_id")
    assert 1 <= value <= 65535
    return value


# --- tokens ------------------------------------------------------------------------------------


async def test_tokens_are_shown_once_stored_hashed_and_revocable(running_driver):
    db = running_driver.db
    token = await create_token(db, "home-assistant")
    assert token.startswith(TOKEN_PREFIX) and len(token) == len(TOKEN_PREFIX) + 43
    [row] = await list_tokens(db)
    assert (row.name, row.token_hash, row.last_used_at) == (
        "home-assistant", hash_token(token), None,
    )
    assert token not in row.token_hash

    with pytest.raises(TokenError, match="a token named 'home-assistant' already exists"):
        await create_token(db, "home-assistant")
    with pytest.raises(TokenError, match="invalid token name ''"):
        await create_token(db, "")
    with pytest.raises(TokenError, match="invalid token name 'x' \\* 65|invalid token name"):
        await create_token(db, "x" * 65)

    used = await verify_token(db, token)
    assert used is not None and used.name == "home-assistant"
    first_use = used.last_used_at
    assert first_use is not None
    again = await verify_token(db, token)
    assert again.last_used_at == first_use  # at most one write a minute

    past = first_use - timedelta(minutes=2)
    async with db.session() as session, session.begin():
        await session.execute(update(ApiToken).values(last_used_at=past))
    refreshed = await verify_token(db, token)
    assert refreshed.last_used_at > past

    assert await verify_token(db, token + "x") is None
    assert await verify_token(db, "") is None
    assert await verify_token(db, "cdt_" + "a" * 300) is None
    assert await revoke_token(db, "home-assistant") is True
    assert await revoke_token(db, "home-assistant") is False
    assert await verify_token(db, token) is None
    assert await list_tokens(db) == []


# --- authentication ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/devices"),
        ("POST", "/devices"),
        ("GET", "/devices/A1"),
        ("DELETE", "/devices/A1"),
        ("GET", "/device-families"),
        ("POST", "/devices/A1/downlinks"),
        ("GET", "/devices/A1/downlinks"),
        ("GET", "/downlinks/x"),
        ("DELETE", "/downlinks/x"),
        ("GET", "/no-such-endpoint"),
    ],
)
async def test_every_endpoint_needs_a_token(api: ApiClient, method, path):
    missing = await api.call(method, path, token=None)
    assert (missing.status, missing.body) == (401, UNAUTHORIZED_MISSING)
    assert missing.headers["WWW-Authenticate"] == 'Bearer realm="coap-driver"'

    basic = await api.call(method, path, headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert (basic.status, basic.body) == (401, UNAUTHORIZED_MISSING)

    wrong = await api.call(method, path, token="cdt_wrong")
    assert (wrong.status, wrong.body) == (401, UNAUTHORIZED_INVALID)
    assert wrong.headers["WWW-Authenticate"] == 'Bearer realm="coap-driver", error="invalid_token"'


async def test_revoked_token_stops_working_at_once(api: ApiClient):
    assert (await api.call("GET", "/devices")).status == 200
    assert await revoke_token(api.driver.db, "tests") is True
    reply = await api.call("GET", "/devices")
    assert (reply.status, reply.body) == (401, UNAUTHORIZED_INVALID)


async def test_openapi_document_and_docs_page_are_public(api: ApiClient):
    document = await api.call("GET", "/openapi.json", token=None)
    assert document.status == 200
    assert document.body["openapi"] == "3.0.3"
    page = await api.call("GET", "/docs", token=None)
    assert page.status == 200
    assert page.headers["Content-Type"] == "text/html; charset=utf-8"


# --- devices -----------------------------------------------------------------------------------


async def test_enroll_show_list_and_delete_a_device(api: ApiClient):
    before = datetime.now(UTC)
    device, reply = await enroll_via_api(api, "A0000001", 17, 1, name="Pump house")
    body = reply.body
    times = pop_times(body, "enrolled_at")
    assert before - timedelta(milliseconds=1) <= times["enrolled_at"] <= datetime.now(UTC)
    assert body == {
        "serial": "A0000001",
        "name": "Pump house",
        "hw_type": 17,
        "model": "VIDI Pressure",
        "family": "vidi_transmitter",
        "firmware": None,
        "join_date": None,
        "last_seen": None,
        "sender_id": "a001",
        "tx_interval": 60,
        "last_uplink": None,
    }
    assert "master_secret" not in reply.body and "master_salt" not in reply.body

    await enroll_via_api(api, "B0000002", 24, 2)
    listed = await api.call("GET", "/devices")
    assert listed.status == 200
    for item in listed.body["items"]:
        pop_times(item, "enrolled_at")
    assert listed.body == {
        "items": [
            {
                "serial": "A0000001", "name": "Pump house", "hw_type": 17,
                "model": "VIDI Pressure", "family": "vidi_transmitter", "firmware": None,
                "join_date": None, "last_seen": None,
            },
            {
                "serial": "B0000002", "name": None, "hw_type": 24, "model": "VIDI Positioner",
                "family": "vidi_positioner", "firmware": None, "join_date": None,
                "last_seen": None,
            },
        ],
        "total": 2,
        "offset": 0,
        "limit": 100,
    }

    page = await api.call("GET", "/devices", params={"offset": "1", "limit": "1"})
    assert [d["serial"] for d in page.body["items"]] == ["B0000002"]
    assert (page.body["total"], page.body["offset"], page.body["limit"]) == (2, 1, 1)
    found = await api.call("GET", "/devices", params={"search": "pump"})
    assert [d["serial"] for d in found.body["items"]] == ["A0000001"]
    assert (found.body["total"], found.body["search"]) == (1, "pump")
    by_serial = await api.call("GET", "/devices", params={"search": "b00"})
    assert [d["serial"] for d in by_serial.body["items"]] == ["B0000002"]
    wildcard = await api.call("GET", "/devices", params={"search": "%"})
    assert wildcard.body["items"] == [] and wildcard.body["total"] == 0

    # The CoAP side has it cached after a JOIN; deleting drops it there too.
    session = session_for(api.driver, device)
    await session.join("2.1.0", 17)
    assert api.driver.credentials.cached(device.sender_id) is not None
    deleted = await api.call("DELETE", "/devices/A0000001")
    assert (deleted.status, deleted.body) == (204, None)
    assert api.driver.credentials.cached(device.sender_id) is None
    gone = await api.call("GET", "/devices/A0000001")
    assert (gone.status, gone.body) == (
        404, {"error": "not_found", "detail": "no device with serial 'A0000001'"},
    )
    again = await api.call("DELETE", "/devices/A0000001")
    assert (again.status, again.body) == (
        404, {"error": "not_found", "detail": "no device with serial 'A0000001'"},
    )


async def test_device_shows_its_last_uplink_and_never_its_secrets(api: ApiClient, enroll):
    device = make_device("C0000003", 17, 3)
    session = await enroll(device)
    await session.join("2.1.0", 17, reset_cause=1)
    await session.post("rx", RX_PRESSURE)

    reply = await api.call("GET", "/devices/C0000003")
    assert reply.status == 200
    body = reply.body
    times = pop_times(body, "enrolled_at", "join_date", "last_seen")
    received = parse_time(body["last_uplink"].pop("received_at"))
    assert received == times["last_seen"] and times["join_date"] <= times["last_seen"]
    assert body == {
        "serial": "C0000003",
        "name": None,
        "hw_type": 17,
        "model": "VIDI Pressure",
        "family": "vidi_transmitter",
        "firmware": "2.1.0",
        "sender_id": "a003",
        "tx_interval": 60,
        "last_uplink": {
            "message_type": "rx",
            "data": {"battery": 87, "rssi": -71, "pressure": 2.31},
        },
    }
    text = str(reply.body)
    assert device.master_secret.hex() not in text and device.master_salt.hex() not in text


@pytest.mark.parametrize(
    ("change", "field", "detail"),
    [
        ({"serial": "a-1"}, "serial", "serial: must be 1 to 16 characters, each A-Z or 0-9"),
        ({"serial": "A" * 17}, "serial", "serial: must be 1 to 16 characters, each A-Z or 0-9"),
        (
            {"hw_type": 99},
            "hw_type",
            "hw_type: must be one of the supported types: 14, 16, 17, 18, 23, 24, 28, 29, 31",
        ),
        (
            {"hw_type": "17"},
            "hw_type",
            "hw_type: must be one of the supported types: 14, 16, 17, 18, 23, 24, 28, 29, 31",
        ),
        (
            {"sender_id": "zz"},
            "sender_id",
            "sender_id: must be 1 to 7 bytes written as hex (2 to 14 hex digits)",
        ),
        (
            {"master_secret": "00" * 15},
            "master_secret",
            "master_secret: must be exactly 16 bytes written as hex (32 hex digits)",
        ),
        (
            {"master_salt": "0011"},
            "master_salt",
            "master_salt: must be empty or 8 bytes written as hex (16 hex digits)",
        ),
        ({"name": "x" * 101}, "name", "name: must be at most 100 printable characters"),
        ({"name": "bad\x00name"}, "name", "name: must be at most 100 printable characters"),
        (
            {"colour": "red"},
            "colour",
            "colour: unknown field (expected: hw_type, master_salt, master_secret, name, "
            "sender_id, serial)",
        ),
        ({"serial": None}, "serial", "serial: must be 1 to 16 characters, each A-Z or 0-9"),
    ],
)
async def test_enrollment_errors_name_the_field(api: ApiClient, change, field, detail):
    body = {
        "serial": "D0000004",
        "hw_type": 17,
        "sender_id": "a004",
        "master_secret": "00" * 16,
    }
    body.update(change)
    reply = await api.call("POST", "/devices", json=body)
    assert (reply.status, reply.body) == (
        400, {"error": "invalid_field", "detail": detail, "field": field},
    )


async def test_enrollment_missing_field_and_duplicates(api: ApiClient):
    reply = await api.call("POST", "/devices", json={"serial": "E1", "hw_type": 17})
    assert (reply.status, reply.body) == (
        400, {"error": "invalid_field", "detail": "sender_id: required", "field": "sender_id"},
    )
    await enroll_via_api(api, "E0000005", 17, 5)
    same_serial = await api.call(
        "POST", "/devices",
        json={"serial": "E0000005", "hw_type": 17, "sender_id": "ee", "master_secret": "11" * 16},
    )
    assert (same_serial.status, same_serial.body) == (
        409,
        {"error": "already_enrolled", "detail": "serial: E0000005 is already enrolled",
         "field": "serial"},
    )
    same_kid = await api.call(
        "POST", "/devices",
        json={"serial": "E0000006", "hw_type": 17, "sender_id": "0xA005",
              "master_secret": "11" * 16},
    )
    assert (same_kid.status, same_kid.body) == (
        409,
        {"error": "already_enrolled",
         "detail": "sender_id: a005 is already used by device E0000005", "field": "sender_id"},
    )


async def test_device_families_list_each_family_once_with_commands(api: ApiClient):
    reply = await api.call("GET", "/device-families")
    assert reply.status == 200
    families = reply.body["items"]
    assert [(f["domain"], f["name"], f["manufacturer"], f["hw_types"]) for f in families] == [
        ("vidi_positioner", "VIDI Positioner", "VIDI", {"24": "VIDI Positioner"}),
        ("vidi_prv", "VIDI PRV", "VIDI", {"28": "VIDI PRV"}),
        (
            "vidi_transmitter", "VIDI Transmitter", "VIDI",
            {
                "14": "VIDI Open Close", "16": "VIDI Flow", "17": "VIDI Pressure",
                "18": "VIDI Temp", "23": "VIDI Level", "29": "VIDI Positioner with ext. antenna",
                "31": "VIDI Leak",
            },
        ),
    ]
    commands = {c["name"]: c for c in families[2]["commands"]}
    assert commands["reset_counters"] == {
        "name": "reset_counters",
        "code": 4,
        "kind": "command",
        "description": "Reset the totalizer / opening counter to zero",
        "hw_types": [14, 16],
        "parameter": {
            "description": "Reset the totalizer / opening counter to zero",
            "type": "integer", "enum": [1], "default": 1,
        },
    }
    assert commands["tx_interval"]["parameter"] == {
        "description": "Transmission interval", "type": "integer", "minimum": 5,
        "maximum": 1440, "step": 1, "unit": "min", "default": 60,
    }
    assert commands["alarm_transmission"]["parameter"]["options"] == [
        {"value": 0, "label": "next_interval"}, {"value": 1, "label": "immediate"},
    ]
    assert commands["apn"]["parameter"] == {
        "description": "Cellular access point name", "type": "string", "minLength": 1,
        "maxLength": 63, "pattern": "^[ -~]*$",
    }


# --- downlinks ---------------------------------------------------------------------------------


async def test_schedule_repeat_get_and_cancel_a_downlink(api: ApiClient, enroll):
    await enroll(make_device("F0000006", 17, 6))
    body = {
        "command": "tx_interval",
        "parameter": 30,
        "command_id": "0219dfb3-00a8-40e6-90ea-1f83e807e885",
        "callback_url": "https://example.com/hook?x=1",
    }
    before = datetime.now(UTC)
    created = await api.call("POST", "/devices/F0000006/downlinks", json=body)
    assert created.status == 201
    first = dict(created.body)
    strip_downlink_id(created.body)
    times = pop_times(created.body, *DOWNLINK_TIMES)
    assert before - timedelta(milliseconds=1) <= times["inserted_at"] <= datetime.now(UTC)
    assert [times[n] for n in DOWNLINK_TIMES[1:]] == [None, None, None, None]
    assert created.body == downlink(
        "0219dfb3-00a8-40e6-90ea-1f83e807e885", "F0000006", "tx_interval", 16, 30,
        callback_url="https://example.com/hook?x=1",
    )

    repeat = await api.call("POST", "/devices/F0000006/downlinks", json=body)
    assert (repeat.status, repeat.body) == (200, first)

    conflict = await api.call(
        "POST", "/devices/F0000006/downlinks", json={**body, "parameter": 31}
    )
    assert (conflict.status, conflict.body) == (
        409,
        {
            "error": "conflict",
            "detail": "command_id '0219dfb3-00a8-40e6-90ea-1f83e807e885' is already used by a "
            "different downlink",
            "field": "command_id",
        },
    )

    fetched = await api.call("GET", "/downlinks/0219dfb3-00a8-40e6-90ea-1f83e807e885")
    assert (fetched.status, fetched.body) == (200, first)

    canceled = await api.call("DELETE", "/downlinks/0219dfb3-00a8-40e6-90ea-1f83e807e885")
    assert canceled.status == 200
    strip_downlink_id(canceled.body)
    times = pop_times(canceled.body, *DOWNLINK_TIMES)
    assert times["inserted_at"] <= times["canceled_at"] <= datetime.now(UTC)
    assert canceled.body == downlink(
        "0219dfb3-00a8-40e6-90ea-1f83e807e885", "F0000006", "tx_interval", 16, 30,
        callback_url="https://example.com/hook?x=1", state=1, state_name="Canceled by the user",
    )
    twice = await api.call("DELETE", "/downlinks/0219dfb3-00a8-40e6-90ea-1f83e807e885")
    assert (twice.status, twice.body) == (
        409,
        {
            "error": "not_pending",
            "detail": "only pending downlinks can be canceled; this one is in state 1 "
            "(Canceled by the user)",
        },
    )


async def test_command_without_parameter_and_generated_command_id(api: ApiClient, enroll):
    await enroll(make_device("G0000007", 14, 7))
    reply = await api.call("POST", "/devices/G0000007/downlinks", json={"command": "reboot"})
    assert reply.status == 201
    command_id = reply.body["command_id"]
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", command_id)
    strip_downlink_id(reply.body)
    pop_times(reply.body, *DOWNLINK_TIMES)
    assert reply.body == downlink(command_id, "G0000007", "reboot", 1, 1)
    label = await api.call(
        "POST", "/devices/G0000007/downlinks",
        json={"command": "alarm_transmission", "parameter": "next_interval", "command_id": "a"},
    )
    assert (label.status, label.body["parameter"], label.body["code"]) == (201, 0, 18)


async def test_history_is_paged_newest_first(api: ApiClient, enroll):
    await enroll(make_device("H0000008", 17, 8))
    for index in range(3):
        reply = await api.call(
            "POST", "/devices/H0000008/downlinks",
            json={"command": "sampling_interval", "parameter": index + 1, "command_id": f"h{index}"},
        )
        assert reply.status == 201
    page = await api.call("GET", "/devices/H0000008/downlinks", params={"limit": "2"})
    assert page.status == 200
    assert [item["command_id"] for item in page.body["items"]] == ["h2", "h1"]
    assert (page.body["total"], page.body["offset"], page.body["limit"]) == (3, 0, 2)
    rest = await api.call(
        "GET", "/devices/H0000008/downlinks", params={"offset": "2", "limit": "2"}
    )
    assert [item["command_id"] for item in rest.body["items"]] == ["h0"]
    whole = await api.call("GET", "/devices/H0000008/downlinks")
    assert (whole.body["total"], whole.body["offset"], whole.body["limit"]) == (3, 0, 50)
    one = whole.body["items"][2]
    strip_downlink_id(one)
    pop_times(one, *DOWNLINK_TIMES)
    assert one == downlink("h0", "H0000008", "sampling_interval", 17, 1)


async def test_cancel_after_dispatch_is_refused(api: ApiClient, enroll):
    session = await enroll(make_device("J0000009", 17, 9))
    await session.join("2.1.0", 17)
    reply = await api.call(
        "POST", "/devices/J0000009/downlinks",
        json={"command": "tx_interval", "parameter": 15, "command_id": "sent-one"},
    )
    assert reply.status == 201
    wire_id = reply.body["downlink_id"]
    answer = await session.post("rx", RX_PRESSURE)
    assert answer.body[4] == [wire_id, 16, 15]

    sent = await api.call("GET", "/downlinks/sent-one")
    assert (sent.body["state"], sent.body["state_name"]) == (2, "Sent, waiting for acknowledgement")
    assert parse_time(sent.body["dispatched_at"]) >= parse_time(sent.body["inserted_at"])
    refused = await api.call("DELETE", "/downlinks/sent-one")
    assert (refused.status, refused.body) == (
        409,
        {
            "error": "not_pending",
            "detail": "only pending downlinks can be canceled; this one is in state 2 "
            "(Sent, waiting for acknowledgement)",
        },
    )


@pytest.mark.parametrize(
    ("body", "status", "expected"),
    [
        (
            {"command": "explode"},
            400,
            {
                "error": "invalid_command",
                "detail": "unknown command 'explode' for hw_type 17; allowed: alarm_transmission, "
                "apn, clear_alarms, firmware_check, pressure_alarm_high, pressure_alarm_low, "
                "reboot, sampling_interval, tx_interval",
                "field": "command",
            },
        ),
        (
            {"command": "reset_counters"},  # exists in the family, not for hw_type 17
            400,
            {
                "error": "invalid_command",
                "detail": "unknown command 'reset_counters' for hw_type 17; allowed: "
                "alarm_transmission, apn, clear_alarms, firmware_check, pressure_alarm_high, "
                "pressure_alarm_low, reboot, sampling_interval, tx_interval",
                "field": "command",
            },
        ),
        (
            {"command": "tx_interval", "parameter": 2000},
            400,
            {
                "error": "invalid_parameter",
                "detail": "tx_interval must be between 5 and 1440 min, got 2000",
                "field": "parameter",
            },
        ),
        (
            {"command": "tx_interval"},
            400,
            {
                "error": "invalid_parameter",
                "detail": "tx_interval must be an integer, got None",
                "field": "parameter",
            },
        ),
        (
            {"command": "reboot", "parameter": 2},
            400,
            {
                "error": "invalid_parameter",
                "detail": "reboot is a command: its parameter must be 1, got 2",
                "field": "parameter",
            },
        ),
        (
            {"command": "alarm_transmission", "parameter": 7},
            400,
            {
                "error": "invalid_parameter",
                "detail": "alarm_transmission must be one of 0 (next_interval), 1 (immediate), "
                "got 7",
                "field": "parameter",
            },
        ),
        (
            {"command": "apn", "parameter": "iot\x00x"},
            400,
            {
                "error": "invalid_parameter",
                "detail": "apn: character 4 (U+0000) is not allowed; apn accepts printable ASCII",
                "field": "parameter",
            },
        ),
        (
            {"command": "apn", "parameter": "\u202eten.elpmaxe"},
            400,
            {
                "error": "invalid_parameter",
                "detail": "apn: character 1 (U+202E) is not allowed; apn accepts printable ASCII",
                "field": "parameter",
            },
        ),
        (
            {"command": "apn", "parameter": "iot.\x07"},
            400,
            {
                "error": "invalid_parameter",
                "detail": "apn: character 5 (U+0007) is not allowed; apn accepts printable ASCII",
                "field": "parameter",
            },
        ),
        (
            {"command": "apn", "parameter": "iot\texample"},
            400,
            {
                "error": "invalid_parameter",
                "detail": "apn: character 4 (U+0009) is not allowed; apn accepts printable ASCII",
                "field": "parameter",
            },
        ),
        (
            {"command": "reboot", "command_id": "x" * 129},
            400,
            {
                "error": "invalid_field",
                "detail": "command_id: must be 1 to 128 printable characters",
                "field": "command_id",
            },
        ),
        (
            {"command": "reboot", "command_id": ""},
            400,
            {
                "error": "invalid_field",
                "detail": "command_id: must be 1 to 128 printable characters",
                "field": "command_id",
            },
        ),
        (
            {"command": "reboot", "callback_url": "ftp://example.com/x"},
            400,
            {
                "error": "invalid_field",
                "detail": "callback_url: must be an http:// or https:// URL of at most 2048 "
                "characters",
                "field": "callback_url",
            },
        ),
        (
            {"command": "reboot", "callback_url": "http://"},
            400,
            {
                "error": "invalid_field",
                "detail": "callback_url: must be an http:// or https:// URL of at most 2048 "
                "characters",
                "field": "callback_url",
            },
        ),
        (
            {"command": "reboot", "parameter": 1.5},
            400,
            {
                "error": "invalid_field",
                "detail": "parameter: must be an integer, a string or null",
                "field": "parameter",
            },
        ),
        (
            {"parameter": 1},
            400,
            {"error": "invalid_field", "detail": "command: required", "field": "command"},
        ),
        (
            {"command": "reboot", "when": "now"},
            400,
            {
                "error": "invalid_field",
                "detail": "when: unknown field (expected: callback_url, command, command_id, "
                "parameter)",
                "field": "when",
            },
        ),
    ],
)
async def test_refused_downlinks_name_the_field_and_queue_nothing(
    api: ApiClient, enroll, body, status, expected
):
    await enroll(make_device("K0000010", 17, 10))
    reply = await api.call("POST", "/devices/K0000010/downlinks", json=body)
    assert (reply.status, reply.body) == (status, expected)
    history = await api.call("GET", "/devices/K0000010/downlinks")
    assert history.body["total"] == 0


async def test_a_printable_apn_is_queued_as_sent(api: ApiClient, enroll):
    await enroll(make_device("K0000011", 17, 11))
    body = {"command": "apn", "parameter": "iot.example-1.net", "command_id": "apn-1"}
    reply = await api.call("POST", "/devices/K0000011/downlinks", json=body)
    assert reply.status == 201, reply.body
    assert (reply.body["command"], reply.body["parameter"]) == ("apn", "iot.example-1.net")


async def test_unknown_device_or_downlink_is_404(api: ApiClient):
    for method, path, body in [
        ("POST", "/devices/NOPE/downlinks", {"command": "reboot"}),
        ("GET", "/devices/NOPE/downlinks", None),
        ("GET", "/devices/NOPE", None),
        ("DELETE", "/devices/NOPE", None),
    ]:
        reply = await api.call(method, path, json=body)
        assert (reply.status, reply.body) == (
            404, {"error": "not_found", "detail": "no device with serial 'NOPE'"},
        ), (method, path)
    for method in ("GET", "DELETE"):
        reply = await api.call(method, "/downlinks/a%2Fb%20c")
        assert (reply.status, reply.body) == (
            404, {"error": "not_found", "detail": "no downlink with command_id 'a/b c'"},
        )


# --- malformed requests ------------------------------------------------------------------------


async def test_malformed_requests_get_json_errors(api: ApiClient, enroll):
    await enroll(make_device("L0000011", 17, 11))
    path = "/devices/L0000011/downlinks"
    json_type = {"Content-Type": "application/json"}

    broken = await api.call("POST", path, data=b'{"command": ', headers=json_type)
    assert (broken.status, broken.body) == (
        400,
        {
            "error": "invalid_json",
            "detail": "the request body is not valid JSON: Expecting value: line 1 column 13 "
            "(char 12)",
        },
    )
    nan = await api.call("POST", path, data=b'{"command": "reboot", "parameter": NaN}', headers=json_type)
    assert (nan.status, nan.body) == (
        400, {"error": "invalid_json", "detail": "the request body is not valid JSON: NaN is not a JSON number"},
    )
    surrogate = await api.call("POST", path, data=b'{"command": "\\ud800"}', headers=json_type)
    assert (surrogate.status, surrogate.body["error"]) == (400, "invalid_json")
    empty = await api.call("POST", path, data=b"", headers=json_type)
    assert (empty.status, empty.body) == (
        400, {"error": "invalid_json", "detail": "the request body is empty: a JSON object is expected"},
    )
    array = await api.call("POST", path, json=["reboot"])
    assert (array.status, array.body) == (
        400, {"error": "invalid_body", "detail": "the request body must be a JSON object"},
    )
    form = await api.call("POST", path, data=b"command=reboot", headers={"Content-Type": "text/plain"})
    assert (form.status, form.body) == (
        415,
        {"error": "unsupported_media_type", "detail": "the body must be application/json (got text/plain)"},
    )
    huge = await api.call("POST", path, data=b"[" + b" " * 70_000 + b"]", headers=json_type)
    assert (huge.status, huge.body) == (
        413, {"error": "payload_too_large", "detail": "the request body is larger than 65536 bytes"},
    )

    bad_query = await api.call("GET", path, params={"limit": "0"})
    assert (bad_query.status, bad_query.body) == (
        400,
        {"error": "invalid_field", "detail": "query parameter limit: limit must be an integer from 1 to 500",
         "field": "limit"},
    )
    text_query = await api.call("GET", "/devices", params={"offset": "ten"})
    assert (text_query.status, text_query.body) == (
        400,
        {"error": "invalid_field",
         "detail": "query parameter offset: offset must be an integer from 0 to 1000000000",
         "field": "offset"},
    )
    bad_serial = await api.call("GET", "/devices/lower")
    assert (bad_serial.status, bad_serial.body) == (
        400,
        {"error": "invalid_field", "detail": "serial: must be 1 to 16 characters, each A-Z or 0-9",
         "field": "serial"},
    )

    unknown = await api.call("GET", "/nothing/here")
    assert (unknown.status, unknown.body) == (
        404, {"error": "not_found", "detail": "no such resource: /api/v1/nothing/here"},
    )
    wrong_method = await api.call("PUT", "/devices")
    assert (wrong_method.status, wrong_method.body) == (
        405, {"error": "method_not_allowed", "detail": "PUT is not allowed here (allowed: GET, POST)"},
    )
    assert wrong_method.headers["Allow"] == "GET, POST"


async def test_unexpected_errors_are_json_and_logged(api: ApiClient, caplog, monkeypatch):
    async def broken(*args, **kwargs):
        raise RuntimeError("database on fire")

    monkeypatch.setattr(api.driver.downlinks, "get", broken)
    reply = await api.call("GET", "/downlinks/anything")
    assert (reply.status, reply.body) == (
        500, {"error": "internal_error", "detail": "unexpected error; the driver log has the details"},
    )
    assert "database on fire" not in str(reply.body)
    assert "REST API: unexpected error on GET /api/v1/downlinks/anything" in caplog.text


# --- API docs page -----------------------------------------------------------------------------


class _Assets(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = {"script": "src", "link": "href"}
        for name, value in attrs:
            if name == names.get(tag) and value:
                self.urls.append(value)


async def test_docs_page_loads_swagger_ui_from_local_files(api: ApiClient):
    page_url = f"{api.base}/docs"
    async with api.http.get(page_url) as response:
        assert response.status == 200
        html = await response.text()
    parser = _Assets()
    parser.feed(html)
    assert parser.urls == [
        "docs/static/swagger-ui.css",
        "docs/static/index.css",
        "docs/static/favicon-32x32.png",
        "docs/static/favicon-16x16.png",
        "docs/static/swagger-ui-bundle.js",
        "docs/swagger-initializer.js",
    ]
    expected_types = {"css": "text/css", "png": "image/png", "js": "application/javascript"}
    for url in parser.urls:
        absolute = urljoin(page_url, url)
        assert absolute.startswith(f"{api.base}/docs/")  # nothing from a CDN
        async with api.http.get(absolute) as response:
            assert response.status == 200, absolute
            assert response.content_type == expected_types[url.rsplit(".", 1)[1]], absolute
            assert len(await response.read()) > 0

    async with api.http.get(urljoin(page_url, "docs/swagger-initializer.js")) as response:
        script = await response.text()
    assert 'url: "openapi.json"' in script and "validatorUrl: null" in script
    async with api.http.get(urljoin(page_url, "openapi.json")) as response:
        assert response.status == 200
        document = await response.json()
    assert document["components"]["securitySchemes"] == {
        "bearerAuth": {
            "type": "http",
            "scheme": "bearer",
            "description": "A token from `coap-driver token create NAME`",
        }
    }
    assert document["security"] == [{"bearerAuth": []}]

    async with api.http.get(f"{api.base}/docs/", allow_redirects=False) as response:
        assert response.status == 301
        assert urljoin(f"{api.base}/docs/", response.headers["Location"]) == page_url
    async with api.http.get(f"{api.base}/docs/static/nothing.js") as response:
        assert response.status == 404
        assert await response.json() == {
            "error": "not_found", "detail": "no such resource: /api/v1/docs/static/nothing.js",
        }
