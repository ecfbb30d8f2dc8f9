"""load_family: read family.yaml strictly, validate it against the schema, build the Family."""

from __future__ import annotations

import pathlib
from collections.abc import Hashable
from typing import Any

import voluptuous as vol
import yaml

from ..yaml_loader import YamlError, load_yaml, locate
from .builder import Builder
from .model import Family
from .schema import FAMILY_SCHEMA
from .spec import FamilyError


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
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


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_family(component_dir: pathlib.Path, domain: str) -> Family:
    """Read, validate and compile ``component_dir/family.yaml``; raises FamilyError."""
    path = pathlib.Path(component_dir) / "family.yaml"
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FamilyError(f"{path}: file not found", file) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FamilyError(f"{path}: cannot read: {exc}", file) from None
    try:
        doc = yaml.load(text, Loader=StrictLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f"line {mark.line + 1}: " if mark else ""
        raise FamilyError(
            f"{path}: {line}{exc.problem or exc.context}", file, mark.line + 1 if mark else None
        ) from None
    except yaml.YAMLError as exc:
        raise FamilyError(f"{path}: invalid YAML: {exc}", file) from None
    if not isinstance(doc, dict):
        raise FamilyError(
            f"{path}: (top level): expected a mapping, got {type(doc).__name__}", file, 1
        )
    try:
        return Builder(path, domain, _validate(path, doc)).build()
    except FamilyError as exc:
        exc.line = _line_of(path, exc.keys)
        raise


def _validate(path: pathlib.Path, doc: dict) -> dict:
    """The schema-checked document; FamilyError lists every problem, keyed by the first."""
    try:
        return FAMILY_SCHEMA(doc)
    except vol.MultipleInvalid as exc:
        problems = sorted(
            (
                (f"{'.'.join(str(k) for k in err.path) or '(top level)'}: {err.msg}", err.path)
                for err in exc.errors
            ),
            key=lambda problem: problem[0],
        )
        raise FamilyError(
            f"{path}: {'; '.join(message for message, _ in problems)}",
            str(path),
            keys=tuple(getattr(k, "schema", k) for k in problems[0][1]),
        ) from None


def _line_of(path: pathlib.Path, keys: tuple[Any, ...]) -> int | None:
    """Line of the deepest part of `keys` in the file, found with the configuration's loader.

    Only runs on the error path: the strict loader above keeps the messages people know,
    and yaml_loader's line-aware mappings (with `locate`) supply the line.
    """
    try:
        raw = load_yaml(path)
    except YamlError:
        return None
    return locate(raw, keys)[1]
