"""The voluptuous schema of family.yaml: shapes and value types, before the semantic checks."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import voluptuous as vol

from .sim import Sim
from .spec import CHARSETS, FIELD_TYPES


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise vol.Invalid(f"expected an integer, got {value!r}")
    return value


def _uint(value: Any) -> int:
    if _int(value) < 0:
        raise vol.Invalid(f"expected an integer >= 0, got {value!r}")
    return value


def _number(value: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise vol.Invalid(f"expected a number, got {value!r}")
    return value


def _positive(value: Any) -> int | float:
    if _number(value) <= 0:
        raise vol.Invalid(f"expected a number > 0, got {value!r}")
    return value


def _probability(value: Any) -> float:
    if not 0 <= _number(value) <= 1:
        raise vol.Invalid(f"expected a probability between 0 and 1, got {value!r}")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise vol.Invalid(f"expected a non-empty text, got {value!r}")
    return value


def _name(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", value):
        raise vol.Invalid(f"expected a snake_case name (a-z, 0-9, _), got {value!r}")
    return value


def _one_of(*choices: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices:
            raise vol.Invalid(f"{value!r} is not one of: {', '.join(choices)}")
        return value

    return check


def _hex(value: Any) -> bytes:
    try:
        return bytes.fromhex(value)
    except (TypeError, ValueError):
        raise vol.Invalid(f"expected CBOR as hex digits, got {value!r}") from None


_FIELD_SCHEMA = vol.Schema(
    {
        vol.Required("name"): _name,
        vol.Required("type"): _one_of(*FIELD_TYPES),
        vol.Optional("scale"): _positive,
        vol.Optional("offset"): _number,
        vol.Optional("decimals"): vol.All(_uint, vol.Range(max=9)),
        vol.Optional("unit"): _text,
        vol.Optional("description"): _text,
        vol.Optional("values"): vol.All({_uint: _name}, vol.Length(min=1)),
        vol.Optional("bits"): vol.All(
            {vol.All(_uint, vol.Range(max=63)): _name}, vol.Length(min=1)
        ),
    }
)

_HW_TYPE_SCHEMA = vol.Schema(
    {
        vol.Required("description"): _text,
        vol.Optional("fields"): vol.All([_name], vol.Length(min=1)),
    }
)


def _hw_type_entry(value: Any) -> dict:
    """`17: VIDI Pressure` is short for `17: {description: VIDI Pressure}`."""
    if isinstance(value, str):
        value = {"description": value}
    elif not isinstance(value, dict):
        raise vol.Invalid(f"expected a description or a mapping, got {value!r}")
    return _HW_TYPE_SCHEMA(value)


_ENTITY_SCHEMA = vol.Schema(
    {
        vol.Required("key"): _name,
        vol.Required("platform"): _one_of("sensor", "binary_sensor"),
        vol.Optional("name"): _text,
        vol.Optional("device_class"): _name,
        vol.Optional("state_class"): _one_of("measurement", "total", "total_increasing"),
        vol.Optional("unit"): _text,
        vol.Optional("entity_category"): _one_of("diagnostic", "config"),
        vol.Optional("icon"): vol.All(
            str, vol.Match(r"^mdi:[a-z0-9-]+$", msg="expected mdi:<name>")
        ),
        vol.Optional("bit"): _name,
        vol.Optional("on_value"): _name,
        vol.Optional("enabled_by_default"): bool,
    }
)

_COMMAND_SCHEMA = vol.Schema(
    {
        vol.Required("code"): _uint,
        vol.Required("description"): _text,
        vol.Optional("hw_types"): [_int],
    }
)

_CONFIGURATION_SCHEMA = vol.Schema(
    {
        vol.Required("code"): _uint,
        vol.Required("description"): _text,
        vol.Optional("type", default="int"): _one_of("int", "str"),
        vol.Optional("min"): _int,
        vol.Optional("max"): _int,
        vol.Optional("step"): vol.All(_int, vol.Range(min=1)),
        vol.Optional("unit"): _text,
        vol.Optional("default"): vol.Any(_int, str),
        vol.Optional("options"): vol.All({_int: _text}, vol.Length(min=1)),
        vol.Optional("min_length"): _uint,
        vol.Optional("max_length"): vol.All(_int, vol.Range(min=1)),
        vol.Optional("charset"): _one_of(*CHARSETS),
        vol.Optional("hw_types"): [_int],
    }
)


def _sim_entry(value: Any) -> Sim:
    if not isinstance(value, dict):
        raise vol.Invalid("expected {min, max}, {probability} or {choices}")
    keys = set(value)
    if keys == {"min", "max"}:
        low, high = _number(value["min"]), _number(value["max"])
        if low > high:
            raise vol.Invalid(f"min {low} is greater than max {high}")
        return Sim(minimum=low, maximum=high)
    if keys == {"probability"}:
        return Sim(probability=_probability(value["probability"]))
    if keys == {"choices"} and isinstance(value["choices"], list) and value["choices"]:
        return Sim(choices=tuple(value["choices"]))
    raise vol.Invalid("expected {min, max}, {probability} or {choices} (a non-empty list)")


_SIM_MAP = vol.Schema({_name: _sim_entry})

_EXAMPLE_SCHEMA = vol.Schema(
    {
        vol.Required("description"): _text,
        vol.Required("hw_type"): _int,
        vol.Required("payload"): _hex,
        vol.Exclusive("data", "outcome"): dict,
        vol.Exclusive("error", "outcome"): _text,
    }
)

# How the family's devices also appear as a Home Assistant valve (moved from the integration's
# valves.yaml; checked against the family when used: a missing field or command means no valve).
#   position:     uplink field with the opening in % (0 closed, 100 open): a valve with position
#   set_position: configuration moving the valve to a position (parameter 0-100)
#   moving_field: enum field whose values `opening` / `closing` mean the valve is moving
#   state_field:  uplink field with the opening in %: open while above 0 (valve without position)
#   open, close:  commands opening and closing the valve fully
_VALVE_SCHEMA = vol.Any(
    {
        vol.Required("position"): _name,
        vol.Required("set_position"): _name,
        vol.Optional("moving_field"): _name,
    },
    {
        vol.Required("state_field"): _name,
        vol.Required("open"): _name,
        vol.Required("close"): _name,
    },
)

_HOME_ASSISTANT_SCHEMA = vol.Schema({vol.Optional("valve"): _VALVE_SCHEMA})

FAMILY_SCHEMA = vol.Schema(
    {
        vol.Required("name"): _text,
        vol.Optional("manufacturer", default="VIDI"): _text,
        vol.Optional("description"): _text,
        vol.Required("hw_types"): vol.All({_int: _hw_type_entry}, vol.Length(min=1)),
        vol.Required("uplink"): vol.All({_int: _FIELD_SCHEMA}, vol.Length(min=1)),
        vol.Optional("entities", default=list): [_ENTITY_SCHEMA],
        vol.Optional("commands", default=dict): {_name: _COMMAND_SCHEMA},
        vol.Optional("configurations", default=dict): {_name: _CONFIGURATION_SCHEMA},
        vol.Optional("simulate", default=dict): {vol.Optional("common"): _SIM_MAP, _int: _SIM_MAP},
        vol.Optional("examples", default=list): [_EXAMPLE_SCHEMA],
        vol.Optional("home_assistant", default=dict): _HOME_ASSISTANT_SCHEMA,
    }
)
