"""What a family declares: field, entity and command specs, worked examples, and the errors.

Plain frozen dataclasses with no YAML or CBOR in them, so the API, the web pages and the
Home Assistant integration can use them without the loader.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import voluptuous as vol

FIELD_TYPES = ("uint", "int", "float", "bool", "enum", "bitfield", "tstr")
NUMERIC_TYPES = ("uint", "int", "float")
RESERVED_FIELD_NAMES = ("unknown", "error", "raw")
COMMAND_PARAMETER = 1  # commands carry no value; the wire parameter is always 1
# What a text parameter may hold (`charset:` in family.yaml), in the words of the refusal
# and the test. A NUL, a bidi override or a control character has no place in an APN or a
# label: devices may truncate at it and people cannot see it.
CHARSETS: dict[str, tuple[str, Callable[[str], bool]]] = {
    "printable_ascii": ("printable ASCII", lambda char: " " <= char <= "~"),
    "printable": (
        "printable characters (no control, format or line separator characters)",
        str.isprintable,
    ),
}
DEFAULT_CHARSET = "printable_ascii"

SENSOR_DEVICE_CLASSES = frozenset(  # Home Assistant device classes (2024.x)
    """
    apparent_power aqi atmospheric_pressure battery carbon_dioxide carbon_monoxide current
    data_rate data_size date distance duration energy energy_storage enum frequency gas
    humidity illuminance irradiance moisture monetary nitrogen_dioxide nitrogen_monoxide
    nitrous_oxide ozone ph pm1 pm10 pm25 power power_factor precipitation
    precipitation_intensity pressure reactive_power signal_strength sound_pressure speed
    sulphur_dioxide temperature timestamp volatile_organic_compounds
    volatile_organic_compounds_parts voltage volume volume_flow_rate volume_storage water
    weight wind_speed
    """.split()  # noqa: SIM905
)
BINARY_SENSOR_DEVICE_CLASSES = frozenset(  # Home Assistant device classes (2024.x)
    """
    battery battery_charging carbon_monoxide cold connectivity door garage_door gas heat
    light lock moisture motion moving occupancy opening plug power presence problem running
    safety smoke sound tamper update vibration window
    """.split()  # noqa: SIM905
)
DEVICE_CLASSES = {"sensor": SENSOR_DEVICE_CLASSES, "binary_sensor": BINARY_SENSOR_DEVICE_CLASSES}


class FamilyError(Exception):
    """A family YAML file is invalid; the message names the file, key path and problem.

    `file` and `line` say where to fix it (as ConfigError's do); `keys` is the key path
    the loader uses to find the line. The message keeps its `<file>: <key.path>: <problem>`
    shape, which tests and docs quote.
    """

    def __init__(
        self,
        message: str,
        file: str | None = None,
        line: int | None = None,
        keys: tuple[Any, ...] = (),
    ) -> None:
        super().__init__(message)
        self.file, self.line, self.keys = file, line, keys


class PayloadDecodeError(Exception):
    """A device payload does not decode under its family; str() is a one-line reason."""


class ParameterError(vol.Invalid, ValueError):
    """A downlink parameter is refused; usable inside voluptuous schemas and as ValueError."""


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One entry of the uplink codec: CBOR key -> named, typed, scaled value."""

    key: int
    name: str
    type: str
    scale: int | float = 1
    offset: int | float = 0
    decimals: int | None = None  # rounding of the scaled value; None = exact integers
    unit: str | None = None
    description: str | None = None
    values: dict[int, str] = field(default_factory=dict)  # enum code -> label
    bits: dict[int, str] = field(default_factory=dict)  # bit number -> name


@dataclass(frozen=True, slots=True)
class EntitySpec:
    """A Home Assistant entity fed by one field (or one bit / one enum value of it)."""

    key: str
    platform: Literal["sensor", "binary_sensor"]
    name: str
    device_class: str | None = None
    state_class: str | None = None
    unit: str | None = None
    entity_category: str | None = None
    icon: str | None = None
    bit: str | None = None  # binary_sensor on while this name is in a bitfield list
    on_value: str | None = None  # binary_sensor on while an enum field has this label
    enabled_by_default: bool = True
    options: tuple[str, ...] = ()  # enum sensor options (from the field's labels)

    @property
    def object_id(self) -> str:
        """Stable per-device id of the entity (used for unique_id)."""
        return (
            f"{self.key}_{self.bit or self.on_value}" if (self.bit or self.on_value) else self.key
        )

    def value_template(self, base: str = "value_json.data") -> str:
        """Jinja template extracting the state from the JSON document (HA discovery)."""
        ref = f"{base}.{self.key}"
        if self.bit:
            return f"{{{{ 'ON' if '{self.bit}' in ({ref} or []) else 'OFF' }}}}"
        if self.on_value:
            return f"{{{{ 'ON' if {ref} == '{self.on_value}' else 'OFF' }}}}"
        if self.platform == "binary_sensor":
            return f"{{{{ 'ON' if {ref} else 'OFF' }}}}"
        return f"{{{{ {ref} }}}}"


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """A downlink the device understands: a command (parameter 1) or a configuration."""

    name: str
    code: int
    kind: Literal["command", "configuration"]
    description: str
    type: Literal["int", "str"] = "int"
    minimum: int | None = None
    maximum: int | None = None
    step: int = 1
    unit: str | None = None
    default: int | str | None = None
    options: dict[int, str] = field(default_factory=dict)  # wire value -> label
    min_length: int | None = None
    max_length: int | None = None
    charset: str = DEFAULT_CHARSET  # type str: a key of CHARSETS
    hw_types: tuple[int, ...] = ()  # empty: every hw_type of the family

    def validate_parameter(self, value: Any) -> int | str | bytes:
        """Return the wire parameter for `value`, or raise ParameterError saying what is allowed."""
        if self.kind == "command":
            if value is None or (as_int(value) == COMMAND_PARAMETER):
                return COMMAND_PARAMETER
            raise ParameterError(
                f"{self.name} is a command: its parameter must be 1, got {value!r}"
            )
        if self.type == "str":
            if not isinstance(value, str):
                raise ParameterError(f"{self.name} must be a text, got {value!r}")
            low, high = self.min_length or 0, self.max_length
            if len(value) < low or (high is not None and len(value) > high):
                raise ParameterError(
                    f"{self.name} must be {low} to {high} characters long, got {len(value)}"
                )
            self._check_charset(value)
            return value
        if self.options:
            number = as_int(value)
            if number in self.options:
                return number
            for code, label in self.options.items():
                if value == label:
                    return code
            allowed = ", ".join(f"{code} ({label})" for code, label in self.options.items())
            raise ParameterError(f"{self.name} must be one of {allowed}, got {value!r}")
        number = as_int(value)
        if number is None:
            raise ParameterError(f"{self.name} must be an integer, got {value!r}")
        assert self.minimum is not None and self.maximum is not None
        if not self.minimum <= number <= self.maximum:
            unit = f" {self.unit}" if self.unit else ""
            raise ParameterError(
                f"{self.name} must be between {self.minimum} and {self.maximum}{unit}, got {number}"
            )
        if (number - self.minimum) % self.step:
            raise ParameterError(
                f"{self.name} must be {self.minimum} plus a multiple of {self.step}, got {number}"
            )
        return number

    def _check_charset(self, value: str) -> None:
        """ParameterError naming the first character outside the charset (1-based) and its code."""
        words, allowed = CHARSETS[self.charset]
        for position, char in enumerate(value, start=1):
            if not allowed(char):
                raise ParameterError(
                    f"{self.name}: character {position} (U+{ord(char):04X}) is not allowed; "
                    f"{self.name} accepts {words}"
                )

    def voluptuous_validator(self) -> Callable[[Any], int | str | bytes]:
        """validate_parameter for use inside a vol.Schema, keeping the precise message.

        (voluptuous replaces the text of any ValueError by "not a valid value".)
        """

        def check(value: Any) -> int | str | bytes:
            try:
                return self.validate_parameter(value)
            except ParameterError as exc:
                raise vol.Invalid(str(exc)) from None

        return check

    def parameter_schema(self) -> dict[str, Any]:
        """JSON-schema-like description of the parameter, for the API and forms."""
        schema: dict[str, Any] = {"description": self.description}
        if self.kind == "command":
            schema.update(type="integer", enum=[COMMAND_PARAMETER], default=COMMAND_PARAMETER)
            return schema
        if self.type == "str":
            schema.update(type="string", minLength=self.min_length or 0)
            if self.max_length is not None:
                schema["maxLength"] = self.max_length
            if self.charset == "printable_ascii":
                schema["pattern"] = "^[ -~]*$"
        elif self.options:
            schema.update(
                type="integer",
                enum=list(self.options),
                options=[{"value": code, "label": lab} for code, lab in self.options.items()],
            )
        else:
            schema.update(
                type="integer", minimum=self.minimum, maximum=self.maximum, step=self.step
            )
        if self.unit:
            schema["unit"] = self.unit
        if self.default is not None:
            schema["default"] = self.default
        return schema


@dataclass(frozen=True, slots=True)
class Example:
    """A worked example: payload -> expected data, or -> expected error message."""

    description: str
    hw_type: int
    payload: bytes
    data: dict[str, Any] | None = None
    error: str | None = None


def as_int(value: Any) -> int | None:
    """Integers as they come from JSON or forms (5, 5.0, "5"); None when not an integer."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    return None
