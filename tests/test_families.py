"""The built-in device families and the YAML family loader/codec behind them."""

from __future__ import annotations

import copy
import datetime as dt
import json
import pathlib
import random
import re
import shutil
from typing import Any

import cbor2
import pytest
import voluptuous as vol
import yaml

from driver_core.family import (
    CommandSpec,
    Family,
    FamilyError,
    ParameterError,
    PayloadDecodeError,
    load_family,
)

REPO = pathlib.Path(__file__).resolve().parents[1]
DOMAINS = ("vidi_transmitter", "vidi_positioner", "vidi_prv")
SEED_TABLE = {  # hw_type -> (family domain, description), from the MQTT integration docs
    14: ("vidi_transmitter", "VIDI Open Close"),
    16: ("vidi_transmitter", "VIDI Flow"),
    17: ("vidi_transmitter", "VIDI Pressure"),
    18: ("vidi_transmitter", "VIDI Temp"),
    23: ("vidi_transmitter", "VIDI Level"),
    24: ("vidi_positioner", "VIDI Positioner"),
    28: ("vidi_prv", "VIDI PRV"),
    29: ("vidi_transmitter", "VIDI Positioner with ext. antenna"),
    31: ("vidi_transmitter", "VIDI Leak"),
}

FAMILIES: dict[str, Family] = {
    domain: load_family(REPO / "custom_components" / domain, domain) for domain in DOMAINS
}
TX = FAMILIES["vidi_transmitter"]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


EXAMPLES = [
    pytest.param(family, example, id=f"{domain}-{example.hw_type}-{_slug(example.description)}")
    for domain, family in FAMILIES.items()
    for example in family.examples
]
HW_TYPES = [
    pytest.param(family, hw_type, id=f"{domain}-{hw_type}")
    for domain, family in FAMILIES.items()
    for hw_type in family.hw_types
]


# --------------------------------------------------------------------------- built-in families


def test_seed_table_is_covered_exactly() -> None:
    found = {
        hw_type: (domain, description)
        for domain, family in FAMILIES.items()
        for hw_type, description in family.hw_types.items()
    }
    assert found == SEED_TABLE


@pytest.mark.parametrize("domain", DOMAINS)
def test_manifest_matches_family(domain: str) -> None:
    manifest = yaml.safe_load((REPO / "custom_components" / domain / "manifest.yaml").read_text())
    assert manifest == {
        "domain": domain,
        "name": FAMILIES[domain].name,
        "version": "1.0.0",
        "type": "device_family",
        "requirements": [],
    }
    assert FAMILIES[domain].domain == domain
    assert FAMILIES[domain].manufacturer == "VIDI"


@pytest.mark.parametrize(("family", "example"), EXAMPLES)
def test_example(family: Family, example: Any) -> None:
    if example.error is not None:
        with pytest.raises(PayloadDecodeError) as caught:
            family.decode(example.hw_type, example.payload)
        assert str(caught.value) == example.error
        return
    data = family.decode(example.hw_type, example.payload)
    assert data == example.data
    assert json.loads(json.dumps(data, allow_nan=False)) == example.data
    # encode is the inverse of decode: the same bytes come back
    assert family.encode(example.hw_type, data) == example.payload


@pytest.mark.parametrize("domain", DOMAINS)
def test_examples_cover_every_hw_type_with_alarms_and_errors(domain: str) -> None:
    family = FAMILIES[domain]
    for hw_type in family.hw_types:
        decoded = [e for e in family.examples if e.hw_type == hw_type and e.data is not None]
        assert len(decoded) >= 2, hw_type
        assert any(e.data.get("alarms") for e in decoded), hw_type
    assert any(e.error for e in family.examples)


@pytest.mark.parametrize(("family", "hw_type"), HW_TYPES)
def test_sample_values_round_trip(family: Family, hw_type: int) -> None:
    rng = random.Random(hw_type)
    expected_fields = set(family.hw_fields[hw_type])
    for _ in range(200):
        values = family.sample_values(hw_type, rng)
        assert set(values) == expected_fields
        assert family.decode(hw_type, family.encode(hw_type, values)) == values
        json.dumps(values, allow_nan=False)


def test_sample_values_stay_in_the_declared_ranges() -> None:
    rng = random.Random(7)
    for _ in range(300):
        values = TX.sample_values(17, rng)
        assert 20 <= values["battery"] <= 100
        assert 3.3 <= values["battery_voltage"] <= 3.65
        assert 2.5 <= values["pressure"] <= 6.5
        assert set(values["alarms"]) <= set(TX.get_field("alarms").bits.values())
    prv = FAMILIES["vidi_prv"]
    assert {prv.sample_values(28, rng)["control_mode"] for _ in range(100)} == {
        "fixed",
        "time_profile",
    }


def test_sample_values_are_reproducible() -> None:
    assert TX.sample_values(16, random.Random(3)) == TX.sample_values(16, random.Random(3))


def test_fields_of_another_hw_type_are_kept_as_unknown() -> None:
    # a leak sensor (31) does not send pressure (key 14 of hw_type 17)
    payload = cbor2.dumps({20: True, 14: 4215})
    assert TX.decode(31, payload) == {"leak": True, "unknown": {"14": 4215}}


def test_unknown_values_are_made_json_serialisable() -> None:
    payload = cbor2.dumps(
        {
            True: 5,
            99: b"\x01\xff",
            98: [1, {2: b"\x00"}],
            97: float("nan"),
            96: cbor2.CBORTag(1234, "x"),
            95: dt.datetime(2025, 9, 4, 6, 45, 36, tzinfo=dt.UTC),
            "txt": None,
        },
        datetime_as_timestamp=False,
    )
    data = TX.decode(17, payload)
    assert data == {
        "unknown": {
            "True": 5,
            "99": "01ff",
            "98": [1, {"2": "00"}],
            "97": None,
            "96": {"tag": 1234, "value": "x"},
            "95": "2025-09-04T06:45:36+00:00",
            "txt": None,
        }
    }
    json.dumps(data, allow_nan=False)


def test_float_field_nan_is_published_as_null() -> None:
    assert FAMILIES["vidi_prv"].decode(28, cbor2.dumps({15: float("inf")})) == {"flow": None}


MALFORMED = [
    ("empty", b"", "empty payload, expected a CBOR map"),
    (
        "garbage",
        b"\xff\xfe\x00",
        "invalid CBOR: break code encountered where a data item was expected",
    ),
    ("text-bytes", b"hello", "truncated CBOR: the 5-byte payload ends inside a data item"),
    (
        "truncated",
        cbor2.dumps({1: 87, 14: 4215})[:-1],
        "truncated CBOR: the 7-byte payload ends inside a data item",
    ),
    ("array", cbor2.dumps([1, 2, 3]), "expected a CBOR map, got array of 3 items"),
    ("integer", cbor2.dumps(5), "expected a CBOR map, got integer 5"),
    ("text", cbor2.dumps("hi"), "expected a CBOR map, got text string 'hi'"),
    ("null", cbor2.dumps(None), "expected a CBOR map, got null"),
    ("trailing", cbor2.dumps({1: 2}) + b"\x00\x00", "2 unexpected bytes after the CBOR map"),
    (
        "float-for-int",
        cbor2.dumps({14: 4.2}),
        "key 14 (pressure): expected an integer, got float 4.2",
    ),
    (
        "negative-uint",
        cbor2.dumps({1: -1}),
        "key 1 (battery): expected an unsigned integer, got integer -1",
    ),
    (
        "bytes-for-int",
        cbor2.dumps({14: b"\x01\x02"}),
        "key 14 (pressure): expected an integer, got byte string h'0102'",
    ),
    (
        "array-for-int",
        cbor2.dumps({14: [1]}),
        "key 14 (pressure): expected an integer, got array of 1 item",
    ),
    (
        "map-for-int",
        cbor2.dumps({15: {1: 2}}),
        "key 15 (pressure_min): expected an integer, got map of 1 entry",
    ),
    (
        "bool-for-int",
        cbor2.dumps({16: False}),
        "key 16 (pressure_max): expected an integer, got false",
    ),
    (
        "text-for-bitfield",
        cbor2.dumps({6: "x"}),
        "key 6 (alarms): expected a bitfield (unsigned integer), got text string 'x'",
    ),
    (
        "undefined",
        cbor2.dumps({14: cbor2.undefined}),
        "key 14 (pressure): expected an integer, got undefined",
    ),
    (
        "long-text",
        cbor2.dumps({14: "x" * 30}),
        "key 14 (pressure): expected an integer, got text string 'xxxxxxxxxxxxxxxxxxxx…'",
    ),
]


@pytest.mark.parametrize(
    ("payload", "message"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_malformed_payload(payload: bytes, message: str) -> None:
    with pytest.raises(PayloadDecodeError) as caught:
        TX.decode(17, payload)
    assert str(caught.value) == message


def test_wrong_types_for_bool_and_enum() -> None:
    with pytest.raises(
        PayloadDecodeError, match=r"^key 20 \(leak\): expected true or false, got integer 1$"
    ):
        TX.decode(31, cbor2.dumps({20: 1}))
    with pytest.raises(
        PayloadDecodeError,
        match=r"^key 10 \(state\): expected an enum code \(unsigned integer\), got text string 'open'$",
    ):
        TX.decode(14, cbor2.dumps({10: "open"}))


def test_decode_refuses_a_hw_type_of_another_family() -> None:
    with pytest.raises(PayloadDecodeError) as caught:
        TX.decode(24, cbor2.dumps({1: 50}))
    assert str(caught.value) == "hw_type 24 is not part of the VIDI Transmitter family"


def test_encode_refuses_bad_values() -> None:
    cases = [
        ({"pressure": 1.0}, 31, "field 'pressure' is not sent by hw_type 31 (VIDI Leak)"),
        ({"pressure": "high"}, 17, "field 'pressure': expected a number, got 'high'"),
        ({"battery": -1}, 17, "field 'battery': -1 is below the smallest encodable value"),
        ({"state": "ajar"}, 14, "field 'state': 'ajar' is not one of closed, open"),
        ({"alarms": ["fire"]}, 14, "field 'alarms': unknown bit name 'fire'"),
        ({"leak": 1}, 31, "field 'leak': expected true or false, got 1"),
    ]
    for values, hw_type, message in cases:
        with pytest.raises(ValueError) as caught:
            TX.encode(hw_type, values)
        assert str(caught.value) == message
    with pytest.raises(ValueError, match="^hw_type 99 is not part of the VIDI Transmitter family$"):
        TX.sample_values(99, random.Random(1))


def test_encode_accepts_undeclared_bits() -> None:
    assert TX.decode(17, TX.encode(17, {"alarms": ["tamper", "bit12"]})) == {
        "alarms": ["tamper", "bit12"]
    }


# --------------------------------------------------------------------------- entities, commands


def test_entities_follow_the_fields_of_each_hw_type() -> None:
    leak = {e.object_id for e in TX.entities_for(31)}
    assert "leak" in leak and "pressure" not in leak and "alarms_tamper" in leak
    pressure = {e.object_id: e for e in TX.entities_for(17)}
    assert pressure["pressure"].unit == "bar"
    assert pressure["pressure"].device_class == "pressure"
    assert pressure["battery"].entity_category == "diagnostic"
    assert pressure["rssi"].name == "RSSI"
    assert pressure["pressure"].value_template() == "{{ value_json.data.pressure }}"
    assert (
        pressure["alarms_high_threshold"].value_template()
        == "{{ 'ON' if 'high_threshold' in (value_json.data.alarms or []) else 'OFF' }}"
    )
    state = {e.object_id: e for e in TX.entities_for(14)}["state_open"]
    assert (
        state.value_template("value_json") == "{{ 'ON' if value_json.state == 'open' else 'OFF' }}"
    )
    leak_entity = {e.object_id: e for e in TX.entities_for(31)}["leak"]
    assert leak_entity.device_class == "moisture"
    assert leak_entity.value_template() == "{{ 'ON' if value_json.data.leak else 'OFF' }}"
    valve = {e.object_id: e for e in FAMILIES["vidi_positioner"].entities}["valve_state"]
    assert valve.options == ("closed", "open", "opening", "closing", "intermediate", "blocked")


def test_command_lookup() -> None:
    assert TX.command_by_code(16).name == "tx_interval"
    assert TX.command_by_code(1).kind == "command"
    assert TX.command_by_code(999) is None
    names_17 = {c.name for c in TX.commands_for(17)}
    assert {"reboot", "tx_interval", "pressure_alarm_high"} <= names_17
    assert "flow_alarm_high" not in names_17 and "reset_counters" not in names_17
    positioner = FAMILIES["vidi_positioner"].commands
    assert {"open_valve", "close_valve", "set_position"} <= set(positioner)
    assert FAMILIES["vidi_prv"].commands["set_outlet_pressure"].unit == "mbar"


ACCEPTED = [
    ("vidi_transmitter", "reboot", 1, 1),
    ("vidi_transmitter", "reboot", None, 1),
    ("vidi_transmitter", "reboot", "1", 1),
    ("vidi_transmitter", "tx_interval", 60, 60),
    ("vidi_transmitter", "tx_interval", "1440", 1440),
    ("vidi_transmitter", "tx_interval", 5.0, 5),
    ("vidi_transmitter", "temperature_alarm_low", -40, -40),
    ("vidi_transmitter", "alarm_transmission", 0, 0),
    ("vidi_transmitter", "alarm_transmission", "immediate", 1),
    ("vidi_transmitter", "apn", "iot.example.net", "iot.example.net"),
    ("vidi_transmitter", "apn", " !~iot-1_a.B", " !~iot-1_a.B"),
    ("vidi_positioner", "set_position", 0, 0),
    ("vidi_positioner", "set_position", 100, 100),
    ("vidi_prv", "set_outlet_pressure", 3000, 3000),
    ("vidi_prv", "control_mode", "flow_modulated", 2),
]


@pytest.mark.parametrize(
    ("domain", "name", "value", "wire"),
    ACCEPTED,
    ids=[f"{a[1]}-{a[2]!r}" for a in ACCEPTED],
)
def test_parameter_accepted(domain: str, name: str, value: Any, wire: Any) -> None:
    assert FAMILIES[domain].commands[name].validate_parameter(value) == wire


REFUSED = [
    ("vidi_transmitter", "reboot", 2, "reboot is a command: its parameter must be 1, got 2"),
    (
        "vidi_transmitter",
        "reboot",
        "now",
        "reboot is a command: its parameter must be 1, got 'now'",
    ),
    ("vidi_transmitter", "tx_interval", 4, "tx_interval must be between 5 and 1440 min, got 4"),
    (
        "vidi_transmitter",
        "tx_interval",
        1441,
        "tx_interval must be between 5 and 1440 min, got 1441",
    ),
    ("vidi_transmitter", "tx_interval", "abc", "tx_interval must be an integer, got 'abc'"),
    ("vidi_transmitter", "tx_interval", 60.5, "tx_interval must be an integer, got 60.5"),
    ("vidi_transmitter", "tx_interval", True, "tx_interval must be an integer, got True"),
    ("vidi_transmitter", "tx_interval", None, "tx_interval must be an integer, got None"),
    (
        "vidi_transmitter",
        "alarm_transmission",
        2,
        "alarm_transmission must be one of 0 (next_interval), 1 (immediate), got 2",
    ),
    (
        "vidi_transmitter",
        "alarm_transmission",
        "soon",
        "alarm_transmission must be one of 0 (next_interval), 1 (immediate), got 'soon'",
    ),
    ("vidi_transmitter", "apn", "", "apn must be 1 to 63 characters long, got 0"),
    ("vidi_transmitter", "apn", "a" * 64, "apn must be 1 to 63 characters long, got 64"),
    ("vidi_transmitter", "apn", 5, "apn must be a text, got 5"),
    ("vidi_transmitter", "apn", "iot\x00x",
     "apn: character 4 (U+0000) is not allowed; apn accepts printable ASCII"),
    ("vidi_transmitter", "apn", "\u202eten.elpmaxe",
     "apn: character 1 (U+202E) is not allowed; apn accepts printable ASCII"),
    ("vidi_transmitter", "apn", "iot.\x07",
     "apn: character 5 (U+0007) is not allowed; apn accepts printable ASCII"),
    ("vidi_transmitter", "apn", "iot\texample",
     "apn: character 4 (U+0009) is not allowed; apn accepts printable ASCII"),
    ("vidi_transmitter", "apn", "iot.exämple",
     "apn: character 7 (U+00E4) is not allowed; apn accepts printable ASCII"),
    ("vidi_positioner", "set_position", 101, "set_position must be between 0 and 100 %, got 101"),
    (
        "vidi_prv",
        "set_outlet_pressure",
        3005,
        "set_outlet_pressure must be 500 plus a multiple of 10, got 3005",
    ),
]


@pytest.mark.parametrize(
    ("domain", "name", "value", "message"),
    REFUSED,
    ids=[f"{r[1]}-{r[2]!r}"[:40] for r in REFUSED],
)
def test_parameter_refused(domain: str, name: str, value: Any, message: str) -> None:
    with pytest.raises(ParameterError) as caught:
        FAMILIES[domain].commands[name].validate_parameter(value)
    assert str(caught.value) == message
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, vol.Invalid)


def test_parameter_validation_inside_a_voluptuous_schema() -> None:
    spec = TX.commands["tx_interval"]
    schema = vol.Schema({vol.Required("parameter"): spec.voluptuous_validator()})
    assert schema({"parameter": "30"}) == {"parameter": 30}
    with pytest.raises(vol.MultipleInvalid) as caught:
        schema({"parameter": 2})
    assert str(caught.value) == (
        "tx_interval must be between 5 and 1440 min, got 2 for dictionary value @ data['parameter']"
    )


def test_parameter_schemas() -> None:
    commands = TX.commands
    assert commands["reboot"].parameter_schema() == {
        "description": "Restart the device (it joins again)",
        "type": "integer",
        "enum": [1],
        "default": 1,
    }
    assert commands["tx_interval"].parameter_schema() == {
        "description": "Transmission interval",
        "type": "integer",
        "minimum": 5,
        "maximum": 1440,
        "step": 1,
        "unit": "min",
        "default": 60,
    }
    assert commands["alarm_transmission"].parameter_schema() == {
        "description": "When an alarm is sent",
        "type": "integer",
        "enum": [0, 1],
        "options": [{"value": 0, "label": "next_interval"}, {"value": 1, "label": "immediate"}],
        "default": 1,
    }
    assert commands["apn"].parameter_schema() == {
        "description": "Cellular access point name",
        "type": "string",
        "minLength": 1,
        "maxLength": 63,
        "pattern": "^[ -~]*$",
    }
    assert FAMILIES["vidi_prv"].commands["set_outlet_pressure"].parameter_schema()["step"] == 10


def test_command_spec_is_plain_data() -> None:
    spec = CommandSpec(name="ping", code=9, kind="command", description="Ping")
    assert spec.validate_parameter(1) == 1
    assert spec.parameter_schema()["enum"] == [1]


# --------------------------------------------------------------------------- custom families

BASE: dict[str, Any] = {
    "name": "Test Family",
    "hw_types": {17: {"description": "Test Pressure", "fields": ["battery", "pressure"]}},
    "uplink": {
        1: {"name": "battery", "type": "uint", "unit": "%"},
        14: {"name": "pressure", "type": "int", "scale": 0.001, "unit": "bar"},
    },
    "commands": {"reboot": {"code": 1, "description": "Restart"}},
    "configurations": {
        "tx_interval": {
            "code": 16,
            "description": "Interval",
            "min": 5,
            "max": 1440,
            "unit": "min",
        }
    },
    "simulate": {17: {"battery": {"min": 0, "max": 100}, "pressure": {"min": 1, "max": 5}}},
}


def _write(tmp_path: pathlib.Path, doc: Any) -> pathlib.Path:
    text = doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    (tmp_path / "family.yaml").write_text(text, encoding="utf-8")
    return tmp_path


def _mutated(change) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    change(doc)
    return doc


def test_a_text_parameter_may_accept_printable_unicode(tmp_path: pathlib.Path) -> None:
    doc = _mutated(lambda d: d["configurations"].update(
        label={"code": 31, "description": "Label", "type": "str", "max_length": 8,
               "charset": "printable"}
    ))
    label = load_family(_write(tmp_path, doc), "test_family").commands["label"]
    assert label.validate_parameter("Küche 1") == "Küche 1"
    assert "pattern" not in label.parameter_schema()
    for value, position, code in (("a\u202eb", 2, "U+202E"), ("\u200bab", 1, "U+200B"),
                                  ("ab\u2028", 3, "U+2028"), ("a\x00", 2, "U+0000")):
        with pytest.raises(ParameterError) as caught:
            label.validate_parameter(value)
        assert str(caught.value) == (
            f"label: character {position} ({code}) is not allowed; label accepts printable "
            "characters (no control, format or line separator characters)"
        )


def test_minimal_custom_family_loads(tmp_path: pathlib.Path) -> None:
    family = load_family(_write(tmp_path, BASE), "test_family")
    assert family.domain == "test_family"
    assert family.hw_types == {17: "Test Pressure"}
    assert family.decode(17, cbor2.dumps({1: 50, 14: 1500})) == {"battery": 50, "pressure": 1.5}


def test_text_offset_and_plain_float_fields(tmp_path: pathlib.Path) -> None:
    doc = _mutated(
        lambda d: d.update(
            hw_types={5: "Thermo"},  # short form: description only, every field applies
            uplink={
                1: {"name": "firmware", "type": "tstr"},
                2: {
                    "name": "temperature",
                    "type": "uint",
                    "scale": 0.5,
                    "offset": -40,
                    "unit": "°C",
                },
                3: {"name": "ratio", "type": "float"},
                4: {"name": "count", "type": "int", "scale": 10},
            },
            simulate={
                5: {
                    "firmware": {"choices": ["1.0.0", "1.1.0"]},
                    "temperature": {"min": -10, "max": 30},
                    "ratio": {"min": 0, "max": 1},
                    "count": {"min": 0, "max": 1000},
                }
            },
        )
    )
    family = load_family(_write(tmp_path, doc), "thermo")
    payload = cbor2.dumps({1: "1.2.3", 2: 101, 3: 0.1234567, 4: 7})
    assert family.decode(5, payload) == {
        "firmware": "1.2.3",
        "temperature": 10.5,
        "ratio": 0.1234567,
        "count": 70,
    }
    assert family.decode(5, cbor2.dumps({3: 2})) == {"ratio": 2.0}
    with pytest.raises(
        PayloadDecodeError, match=r"^key 1 \(firmware\): expected a text string, got integer 1$"
    ):
        family.decode(5, cbor2.dumps({1: 1}))
    rng = random.Random(5)
    for _ in range(100):
        values = family.sample_values(5, rng)
        assert -10 <= values["temperature"] <= 30
        assert family.decode(5, family.encode(5, values)) == values


BAD_FAMILIES = [
    ("missing-name", lambda d: d.pop("name"), "name: required key not provided"),
    ("missing-hw-types", lambda d: d.pop("hw_types"), "hw_types: required key not provided"),
    (
        "missing-field-type",
        lambda d: d["uplink"][1].pop("type"),
        "uplink.1.type: required key not provided",
    ),
    (
        "bad-field-type",
        lambda d: d["uplink"][1].update(type="uint8"),
        "uplink.1.type: 'uint8' is not one of: uint, int, float, bool, enum, bitfield, tstr",
    ),
    (
        "scale-not-a-number",
        lambda d: d["uplink"][14].update(scale="milli"),
        "uplink.14.scale: expected a number, got 'milli'",
    ),
    (
        "text-cbor-key",
        lambda d: d["uplink"].update(one={"name": "x", "type": "bool"}),
        "uplink.one: expected an integer, got 'one'",
    ),
    (
        "extra-key",
        lambda d: d.update(colour="blue"),
        "colour: extra keys not allowed",
    ),
    (
        "bad-field-name",
        lambda d: d["uplink"][1].update(name="Battery Level"),
        "uplink.1.name: expected a snake_case name (a-z, 0-9, _), got 'Battery Level'",
    ),
    (
        "duplicate-field-name",
        lambda d: d["uplink"][14].update(name="battery"),
        "uplink.14.name: 'battery' is already used by uplink.1",
    ),
    (
        "reserved-field-name",
        lambda d: d["uplink"][14].update(name="unknown"),
        "uplink.14.name: 'unknown' is reserved",
    ),
    (
        "enum-without-values",
        lambda d: d["uplink"].update({3: {"name": "state", "type": "enum"}}),
        "uplink.3.values: required for type enum",
    ),
    (
        "bits-on-uint",
        lambda d: d["uplink"][1].update(bits={0: "low"}),
        "uplink.1.bits: not allowed for type uint",
    ),
    (
        "hw-type-unknown-field",
        lambda d: d["hw_types"][17]["fields"].append("nope"),
        "hw_types.17.fields.2: no uplink field named 'nope'",
    ),
    (
        "hw-type-without-description",
        lambda d: d["hw_types"][17].pop("description"),
        "hw_types.17.description: required key not provided",
    ),
    (
        "duplicate-command-code",
        lambda d: d["configurations"]["tx_interval"].update(code=1),
        "configurations.tx_interval.code: code 1 is already used by commands.reboot",
    ),
    (
        "command-name-twice",
        lambda d: d["configurations"].update(
            reboot={"code": 40, "description": "x", "min": 0, "max": 1}
        ),
        "configurations.reboot: 'reboot' is already declared as a command",
    ),
    (
        "negative-command-code",
        lambda d: d["commands"]["reboot"].update(code=-1),
        "commands.reboot.code: expected an integer >= 0, got -1",
    ),
    (
        "configuration-without-max",
        lambda d: d["configurations"]["tx_interval"].pop("max"),
        "configurations.tx_interval.max: required for type int (or give options)",
    ),
    (
        "configuration-min-above-max",
        lambda d: d["configurations"]["tx_interval"].update(min=2000),
        "configurations.tx_interval.min: 2000 is greater than max 1440",
    ),
    (
        "configuration-default-out-of-range",
        lambda d: d["configurations"]["tx_interval"].update(default=1),
        "configurations.tx_interval.default: tx_interval must be between 5 and 1440 min, got 1",
    ),
    (
        "options-with-min",
        lambda d: d["configurations"]["tx_interval"].update(options={0: "off"}),
        "configurations.tx_interval.min: not allowed together with options",
    ),
    (
        "str-without-max-length",
        lambda d: d["configurations"].update(apn={"code": 30, "description": "APN", "type": "str"}),
        "configurations.apn.max_length: required for type str",
    ),
    (
        "str-unknown-charset",
        lambda d: d["configurations"].update(
            label={"code": 31, "description": "Label", "type": "str", "max_length": 8,
                   "charset": "latin1"}
        ),
        "configurations.label.charset: 'latin1' is not one of: printable_ascii, printable",
    ),
    (
        "charset-on-int",
        lambda d: d["configurations"]["tx_interval"].update(charset="printable"),
        "configurations.tx_interval.charset: not allowed for type int",
    ),
    (
        "str-default-outside-charset",
        lambda d: d["configurations"].update(
            label={"code": 31, "description": "Label", "type": "str", "max_length": 8,
                   "default": "caf\u00e9"}
        ),
        "configurations.label.default: label: character 4 (U+00E9) is not allowed; label "
        "accepts printable ASCII",
    ),
    (
        "command-for-unknown-hw-type",
        lambda d: d["commands"]["reboot"].update(hw_types=[99]),
        "commands.reboot.hw_types.0: unknown hw_type 99",
    ),
    (
        "entity-unknown-key",
        lambda d: d.update(entities=[{"key": "flow", "platform": "sensor"}]),
        "entities.0.key: no uplink field named 'flow'",
    ),
    (
        "entity-bad-device-class",
        lambda d: d.update(
            entities=[{"key": "pressure", "platform": "sensor", "device_class": "moisture_level"}]
        ),
        "entities.0.device_class: 'moisture_level' is not a sensor device class",
    ),
    (
        "binary-sensor-on-number",
        lambda d: d.update(entities=[{"key": "battery", "platform": "binary_sensor"}]),
        "entities.0.platform: binary_sensor needs a bool field, a bit or an on_value ('battery' is uint)",
    ),
    (
        "entity-twice",
        lambda d: d.update(
            entities=[
                {"key": "battery", "platform": "sensor"},
                {"key": "battery", "platform": "sensor"},
            ]
        ),
        "entities.1: same entity as entities.0",
    ),
    (
        "simulate-missing-range",
        lambda d: d["simulate"][17].pop("pressure"),
        "simulate.17: no simulation for field 'pressure'",
    ),
    (
        "simulate-wrong-form",
        lambda d: d["simulate"][17].update(pressure={"probability": 0.5}),
        "simulate.17.pressure: field of type int needs {min, max}",
    ),
    (
        "simulate-bad-entry",
        lambda d: d["simulate"][17].update(pressure={"low": 1}),
        "simulate.17.pressure: expected {min, max}, {probability} or {choices} (a non-empty list)",
    ),
    (
        "simulate-unknown-hw-type",
        lambda d: d["simulate"].update({18: {}}),
        "simulate.18: unknown hw_type 18",
    ),
    (
        "example-unknown-hw-type",
        lambda d: d.update(
            examples=[{"description": "x", "hw_type": 18, "payload": "a0", "data": {}}]
        ),
        "examples.0.hw_type: unknown hw_type 18",
    ),
    (
        "example-bad-hex",
        lambda d: d.update(
            examples=[{"description": "x", "hw_type": 17, "payload": "zz", "data": {}}]
        ),
        "examples.0.payload: expected CBOR as hex digits, got 'zz'",
    ),
    (
        "example-without-outcome",
        lambda d: d.update(examples=[{"description": "x", "hw_type": 17, "payload": "a0"}]),
        "examples.0: needs either data or error",
    ),
    (
        "two-problems",
        lambda d: (d.pop("name"), d["uplink"][1].pop("type")),
        "name: required key not provided; uplink.1.type: required key not provided",
    ),
]


@pytest.mark.parametrize(
    ("change", "problem"), [b[1:] for b in BAD_FAMILIES], ids=[b[0] for b in BAD_FAMILIES]
)
def test_bad_family(tmp_path: pathlib.Path, change, problem: str) -> None:
    _write(tmp_path, _mutated(change))
    with pytest.raises(FamilyError) as caught:
        load_family(tmp_path, "test_family")
    assert str(caught.value) == f"{tmp_path / 'family.yaml'}: {problem}"


BAD_FILES = [
    ("missing-file", None, "file not found"),
    ("not-a-mapping", "- 1\n- 2\n", "(top level): expected a mapping, got list"),
    ("syntax-error", "name: [unclosed\n", "line 2: expected ',' or ']', but got '<stream end>'"),
    (
        "duplicate-yaml-key",
        "name: X\ncommands:\n  reboot: {code: 1, description: a}\n  reboot: {code: 2, description: b}\n",
        "line 4: duplicate key 'reboot'",
    ),
]


@pytest.mark.parametrize(
    ("text", "problem"), [b[1:] for b in BAD_FILES], ids=[b[0] for b in BAD_FILES]
)
def test_bad_family_file(tmp_path: pathlib.Path, text: str | None, problem: str) -> None:
    if text is not None:
        _write(tmp_path, text)
    with pytest.raises(FamilyError) as caught:
        load_family(tmp_path, "test_family")
    assert str(caught.value) == f"{tmp_path / 'family.yaml'}: {problem}"


BAD_LINES = [  # (a line of vidi_prv/family.yaml, what it becomes, key path in the message)
    (
        "  tx_interval: {code: 16,",
        "  tx_interval: {code: 1,",
        "configurations.tx_interval.code: code 1 is already used by commands.reboot",
    ),
    (
        "  16: {name: temperature, type: int, scale: 0.01,",
        "  16: {name: temperature, type: int, scale: hundredth,",
        "uplink.16.scale: expected a number, got 'hundredth'",
    ),
    (
        "  - {key: flow, platform: sensor,",
        "  - {key: flows, platform: sensor,",
        "entities.5.key: no uplink field named 'flows'",
    ),
    (
        "    inlet_pressure: {min: 5, max: 9}",
        "    inlet_pressure: {probability: 0.5}",
        "simulate.28.inlet_pressure: field of type int needs {min, max}",
    ),
]


@pytest.mark.parametrize(("line", "bad", "problem"), BAD_LINES, ids=[b[2].split(":")[0] for b in BAD_LINES])
def test_a_family_error_names_file_and_line(
    tmp_path: pathlib.Path, line: str, bad: str, problem: str
) -> None:
    shutil.copytree(REPO / "custom_components" / "vidi_common", tmp_path / "vidi_common")
    folder = tmp_path / "vidi_prv"
    folder.mkdir()
    lines = (REPO / "custom_components" / "vidi_prv" / "family.yaml").read_text("utf-8").splitlines()
    number = next(n for n, text in enumerate(lines, start=1) if text.startswith(line))
    lines[number - 1] = lines[number - 1].replace(line, bad, 1)
    _write(folder, "\n".join(lines) + "\n")
    with pytest.raises(FamilyError) as caught:
        load_family(folder, "test_family")
    assert str(caught.value) == f"{folder / 'family.yaml'}: {problem}"
    assert (caught.value.file, caught.value.line) == (str(folder / "family.yaml"), number)


def test_a_yaml_error_names_file_and_line(tmp_path: pathlib.Path) -> None:
    _write(tmp_path, "name: X\ncommands:\n  reboot: {code: 1, description: a}\n  reboot: {code: 2}\n")
    with pytest.raises(FamilyError) as caught:
        load_family(tmp_path, "test_family")
    assert (caught.value.file, caught.value.line) == (str(tmp_path / "family.yaml"), 4)


def _family_with_shared_block(tmp_path: pathlib.Path, shared: str, family: str) -> pathlib.Path:
    """A family folder next to a vidi_common-like folder holding `shared` as block.yaml."""
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "block.yaml").write_text(shared, encoding="utf-8")
    (tmp_path / "fam").mkdir()
    _write(tmp_path / "fam", family)
    return tmp_path / "fam"


SHARED_FAMILY = (
    "name: X\nhw_types: {17: P}\nuplink:\n  <<: !include ../common/block.yaml\n"
    "  9: {name: leak, type: bool}\nsimulate: {17: {battery: {min: 0, max: 100}}}\n"
)


def test_a_shared_block_is_merged_into_the_family(tmp_path: pathlib.Path) -> None:
    folder = _family_with_shared_block(tmp_path, "1: {name: battery, type: uint}\n", SHARED_FAMILY)
    family = load_family(folder, "test_family")
    assert [spec.name for spec in family.fields.values()] == ["battery", "leak"]
    assert family.decode(17, bytes.fromhex("a201185009f4")) == {"battery": 80, "leak": False}


def test_an_error_in_a_shared_block_names_its_file_and_line(tmp_path: pathlib.Path) -> None:
    folder = _family_with_shared_block(
        tmp_path, "# shared\n1: {name: battery, type: uint}\n2: {name: rssi, type: sint}\n", SHARED_FAMILY
    )
    with pytest.raises(FamilyError) as caught:
        load_family(folder, "test_family")
    assert str(caught.value).endswith("family.yaml: uplink.2.type: 'sint' is not one of: "
                                      "uint, int, float, bool, enum, bitfield, tstr")
    block = (tmp_path / "common" / "block.yaml").resolve()
    assert (caught.value.file, caught.value.line) == (str(block), 3)


def test_a_key_in_both_the_family_and_a_shared_block_is_refused(tmp_path: pathlib.Path) -> None:
    folder = _family_with_shared_block(tmp_path, "9: {name: battery, type: uint}\n", SHARED_FAMILY)
    with pytest.raises(FamilyError, match=r"family\.yaml: line 5: duplicate key 9$"):
        load_family(folder, "test_family")


def test_a_shared_list_is_spliced_and_a_cycle_refused(tmp_path: pathlib.Path) -> None:
    folder = _family_with_shared_block(
        tmp_path,
        "- {key: battery, platform: sensor}\n",
        "name: X\nhw_types: {17: P}\nuplink: {1: {name: battery, type: uint}, 2: {name: leak, type: bool}}\n"
        "simulate: {17: {battery: {min: 0, max: 100}}}\n"
        "entities:\n  - {key: leak, platform: binary_sensor}\n  - !include ../common/block.yaml\n",
    )
    family = load_family(folder, "test_family")
    assert [entity.key for entity in family.entities] == ["leak", "battery"]
    (tmp_path / "common" / "block.yaml").write_text("- !include block.yaml\n", encoding="utf-8")
    with pytest.raises(FamilyError, match=r"block\.yaml: line 1: !include block\.yaml includes itself"):
        load_family(folder, "test_family")


def test_the_valve_mapping_lives_in_the_family(tmp_path: pathlib.Path) -> None:
    assert FAMILIES["vidi_positioner"].home_assistant == {
        "valve": {"position": "position", "set_position": "set_position", "moving_field": "valve_state"}
    }
    assert FAMILIES["vidi_prv"].home_assistant == {
        "valve": {"state_field": "valve_position", "open": "open_valve", "close": "close_valve"}
    }
    assert TX.home_assistant == {}
    _write(tmp_path, "name: X\nhw_types: {17: P}\nuplink: {1: {name: leak, type: bool}}\n"
                     "home_assistant:\n  valve: {position: leak}\n")
    with pytest.raises(FamilyError) as caught:
        load_family(tmp_path, "test_family")
    assert str(caught.value).endswith(": home_assistant.valve.set_position: required key not provided")
    assert caught.value.line == 5


def test_the_family_in_the_docs_is_valid(tmp_path: pathlib.Path) -> None:
    text = (REPO / "docs" / "families.md").read_text(encoding="utf-8")
    _write(tmp_path, "\n".join(re.findall(r"```yaml\n(.*?)```", text, re.S)))
    family = load_family(tmp_path, "doc_family")
    for example in family.examples:
        if example.error:
            with pytest.raises(PayloadDecodeError, match=re.escape(example.error)):
                family.decode(example.hw_type, example.payload)
        else:
            assert family.decode(example.hw_type, example.payload) == example.data
    assert set(family.sample_values(40, random.Random(1))) == {
        "battery",
        "pressure",
        "temperature",
        "state",
        "alarms",
    }
