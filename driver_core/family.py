"""Device families declared in YAML: load, validate, and run their codec.

A family (``custom_components/<domain>/family.yaml``) is pure data: the hw_types it
covers, the CBOR map its devices POST to ``/rx``, the Home Assistant entities, the
downlink commands and configurations, simulation ranges and worked examples.
Everything is checked once at load time (a bad file fails loudly with its key path)
and the codec is compiled into small per-key closures, because ``decode`` runs for
every uplink. See docs/families.md for the file format.
"""

from __future__ import annotations

import io
import math
import pathlib
import random
import re
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

import cbor2
import voluptuous as vol
import yaml

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
    """A family YAML file is invalid; the message names the file, key path and problem."""


class PayloadDecodeError(Exception):
    """A device payload does not decode under its family; str() is a one-line reason."""


class ParameterError(vol.Invalid, ValueError):
    """A downlink parameter is refused; usable inside voluptuous schemas and as ValueError."""


# --------------------------------------------------------------------------- specs


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
            if value is None or (_as_int(value) == COMMAND_PARAMETER):
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
            number = _as_int(value)
            if number in self.options:
                return number
            for code, label in self.options.items():
                if value == label:
                    return code
            allowed = ", ".join(f"{code} ({label})" for code, label in self.options.items())
            raise ParameterError(f"{self.name} must be one of {allowed}, got {value!r}")
        number = _as_int(value)
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


def _as_int(value: Any) -> int | None:
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


# --------------------------------------------------------------------------- payload helpers


def _describe(value: Any) -> str:
    """Short human description of a decoded CBOR item, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value!r}"
    if isinstance(value, str):
        text = value if len(value) <= 20 else value[:20] + "…"
        return f"text string {text!r}"
    if isinstance(value, bytes | bytearray):
        return f"byte string h'{bytes(value[:16]).hex()}{'…' if len(value) > 16 else ''}'"
    if isinstance(value, list | tuple):
        return f"array of {len(value)} item{'' if len(value) == 1 else 's'}"
    if isinstance(value, dict):
        return f"map of {len(value)} entr{'y' if len(value) == 1 else 'ies'}"
    if value is cbor2.undefined:
        return "undefined"
    if isinstance(value, cbor2.CBORTag):
        return f"tag {value.tag}"
    return type(value).__name__


def _jsonable(value: Any) -> Any:
    """Make an arbitrary decoded CBOR item JSON-serialisable (for `unknown` keys)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, bytes | bytearray):
        return bytes(value).hex()
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, cbor2.CBORTag):
        return {"tag": value.tag, "value": _jsonable(value.value)}
    if value is cbor2.undefined:
        return None
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def _load_map(payload: bytes) -> dict:
    """Decode exactly one CBOR map from `payload`, or raise PayloadDecodeError."""
    if not payload:
        raise PayloadDecodeError("empty payload, expected a CBOR map")
    stream = io.BytesIO(payload)
    try:
        obj = cbor2.CBORDecoder(stream).decode()
    except cbor2.CBORDecodeEOF:
        raise PayloadDecodeError(
            f"truncated CBOR: the {len(payload)}-byte payload ends inside a data item"
        ) from None
    except Exception as exc:  # cbor2 raises several kinds on garbage; all mean the same
        raise PayloadDecodeError(f"invalid CBOR: {exc}") from None
    if type(obj) is not dict:
        raise PayloadDecodeError(f"expected a CBOR map, got {_describe(obj)}")
    extra = len(payload) - stream.tell()
    if extra:
        raise PayloadDecodeError(
            f"{extra} unexpected byte{'s' if extra > 1 else ''} after the CBOR map"
        )
    return obj


# --------------------------------------------------------------------------- codec compile

Decoder = Callable[[Any], Any]


def _mismatch(spec: FieldSpec, expected: str, value: Any) -> PayloadDecodeError:
    return PayloadDecodeError(
        f"key {spec.key} ({spec.name}): expected {expected}, got {_describe(value)}"
    )


def _output_is_int(spec: FieldSpec) -> bool:
    return (
        spec.type in ("uint", "int")
        and spec.decimals is None
        and float(spec.scale).is_integer()
        and float(spec.offset).is_integer()
    )


def _make_decoder(spec: FieldSpec) -> Decoder:
    """A closure turning one raw CBOR value into the published value (None stays None)."""
    scale, offset, digits = spec.scale, spec.offset, spec.decimals
    kind = spec.type
    if kind in ("uint", "int"):
        signed = kind == "int"
        expected = "an integer" if signed else "an unsigned integer"
        as_int = _output_is_int(spec)
        iscale, ioffset = int(scale), int(offset)

        def dec_integer(v: Any) -> Any:
            if type(v) is int and (signed or v >= 0):
                if as_int:
                    return v * iscale + ioffset
                return round(v * scale + offset, digits)
            if v is None:
                return None
            raise _mismatch(spec, expected, v)

        return dec_integer
    if kind == "float":

        def dec_float(v: Any) -> Any:
            if type(v) is float or type(v) is int:
                if not math.isfinite(v):
                    return None
                value = v * scale + offset
                return float(value) if digits is None else round(value, digits)
            if v is None:
                return None
            raise _mismatch(spec, "a number", v)

        return dec_float
    if kind == "bool":

        def dec_bool(v: Any) -> Any:
            if type(v) is bool or v is None:
                return v
            raise _mismatch(spec, "true or false", v)

        return dec_bool
    if kind == "enum":
        labels = dict(spec.values)
        allowed = ", ".join(f"{code} ({label})" for code, label in labels.items())

        def dec_enum(v: Any) -> Any:
            if type(v) is int:
                label = labels.get(v)
                if label is not None:
                    return label
                raise PayloadDecodeError(
                    f"key {spec.key} ({spec.name}): unknown value {v}, expected one of {allowed}"
                )
            if v is None:
                return None
            raise _mismatch(spec, "an enum code (unsigned integer)", v)

        return dec_enum
    if kind == "bitfield":
        named = [(1 << bit, name) for bit, name in sorted(spec.bits.items())]
        known_mask = sum(mask for mask, _ in named)

        def dec_bits(v: Any) -> Any:
            if type(v) is int and v >= 0:
                active = [name for mask, name in named if v & mask]
                rest = v & ~known_mask
                if rest:
                    active.extend(f"bit{n}" for n in range(rest.bit_length()) if rest >> n & 1)
                return active
            if v is None:
                return None
            raise _mismatch(spec, "a bitfield (unsigned integer)", v)

        return dec_bits
    # tstr

    def dec_text(v: Any) -> Any:
        if type(v) is str or v is None:
            return v
        raise _mismatch(spec, "a text string", v)

    return dec_text


def _encode_value(spec: FieldSpec, value: Any) -> Any:
    """Inverse of the decoder: published value -> raw CBOR value (for the simulator)."""
    if value is None:
        return None
    where = f"field {spec.name!r}"
    kind = spec.type
    if kind in NUMERIC_TYPES:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        raw = (value - spec.offset) / spec.scale
        if kind == "float":
            return float(raw)
        raw = round(raw)
        if kind == "uint" and raw < 0:
            raise ValueError(f"{where}: {value} is below the smallest encodable value")
        return raw
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    if kind == "enum":
        for code, label in spec.values.items():
            if label == value:
                return code
        raise ValueError(f"{where}: {value!r} is not one of {', '.join(spec.values.values())}")
    if kind == "bitfield":
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where}: expected a list of bit names, got {value!r}")
        by_name = {name: bit for bit, name in spec.bits.items()}
        raw = 0
        for name in value:
            match = re.fullmatch(r"bit(\d+)", name) if isinstance(name, str) else None
            bit = by_name.get(name, int(match.group(1)) if match else None)
            if bit is None:
                raise ValueError(f"{where}: unknown bit name {name!r}")
            raw |= 1 << bit
        return raw
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a text, got {value!r}")
    return value


# --------------------------------------------------------------------------- simulation


@dataclass(frozen=True, slots=True)
class _Sim:
    """How to draw one field's value: a numeric range, a probability or choices."""

    minimum: float | None = None
    maximum: float | None = None
    probability: float | None = None
    choices: tuple[Any, ...] = ()


def _make_sampler(spec: FieldSpec, sim: _Sim, decoder: Decoder) -> Callable[[random.Random], Any]:
    """Sampling closure producing values exactly as decode() would publish them."""
    kind = spec.type
    if kind in ("uint", "int"):
        assert sim.minimum is not None and sim.maximum is not None
        low = math.ceil((sim.minimum - spec.offset) / spec.scale - 1e-9)
        high = math.floor((sim.maximum - spec.offset) / spec.scale + 1e-9)
        if kind == "uint":
            low = max(low, 0)
        return lambda rng: decoder(rng.randint(low, high))
    if kind == "float":
        digits = spec.decimals if spec.decimals is not None else 3
        lo, hi = sim.minimum, sim.maximum
        return lambda rng: decoder(_encode_value(spec, round(rng.uniform(lo, hi), digits)))
    if kind == "bool":
        p = sim.probability or 0.0
        return lambda rng: rng.random() < p
    if kind == "bitfield":
        p = sim.probability or 0.0
        names = [name for _, name in sorted(spec.bits.items())]
        return lambda rng: [name for name in names if rng.random() < p]
    choices = sim.choices or tuple(spec.values.values())
    return lambda rng: rng.choice(choices)


# --------------------------------------------------------------------------- family


@dataclass(slots=True)
class Family:
    """A loaded, validated device family with its compiled codec."""

    domain: str
    name: str
    manufacturer: str
    hw_types: dict[int, str]
    fields: dict[int, FieldSpec]  # CBOR key -> field (whole family)
    hw_fields: dict[int, tuple[str, ...]]  # hw_type -> names of the fields it sends
    commands: dict[str, CommandSpec]  # commands and configurations, by name
    entities: list[EntitySpec]
    examples: list[Example]
    path: pathlib.Path | None = None
    _decoders: dict[int, dict[int, tuple[str, Decoder]]] = field(default_factory=dict, repr=False)
    _by_name: dict[str, FieldSpec] = field(default_factory=dict, repr=False)
    _by_code: dict[int, CommandSpec] = field(default_factory=dict, repr=False)
    _samplers: dict[int, list[tuple[str, Callable[[random.Random], Any]]]] = field(
        default_factory=dict, repr=False
    )

    def decode(self, hw_type: int, payload: bytes) -> dict[str, Any]:
        """CBOR map from /rx -> JSON-serialisable `data`; raises PayloadDecodeError."""
        table = self._decoders.get(hw_type)
        if table is None:
            raise PayloadDecodeError(f"hw_type {hw_type} is not part of the {self.name} family")
        data: dict[str, Any] = {}
        unknown: dict[str, Any] | None = None
        for key, raw in _load_map(payload).items():
            entry = table.get(key)
            if entry is not None and type(key) is int:
                data[entry[0]] = entry[1](raw)
            else:
                if unknown is None:
                    unknown = {}
                unknown[str(key)] = _jsonable(raw)
        if unknown is not None:
            data["unknown"] = unknown
        return data

    def encode(self, hw_type: int, values: dict[str, Any]) -> bytes:
        """Inverse of decode (used by the simulator); raises ValueError on bad values."""
        if hw_type not in self.hw_types:
            raise ValueError(f"hw_type {hw_type} is not part of the {self.name} family")
        allowed = self.hw_fields[hw_type]
        raw: dict[Any, Any] = {}
        for name, value in values.items():
            if name == "unknown":
                for key, item in value.items():
                    raw[int(key) if re.fullmatch(r"-?\d+", str(key)) else key] = item
                continue
            if name not in allowed:
                raise ValueError(
                    f"field {name!r} is not sent by hw_type {hw_type} ({self.hw_types[hw_type]})"
                )
            spec = self._by_name[name]
            raw[spec.key] = _encode_value(spec, value)
        return cbor2.dumps(raw)

    def sample_values(self, hw_type: int, rng: random.Random) -> dict[str, Any]:
        """Plausible published values for every field of `hw_type` (simulator input)."""
        samplers = self._samplers.get(hw_type)
        if samplers is None:
            raise ValueError(f"hw_type {hw_type} is not part of the {self.name} family")
        return {name: sample(rng) for name, sample in samplers}

    def command_by_code(self, code: int) -> CommandSpec | None:
        return self._by_code.get(code)

    def get_field(self, name: str) -> FieldSpec | None:
        return self._by_name.get(name)

    def fields_for(self, hw_type: int) -> list[FieldSpec]:
        return [self._by_name[name] for name in self.hw_fields.get(hw_type, ())]

    def entities_for(self, hw_type: int) -> list[EntitySpec]:
        sent = set(self.hw_fields.get(hw_type, ()))
        return [entity for entity in self.entities if entity.key in sent]

    def commands_for(self, hw_type: int) -> list[CommandSpec]:
        return [c for c in self.commands.values() if not c.hw_types or hw_type in c.hw_types]


# --------------------------------------------------------------------------- YAML + schema


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, Hashable):
            continue  # construct_mapping below reports unhashable keys itself
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


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


def _sim_entry(value: Any) -> _Sim:
    if not isinstance(value, dict):
        raise vol.Invalid("expected {min, max}, {probability} or {choices}")
    keys = set(value)
    if keys == {"min", "max"}:
        low, high = _number(value["min"]), _number(value["max"])
        if low > high:
            raise vol.Invalid(f"min {low} is greater than max {high}")
        return _Sim(minimum=low, maximum=high)
    if keys == {"probability"}:
        return _Sim(probability=_probability(value["probability"]))
    if keys == {"choices"} and isinstance(value["choices"], list) and value["choices"]:
        return _Sim(choices=tuple(value["choices"]))
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

_FAMILY_SCHEMA = vol.Schema(
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
    }
)


# --------------------------------------------------------------------------- loading


class _Builder:
    """Turns validated YAML into a Family; each semantic check reports its key path."""

    def __init__(self, path: pathlib.Path, domain: str, doc: dict) -> None:
        self.path, self.domain, self.doc = path, domain, doc

    def fail(self, keys: list[Any], problem: str) -> FamilyError:
        where = ".".join(str(k) for k in keys) or "(top level)"
        return FamilyError(f"{self.path}: {where}: {problem}")

    def build(self) -> Family:
        fields = self._fields()
        by_name = {spec.name: spec for spec in fields.values()}
        hw_types, hw_fields = self._hw_types(by_name)
        commands = self._commands(hw_types)
        entities = self._entities(by_name)
        examples = self._examples(hw_types)
        family = Family(
            domain=self.domain,
            name=self.doc["name"],
            manufacturer=self.doc["manufacturer"],
            hw_types=hw_types,
            fields=fields,
            hw_fields=hw_fields,
            commands=commands,
            entities=entities,
            examples=examples,
            path=self.path,
        )
        family._by_name = by_name
        family._by_code = {c.code: c for c in commands.values()}
        decoders = {key: _make_decoder(spec) for key, spec in fields.items()}
        for hw_type, names in hw_fields.items():
            family._decoders[hw_type] = {
                by_name[n].key: (n, decoders[by_name[n].key]) for n in names
            }
        family._samplers = self._samplers(hw_fields, by_name, decoders)
        return family

    def _fields(self) -> dict[int, FieldSpec]:
        fields: dict[int, FieldSpec] = {}
        owner: dict[str, int] = {}
        for key, raw in self.doc["uplink"].items():
            at = ["uplink", key]
            name, kind = raw["name"], raw["type"]
            if name in RESERVED_FIELD_NAMES:
                raise self.fail([*at, "name"], f"{name!r} is reserved")
            if name in owner:
                raise self.fail([*at, "name"], f"{name!r} is already used by uplink.{owner[name]}")
            owner[name] = key
            for option, allowed in (
                ("scale", NUMERIC_TYPES),
                ("offset", NUMERIC_TYPES),
                ("decimals", NUMERIC_TYPES),
                ("values", ("enum",)),
                ("bits", ("bitfield",)),
            ):
                if option in raw and kind not in allowed:
                    raise self.fail([*at, option], f"not allowed for type {kind}")
            if kind == "enum" and "values" not in raw:
                raise self.fail([*at, "values"], "required for type enum")
            if kind == "bitfield" and "bits" not in raw:
                raise self.fail([*at, "bits"], "required for type bitfield")
            scale, offset = raw.get("scale", 1), raw.get("offset", 0)
            decimals = raw.get("decimals")
            if decimals is None and kind in NUMERIC_TYPES:
                decimals = max(_decimal_places(scale), _decimal_places(offset)) or None
            fields[key] = FieldSpec(
                key=key,
                name=name,
                type=kind,
                scale=scale,
                offset=offset,
                decimals=decimals,
                unit=raw.get("unit"),
                description=raw.get("description"),
                values=raw.get("values", {}),
                bits=raw.get("bits", {}),
            )
        return fields

    def _hw_types(
        self, by_name: dict[str, FieldSpec]
    ) -> tuple[dict[int, str], dict[int, tuple[str, ...]]]:
        hw_types: dict[int, str] = {}
        hw_fields: dict[int, tuple[str, ...]] = {}
        everything = tuple(sorted(by_name, key=lambda n: by_name[n].key))
        for hw_type, entry in self.doc["hw_types"].items():
            hw_types[hw_type] = entry["description"]
            names = entry.get("fields")
            if names is None:
                hw_fields[hw_type] = everything
                continue
            for index, name in enumerate(names):
                if name not in by_name:
                    raise self.fail(
                        ["hw_types", hw_type, "fields", index], f"no uplink field named {name!r}"
                    )
            if len(set(names)) != len(names):
                raise self.fail(["hw_types", hw_type, "fields"], "lists a field twice")
            hw_fields[hw_type] = tuple(sorted(names, key=lambda n: by_name[n].key))
        return hw_types, hw_fields

    def _commands(self, hw_types: dict[int, str]) -> dict[str, CommandSpec]:
        commands: dict[str, CommandSpec] = {}
        code_owner: dict[int, str] = {}
        for section in ("commands", "configurations"):
            for name, raw in self.doc[section].items():
                at = [section, name]
                if name in commands:
                    raise self.fail(at, f"{name!r} is already declared as a command")
                if raw["code"] in code_owner:
                    raise self.fail(
                        [*at, "code"],
                        f"code {raw['code']} is already used by {code_owner[raw['code']]}",
                    )
                code_owner[raw["code"]] = f"{section}.{name}"
                for index, hw_type in enumerate(raw.get("hw_types", ())):
                    if hw_type not in hw_types:
                        raise self.fail([*at, "hw_types", index], f"unknown hw_type {hw_type}")
                common = {
                    "name": name,
                    "code": raw["code"],
                    "description": raw["description"],
                    "hw_types": tuple(raw.get("hw_types", ())),
                }
                if section == "commands":
                    commands[name] = CommandSpec(kind="command", **common)
                else:
                    commands[name] = self._configuration(at, raw, common)
        return commands

    def _configuration(self, at: list[Any], raw: dict, common: dict) -> CommandSpec:
        kind = raw["type"]
        allowed = {
            "int": {"options", "min", "max", "step", "unit", "default"},
            "str": {"min_length", "max_length", "charset", "default"},
        }[kind]
        for option in (
            "options", "min", "max", "step", "min_length", "max_length", "charset", "unit"
        ):
            if option in raw and option not in allowed:
                raise self.fail([*at, option], f"not allowed for type {kind}")
        if kind == "str":
            if "max_length" not in raw:
                raise self.fail([*at, "max_length"], "required for type str")
            spec = CommandSpec(
                kind="configuration",
                type="str",
                min_length=raw.get("min_length", 0),
                max_length=raw["max_length"],
                charset=raw.get("charset", DEFAULT_CHARSET),
                default=raw.get("default"),
                **common,
            )
        elif "options" in raw:
            for option in ("min", "max", "step"):
                if option in raw:
                    raise self.fail([*at, option], "not allowed together with options")
            spec = CommandSpec(
                kind="configuration",
                options=dict(raw["options"]),
                unit=raw.get("unit"),
                default=raw.get("default"),
                **common,
            )
        else:
            for option in ("min", "max"):
                if option not in raw:
                    raise self.fail([*at, option], "required for type int (or give options)")
            if raw["min"] > raw["max"]:
                raise self.fail([*at, "min"], f"{raw['min']} is greater than max {raw['max']}")
            spec = CommandSpec(
                kind="configuration",
                minimum=raw["min"],
                maximum=raw["max"],
                step=raw.get("step", 1),
                unit=raw.get("unit"),
                default=raw.get("default"),
                **common,
            )
        if spec.default is not None:
            try:
                spec.validate_parameter(spec.default)
            except ParameterError as exc:
                raise self.fail([*at, "default"], str(exc)) from None
        return spec

    def _entities(self, by_name: dict[str, FieldSpec]) -> list[EntitySpec]:
        entities: list[EntitySpec] = []
        seen: dict[str, int] = {}
        for index, raw in enumerate(self.doc["entities"]):
            at = ["entities", index]
            spec = by_name.get(raw["key"])
            if spec is None:
                raise self.fail([*at, "key"], f"no uplink field named {raw['key']!r}")
            platform = raw["platform"]
            device_class = raw.get("device_class")
            if device_class is not None and device_class not in DEVICE_CLASSES[platform]:
                raise self.fail(
                    [*at, "device_class"], f"{device_class!r} is not a {platform} device class"
                )
            bit, on_value = raw.get("bit"), raw.get("on_value")
            if bit is not None and (spec.type != "bitfield" or bit not in spec.bits.values()):
                raise self.fail([*at, "bit"], f"{bit!r} is not a bit of field {spec.name!r}")
            if on_value is not None and (
                spec.type != "enum" or on_value not in spec.values.values()
            ):
                raise self.fail(
                    [*at, "on_value"], f"{on_value!r} is not a value of field {spec.name!r}"
                )
            if platform == "binary_sensor":
                if spec.type != "bool" and bit is None and on_value is None:
                    raise self.fail(
                        [*at, "platform"],
                        f"binary_sensor needs a bool field, a bit or an on_value ({spec.name!r} is {spec.type})",
                    )
                if "state_class" in raw or "unit" in raw:
                    bad = "state_class" if "state_class" in raw else "unit"
                    raise self.fail([*at, bad], "not allowed for a binary_sensor")
            elif bit is not None or on_value is not None:
                raise self.fail([*at, "bit" if bit else "on_value"], "only for a binary_sensor")
            entity = EntitySpec(
                key=spec.name,
                platform=platform,
                name=raw.get("name") or spec.name.replace("_", " ").capitalize(),
                device_class=device_class,
                state_class=raw.get("state_class"),
                unit=raw.get("unit", spec.unit if platform == "sensor" else None),
                entity_category=raw.get("entity_category"),
                icon=raw.get("icon"),
                bit=bit,
                on_value=on_value,
                enabled_by_default=raw.get("enabled_by_default", True),
                options=tuple(spec.values.values()) if device_class == "enum" else (),
            )
            if entity.object_id in seen:
                raise self.fail(at, f"same entity as entities.{seen[entity.object_id]}")
            seen[entity.object_id] = index
            entities.append(entity)
        return entities

    def _examples(self, hw_types: dict[int, str]) -> list[Example]:
        examples = []
        for index, raw in enumerate(self.doc["examples"]):
            at = ["examples", index]
            if raw["hw_type"] not in hw_types:
                raise self.fail([*at, "hw_type"], f"unknown hw_type {raw['hw_type']}")
            if "data" not in raw and "error" not in raw:
                raise self.fail(at, "needs either data or error")
            examples.append(
                Example(
                    description=raw["description"],
                    hw_type=raw["hw_type"],
                    payload=raw["payload"],
                    data=raw.get("data"),
                    error=raw.get("error"),
                )
            )
        return examples

    def _samplers(
        self,
        hw_fields: dict[int, tuple[str, ...]],
        by_name: dict[str, FieldSpec],
        decoders: dict[int, Decoder],
    ) -> dict[int, list[tuple[str, Callable[[random.Random], Any]]]]:
        simulate = self.doc["simulate"]
        common = simulate.get("common", {})
        for name in common:
            if name not in by_name:
                raise self.fail(["simulate", "common", name], f"no uplink field named {name!r}")
        for hw_type in simulate:
            if hw_type != "common" and hw_type not in hw_fields:
                raise self.fail(["simulate", hw_type], f"unknown hw_type {hw_type}")
        samplers = {}
        for hw_type, names in hw_fields.items():
            own = simulate.get(hw_type, {})
            for name in own:
                if name not in names:
                    raise self.fail(
                        ["simulate", hw_type, name], f"hw_type {hw_type} does not send {name!r}"
                    )
            table = []
            for name in names:
                spec = by_name[name]
                at = ["simulate", hw_type if name in own else "common", name]
                sim = own.get(name) or common.get(name)
                if sim is None:
                    if spec.type in ("bool", "bitfield", "enum"):
                        sim = _Sim()
                    else:
                        raise self.fail(["simulate", hw_type], f"no simulation for field {name!r}")
                self._check_sim(at, spec, sim)
                table.append((name, _make_sampler(spec, sim, decoders[spec.key])))
            samplers[hw_type] = table
        return samplers

    def _check_sim(self, at: list[Any], spec: FieldSpec, sim: _Sim) -> None:
        if spec.type in NUMERIC_TYPES:
            if sim.minimum is None:
                raise self.fail(at, f"field of type {spec.type} needs {{min, max}}")
            if spec.type != "float":
                low = math.ceil((sim.minimum - spec.offset) / spec.scale - 1e-9)
                high = math.floor((sim.maximum - spec.offset) / spec.scale + 1e-9)
                if (spec.type == "uint" and high < 0) or low > high:
                    raise self.fail(at, "the range holds no encodable value")
        elif spec.type in ("bool", "bitfield"):
            if sim.minimum is not None or sim.choices:
                raise self.fail(at, f"field of type {spec.type} needs {{probability}}")
        else:
            if sim.minimum is not None or sim.probability is not None:
                raise self.fail(at, f"field of type {spec.type} needs {{choices}}")
            if spec.type == "enum":
                for choice in sim.choices:
                    if choice not in spec.values.values():
                        raise self.fail(at, f"{choice!r} is not a value of {spec.name!r}")
            elif not all(isinstance(choice, str) for choice in sim.choices):
                raise self.fail(at, "choices must be texts")


def _decimal_places(number: int | float) -> int:
    exponent = Decimal(repr(number)).normalize().as_tuple().exponent
    return max(0, -exponent) if isinstance(exponent, int) else 0


def load_family(component_dir: pathlib.Path, domain: str) -> Family:
    """Read, validate and compile ``component_dir/family.yaml``; raises FamilyError."""
    path = pathlib.Path(component_dir) / "family.yaml"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FamilyError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FamilyError(f"{path}: cannot read: {exc}") from None
    try:
        doc = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f"line {mark.line + 1}: " if mark else ""
        raise FamilyError(f"{path}: {line}{exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise FamilyError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise FamilyError(f"{path}: (top level): expected a mapping, got {type(doc).__name__}")
    try:
        doc = _FAMILY_SCHEMA(doc)
    except vol.MultipleInvalid as exc:
        problems = sorted(
            f"{'.'.join(str(k) for k in err.path) or '(top level)'}: {err.msg}"
            for err in exc.errors
        )
        raise FamilyError(f"{path}: {'; '.join(problems)}") from None
    return _Builder(path, domain, doc).build()
