"""load_family: read family.yaml strictly, validate it against the schema, build the Family.

The YAML loader is the family's own (not driver_core.yaml_loader's): it refuses duplicate
keys with the messages family authors know, and resolves ``!include`` while composing, so
that shared blocks (custom_components/vidi_common/) work inside a YAML merge
(``<<: !include file.yaml``) and are spliced into a list (``- !include file.yaml``).
The composed node tree is kept to name the file and line of a later schema or build error.
"""

from __future__ import annotations

import pathlib
from collections.abc import Hashable
from typing import Any

import voluptuous as vol
import yaml

from .builder import Builder
from .model import Family
from .schema import FAMILY_SCHEMA
from .spec import FamilyError

INCLUDE_TAG = "!include"


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one).

    ``!include <path>`` (relative to the including file) is replaced by the included
    file's node tree; inside a list, an included list is spliced in item by item.
    """

    def __init__(
        self, stream: str, file: pathlib.Path | None = None, stack: tuple[pathlib.Path, ...] = ()
    ) -> None:
        super().__init__(stream)
        self.file = file
        self.stack = (*stack, file.resolve()) if file is not None else stack
        if file is not None:
            self.name = str(file)  # the file marks (and so errors) name

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        node = super().compose_node(parent, index)
        if isinstance(node, yaml.ScalarNode) and node.tag == INCLUDE_TAG:
            node = self._include(node)
            if isinstance(parent, yaml.SequenceNode) and isinstance(node, yaml.SequenceNode):
                node.splice = True  # type: ignore[attr-defined]
        return node

    def compose_sequence_node(self, anchor: str | None) -> yaml.SequenceNode:
        node = super().compose_sequence_node(anchor)
        if any(getattr(item, "splice", False) for item in node.value):
            node.value = [
                part
                for item in node.value
                for part in (item.value if getattr(item, "splice", False) else [item])
            ]
        return node

    def _include(self, node: yaml.ScalarNode) -> yaml.Node:
        def fail(problem: str) -> yaml.MarkedYAMLError:
            return yaml.composer.ComposerError(None, None, problem, node.start_mark)

        if self.file is None or not node.value:
            raise fail("!include needs a file name next to a family.yaml")
        target = (self.file.parent / node.value).resolve()
        if target in self.stack:
            raise fail(f"!include {node.value} includes itself (directly or indirectly)")
        try:
            text = target.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise fail(f"!include {node.value}: cannot read {target}: {exc}") from None
        loader = StrictLoader(text, target, self.stack)
        try:
            root = loader.get_single_node()
        finally:
            loader.dispose()
        if root is None:
            raise fail(f"!include {node.value}: {target} is empty")
        return root


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
    loader = StrictLoader(text, path)
    try:
        root = loader.get_single_node()
        doc = loader.construct_document(root) if root is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = mark.name if mark is not None and mark.name != file else file
        line = f"line {mark.line + 1}: " if mark else ""
        raise FamilyError(
            f"{where}: {line}{exc.problem or exc.context}", where, mark.line + 1 if mark else None
        ) from None
    except yaml.YAMLError as exc:
        raise FamilyError(f"{path}: invalid YAML: {exc}", file) from None
    finally:
        loader.dispose()
    if not isinstance(doc, dict):
        raise FamilyError(
            f"{path}: (top level): expected a mapping, got {type(doc).__name__}", file, 1
        )
    try:
        return Builder(path, domain, _validate(path, doc)).build()
    except FamilyError as exc:
        exc.file, exc.line = _locate(loader, root, exc.keys)
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


def _locate(loader: StrictLoader, node: yaml.Node, keys: tuple[Any, ...]) -> tuple[str, int]:
    """File and line of the deepest part of `keys` in the composed (merged, spliced) tree."""
    mark = node.start_mark
    for key in keys:
        if isinstance(node, yaml.MappingNode):
            found = next(
                (
                    (key_node, value)
                    for key_node, value in node.value
                    if isinstance(key_node, yaml.ScalarNode)
                    and loader.construct_object(key_node) == key
                ),
                None,
            )
            if found is None:
                break
            mark, node = found[0].start_mark, found[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and 0 <= key < len(node.value):
            node = node.value[key]
            mark = node.start_mark
        else:
            break
    return mark.name, mark.line + 1
