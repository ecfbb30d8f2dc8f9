"""Turns a schema-validated family.yaml into a Family: cross-references, then compile."""

from __future__ import annotations

import math
import pathlib
import random
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from .codec import Decoder, make_decoder
from .model import Family
from .sim import Sim, make_sampler
from .spec import (
    DEFAULT_CHARSET,
    DEVICE_CLASSES,
    NUMERIC_TYPES,
    RESERVED_FIELD_NAMES,
    CommandSpec,
    EntitySpec,
    Example,
    FamilyError,
    FieldSpec,
    ParameterError,
)


class Builder:
    """Turns validated YAML into a Family; each semantic check reports its key path."""

    def __init__(self, path: pathlib.Path, domain: str, doc: dict) -> None:
        self.path, self.domain, self.doc = path, domain, doc

    def fail(self, keys: list[Any], problem: str) -> FamilyError:
        where = ".".join(str(k) for k in keys) or "(top level)"
        return FamilyError(f"{self.path}: {where}: {problem}", str(self.path), keys=tuple(keys))

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
            home_assistant=self.doc["home_assistant"],
        )
        family._by_name = by_name
        family._by_code = {c.code: c for c in commands.values()}
        decoders = {key: make_decoder(spec) for key, spec in fields.items()}
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
                        sim = Sim()
                    else:
                        raise self.fail(["simulate", hw_type], f"no simulation for field {name!r}")
                self._check_sim(at, spec, sim)
                table.append((name, make_sampler(spec, sim, decoders[spec.key])))
            samplers[hw_type] = table
        return samplers

    def _check_sim(self, at: list[Any], spec: FieldSpec, sim: Sim) -> None:
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
