"""The uplink codec: CBOR map -> published values, compiled into per-key closures.

``decode`` runs for every uplink, so each field gets a small closure built once at load
time; the encoder is its inverse, for the simulator.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable
from typing import Any

import cbor2

from .spec import NUMERIC_TYPES, FieldSpec, PayloadDecodeError


def describe(value: Any) -> str:
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


def jsonable(value: Any) -> Any:
    """Make an arbitrary decoded CBOR item JSON-serialisable (for `unknown` keys)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, bytes | bytearray):
        return bytes(value).hex()
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, cbor2.CBORTag):
        return {"tag": value.tag, "value": jsonable(value.value)}
    if value is cbor2.undefined:
        return None
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def load_map(payload: bytes) -> dict:
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
        raise PayloadDecodeError(f"expected a CBOR map, got {describe(obj)}")
    extra = len(payload) - stream.tell()
    if extra:
        raise PayloadDecodeError(
            f"{extra} unexpected byte{'s' if extra > 1 else ''} after the CBOR map"
        )
    return obj


Decoder = Callable[[Any], Any]


def _mismatch(spec: FieldSpec, expected: str, value: Any) -> PayloadDecodeError:
    return PayloadDecodeError(
        f"key {spec.key} ({spec.name}): expected {expected}, got {describe(value)}"
    )


def _output_is_int(spec: FieldSpec) -> bool:
    return (
        spec.type in ("uint", "int")
        and spec.decimals is None
        and float(spec.scale).is_integer()
        and float(spec.offset).is_integer()
    )


def make_decoder(spec: FieldSpec) -> Decoder:
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


def encode_value(spec: FieldSpec, value: Any) -> Any:
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
