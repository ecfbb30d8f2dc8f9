"""Safe YAML loading for the configuration directory.

Adds the two tags users know from Home Assistant, `!secret name` and
`!include file.yaml`, and remembers where every key came from (file and
line), so a validation error far from the parser can still point at the line
the user has to fix. Plain `yaml.safe_load` loses that information.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import yaml

SECRETS_FILE = "secrets.yaml"

Location = tuple[str, int]


class YamlError(Exception):
    """A file could not be read as YAML; `str()` is one line: `<file>:<line>: <problem>`."""

    def __init__(self, problem: str, file: str | Path | None = None, line: int | None = None):
        self.problem = problem
        self.file = str(file) if file is not None else None
        self.line = line
        super().__init__(format_location(self.file, line, problem))


def format_location(file: str | None, line: int | None, *parts: str) -> str:
    """`file:line: part: part` - the shape editors and terminals recognise."""
    head = []
    if file is not None:
        head.append(f"{file}:{line}" if line else file)
    return ": ".join([*head, *parts])


class LineDict(dict):
    """A dict that knows the file and line of itself and of each of its keys."""

    file: str | None = None
    line: int | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.key_lines: dict[Any, Location] = {}


class LineList(list):
    """A list that knows the file and line of itself and of each item."""

    file: str | None = None
    line: int | None = None

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.item_lines: list[Location] = []


class _Loader(yaml.SafeLoader):
    """SafeLoader with marks, duplicate-key detection, !secret and !include."""

    def __init__(self, stream: str, file: Path, context: _LoadContext) -> None:
        super().__init__(stream)
        self.file = file
        self.context = context

    def line_of(self, node: yaml.Node) -> int:
        return node.start_mark.line + 1

    def fail(self, node: yaml.Node, problem: str) -> YamlError:
        return YamlError(problem, self.file, self.line_of(node))


class _LoadContext:
    """State shared by a file and everything it includes."""

    def __init__(self, config_dir: Path | None) -> None:
        self.config_dir = config_dir
        self.secrets: dict[str, Any] | None = None
        self.include_stack: list[Path] = []

    def secret(self, name: str, loader: _Loader, node: yaml.Node) -> Any:
        if self.config_dir is None:
            raise loader.fail(node, f"!secret {name}: secrets are not allowed in this file")
        secrets_path = self.config_dir / SECRETS_FILE
        if self.secrets is None:
            if not secrets_path.is_file():
                raise loader.fail(node, f"!secret {name}: {secrets_path} does not exist")
            data = _load_file(secrets_path, _LoadContext(None))
            if data is None:
                data = {}
            if not isinstance(data, dict):
                raise YamlError("must be a mapping of secret names to values", secrets_path, 1)
            self.secrets = data
        if name not in self.secrets:
            raise loader.fail(node, f"secret '{name}' is not defined in {secrets_path}")
        return self.secrets[name]


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> LineDict:
    first_seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, Hashable):
            raise loader.fail(key_node, "a mapping key must be a plain value")
        if key in first_seen:
            raise loader.fail(
                key_node, f"duplicate key '{key}' (first defined on line {first_seen[key]})"
            )
        first_seen[key] = loader.line_of(key_node)
    loader.flatten_mapping(node)
    result = LineDict()
    result.file, result.line = str(loader.file), loader.line_of(node)
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = (str(loader.file), loader.line_of(key_node))
    return result


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> LineList:
    result = LineList()
    result.file, result.line = str(loader.file), loader.line_of(node)
    for item in node.value:
        result.append(loader.construct_object(item, deep=True))
        result.item_lines.append((str(loader.file), loader.line_of(item)))
    return result


def _construct_secret(loader: _Loader, node: yaml.Node) -> Any:
    if not isinstance(node, yaml.ScalarNode) or not loader.construct_scalar(node):
        raise loader.fail(node, "!secret needs a secret name, e.g. !secret mqtt_password")
    return loader.context.secret(str(loader.construct_scalar(node)), loader, node)


def _construct_include(loader: _Loader, node: yaml.Node) -> Any:
    if not isinstance(node, yaml.ScalarNode) or not loader.construct_scalar(node):
        raise loader.fail(node, "!include needs a file name, e.g. !include mqtt.yaml")
    target = (loader.file.parent / str(loader.construct_scalar(node))).resolve()
    if target in loader.context.include_stack:
        raise loader.fail(node, f"!include {target} includes itself (directly or indirectly)")
    if not target.is_file():
        raise loader.fail(node, f"!include: {target} does not exist")
    return _load_file(target, loader.context)


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)
_Loader.add_constructor("tag:yaml.org,2002:seq", _construct_sequence)
_Loader.add_constructor("!secret", _construct_secret)
_Loader.add_constructor("!include", _construct_include)


def _load_file(path: Path, context: _LoadContext) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise YamlError(f"not valid UTF-8 text ({err.reason})", path) from err
    except OSError as err:
        raise YamlError(f"cannot read file: {err.strerror or err}", path) from err
    context.include_stack.append(path.resolve())
    loader = _Loader(text, path, context)
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        problem = err.problem or err.context or "syntax error"
        line = mark.line + 1 if mark is not None else None
        raise YamlError(f"invalid YAML: {problem}", path, line) from err
    except yaml.YAMLError as err:
        raise YamlError(f"invalid YAML: {err}", path) from err
    finally:
        loader.dispose()
        context.include_stack.pop()


def load_yaml(path: Path, config_dir: Path | None = None) -> Any:
    """Load one YAML file (and what it includes).

    `!secret` names are looked up in `<config_dir>/secrets.yaml`; without a
    config_dir they are refused. `!include` paths are relative to the file
    that contains them. Mappings come back as LineDict, sequences as
    LineList (both plain dict/list subclasses); use `to_plain` to drop them.
    """
    return _load_file(Path(path), _LoadContext(Path(config_dir) if config_dir else None))


def locate(data: Any, path: Sequence[Any]) -> tuple[str | None, int | None]:
    """File and line of the deepest part of `path` that exists in `data`."""
    file, line = getattr(data, "file", None), getattr(data, "line", None)
    node = data
    for key in path:
        if isinstance(node, LineDict) and isinstance(key, Hashable) and key in node:
            file, line = node.key_lines[key]
            node = node[key]
        elif isinstance(node, LineList) and isinstance(key, int) and 0 <= key < len(node):
            file, line = node.item_lines[key]
            node = node[key]
        else:
            break
    return file, line


def to_plain(data: Any) -> Any:
    """Copy with LineDict/LineList turned into plain dict/list."""
    if isinstance(data, dict):
        return {key: to_plain(value) for key, value in data.items()}
    if isinstance(data, list):
        return [to_plain(item) for item in data]
    return data
