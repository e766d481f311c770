"""JSON and YAML read from the user's files, with named refusals where the plain parsers crash or hang.

Limits (each refused in one line naming the file): a file larger than ``MAX_BYTES``; bytes that are not UTF-8
text (binary garbage); nesting deeper than ``MAX_DEPTH`` levels (``json`` and PyYAML recurse, and so does
everything that later walks the data); a YAML document that expands through its aliases to more than
``MAX_YAML_NODES`` nodes ("billion laughs": counted on the composed graph, before anything is built) or that
refers to itself; a YAML mapping that gives one key twice (which value wins is ambiguous).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from .errors import ForgetlessError

MAX_BYTES = 256 << 20
MAX_DEPTH = 100
MAX_YAML_NODES = 100_000
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_MERGE_TAG = "tag:yaml.org,2002:merge"
_JSON_TYPES = {dict: "object", list: "array"}


def read_text(path: str | Path, *, remedy: str, limit: int = MAX_BYTES) -> str:
    """The file's text; refused when larger than `limit` bytes or not UTF-8 (a binary file given as text)."""
    path = Path(path)
    size = path.stat().st_size
    if size > limit:
        raise ForgetlessError(
            f"{size / 2**20:.1f} MiB, more than the {limit / 2**20:g} MiB read from a file of this kind",
            file=path,
            remedy=remedy,
        )
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ForgetlessError(
            f"not a text file (byte {e.start} is not UTF-8: binary data?)", file=path, remedy=remedy
        ) from None


def json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in JSON `text` (brackets inside strings do not count); stops
    counting once past ``MAX_DEPTH``."""
    depth = deepest = 0
    for c in _NOT_BRACKET.sub("", _JSON_STRING.sub("", text)):
        depth += 1 if c in "[{" else -1
        deepest = max(deepest, depth)
        if deepest > MAX_DEPTH:
            break
    return deepest


def parse_json(text: str, *, file: str | Path | None, remedy: str) -> Any:
    """`text` parsed as JSON; too deep or invalid JSON is a :class:`ForgetlessError` naming `file`."""
    if json_depth(text) > MAX_DEPTH:
        raise ForgetlessError(f"JSON nested deeper than {MAX_DEPTH} levels", file=file, remedy=remedy)
    try:
        return json.loads(text)
    except ValueError as e:  # JSONDecodeError, or a number of more digits than int() converts
        raise ForgetlessError(f"invalid JSON ({e})", file=file, remedy=remedy) from None


def read_json(path: str | Path, *, remedy: str, limit: int = MAX_BYTES, expect: type | None = None) -> Any:
    """The JSON file at `path`, within the limits of this module. An absent file, and with `expect` (``dict`` or
    ``list``) a value of another type, are refused too: every refusal names the file and says `remedy`."""
    path = Path(path)
    if not path.is_file():
        raise ForgetlessError("not found" if not path.exists() else "not a file", file=path, remedy=remedy)
    data = parse_json(read_text(path, remedy=remedy, limit=limit), file=path, remedy=remedy)
    if expect is not None and not isinstance(data, expect):
        raise ForgetlessError(
            f"not a JSON {_JSON_TYPES.get(expect, expect.__name__)}", file=path, remedy=remedy
        )
    return data


def read_yaml(path: str | Path, *, remedy: str, limit: int = MAX_BYTES) -> Any:
    """The YAML file at `path` (safe tags only), within the limits of this module."""
    text = read_text(path, remedy=remedy, limit=limit)
    loader = None
    try:
        loader = _Loader(text, Path(path), remedy)  # its reader refuses control characters here
        return loader.get_single_data()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or getattr(e, "reason", None)
        raise ForgetlessError(
            f"invalid YAML{where}" + (f" ({problem})" if problem else ""), file=path, remedy=remedy
        ) from None
    finally:
        if loader is not None:
            loader.dispose()


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses duplicated keys, deep nesting and alias bombs while composing."""

    def __init__(self, text: str, file: Path, remedy: str):
        super().__init__(text)
        self.file, self.remedy, self.depth = file, remedy, 0

    def refuse(self, problem: str, node: yaml.Node | None = None) -> ForgetlessError:
        where = f" (line {node.start_mark.line + 1})" if node is not None else ""
        return ForgetlessError(problem + where, file=self.file, remedy=self.remedy)

    def compose_node(self, parent, index):
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise self.refuse(f"YAML nested deeper than {MAX_DEPTH} levels", None)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def compose_mapping_node(self, anchor):
        node = super().compose_mapping_node(anchor)
        seen: dict[tuple[str, str], yaml.Node] = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == _MERGE_TAG:
                continue
            first = seen.setdefault((key.tag, key.value), key)
            if first is not key:
                raise self.refuse(
                    f"key {key.value!r} is given twice (lines {first.start_mark.line + 1} and "
                    f"{key.start_mark.line + 1}): which value wins is ambiguous"
                )
        return node

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except (
            ValueError
        ) as e:  # a tagged or implicit value its type refuses: 2024-13-45, !!int x, 5000 digits
            raise self.refuse(f"invalid YAML value ({str(e)[:80]})", node) from None

    def compose_document(self):
        node = super().compose_document()
        nodes, depth = _expanded_size(node, self)
        if nodes > MAX_YAML_NODES:
            raise self.refuse(f"YAML expands through its aliases to more than {MAX_YAML_NODES} nodes")
        if depth > MAX_DEPTH:
            raise self.refuse(f"YAML nested (through its aliases) deeper than {MAX_DEPTH} levels")
        return node


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _expanded_size(root: yaml.Node | None, loader: _Loader) -> tuple[int, int]:
    """(nodes, depth) of the document with every alias expanded, counted on the shared graph without expanding
    it; stops once past the limits. An alias inside its own anchor is refused."""
    done: dict[int, tuple[int, int]] = {}
    active: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)] if root is not None else []
    while stack:
        node, finished = stack.pop()
        kids = _children(node)
        if finished:
            n = 1 + sum(done[id(k)][0] for k in kids)
            d = 1 + max((done[id(k)][1] for k in kids), default=0)
            done[id(node)] = (n, d)
            active.discard(id(node))
            if n > MAX_YAML_NODES or d > MAX_DEPTH:
                return n, d
        elif id(node) in active:
            raise loader.refuse("YAML alias inside its own anchor (a structure that contains itself)", node)
        elif id(node) not in done:
            active.add(id(node))
            stack.append((node, True))
            stack.extend((k, False) for k in kids if id(k) not in done)
    return done[id(root)] if root is not None else (0, 0)
