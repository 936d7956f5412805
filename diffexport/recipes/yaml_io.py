"""Reading a recipe file safely: bounded size, UTF-8 text, no alias bombs, no duplicate keys.

PyYAML's ``SafeLoader`` builds plain data only, but three things in it are unsafe for files from
anyone: aliases share one node, so nine anchors of nine aliases each stand for 9^9 nodes once
anything walks the data (a 1 KB file took 5 GB); a repeated key silently keeps the last value; and
nothing bounds the file. :func:`read_yaml` refuses each with one line naming the file (and line).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MAX_BYTES = 1 << 20  # a recipe is a few KB; 1 MiB leaves room for long comments
MAX_NODES = 100_000  # YAML nodes after alias expansion (a shipped recipe has a few hundred)

__all__ = ["MAX_BYTES", "MAX_NODES", "YAMLInputError", "read_yaml", "parse_yaml"]


class YAMLInputError(ValueError):
    """A YAML file refused before or while parsing; the message names the file."""


def _expanded_size(root: yaml.Node, limit: int) -> int:
    """Nodes in ``root`` with every alias expanded, counted up to ``limit`` (aliases share node
    objects, so each distinct node's size is computed once); ``ValueError`` on a recursive alias."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if key in sizes:
            continue
        children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else \
            list(node.value) if isinstance(node, yaml.SequenceNode) else []
        if done:
            open_nodes.discard(key)
            sizes[key] = min(limit + 1, 1 + sum(sizes[id(c)] for c in children))
            continue
        if key in open_nodes:
            raise ValueError(f"line {node.start_mark.line + 1}: recursive alias (a node that contains itself)")
        open_nodes.add(key)
        stack.append((node, True))
        for child in children:
            if id(child) in open_nodes:
                raise ValueError(f"line {child.start_mark.line + 1}: recursive alias (a node that contains itself)")
            stack.append((child, False))
    return sizes[id(root)]


class _StrictLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses duplicate mapping keys (naming the key and its line)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first on line {seen[key]})", key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                continue
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, source: str = "<yaml>") -> Any:
    """``text`` as plain data; ``YAMLInputError`` for invalid YAML, duplicate keys, more than
    :data:`MAX_NODES` nodes after alias expansion, or nesting too deep."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        try:
            size = _expanded_size(node, MAX_NODES)
        except ValueError as e:
            raise YAMLInputError(f"{source}: {e}") from None
        if size > MAX_NODES:
            raise YAMLInputError(f"{source}: too large once its aliases are expanded (over {MAX_NODES} nodes); "
                                 "write the values out or use fewer aliases")
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        where = f"line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1}: " if e.problem_mark else ""
        raise YAMLInputError(f"{source}: not valid YAML: {where}{' '.join(str(e.problem or e).split())}") from None
    except yaml.YAMLError as e:
        raise YAMLInputError(f"{source}: not valid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise YAMLInputError(f"{source}: nested too deeply to be a recipe") from None
    finally:
        loader.dispose()


def read_yaml(path: str | Path, max_bytes: int = MAX_BYTES) -> Any:
    """The YAML file ``path`` as plain data (:func:`parse_yaml`), refused with one line when it
    cannot be read, is larger than ``max_bytes``, or is not UTF-8 text."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise YAMLInputError(f"{path}: cannot read recipe ({e.strerror})") from None
    if len(data) > max_bytes:
        raise YAMLInputError(f"{path}: larger than {max_bytes} bytes; a recipe is a small YAML text file")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise YAMLInputError(f"{path}: UTF-16 text; save the recipe as UTF-8")
    if b"\0" in data:
        raise YAMLInputError(f"{path}: a binary file (it holds NUL bytes), not a YAML recipe")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise YAMLInputError(f"{path}: not UTF-8 text (byte {e.start}); a recipe is a UTF-8 YAML file") from None
    return parse_yaml(text, str(path))
