"""The loaded Family: its specs plus the compiled decoders and samplers."""

from __future__ import annotations

import pathlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cbor2

from .codec import Decoder, encode_value, jsonable, load_map
from .spec import CommandSpec, EntitySpec, Example, FieldSpec, PayloadDecodeError


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
    home_assistant: dict[str, Any] = field(default_factory=dict)  # e.g. valve: {position: ...}
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
        for key, raw in load_map(payload).items():
            entry = table.get(key)
            if entry is not None and type(key) is int:
                data[entry[0]] = entry[1](raw)
            else:
                if unknown is None:
                    unknown = {}
                unknown[str(key)] = jsonable(raw)
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
            raw[spec.key] = encode_value(spec, value)
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
