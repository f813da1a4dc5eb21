"""YAML from users, parsed with bounds: `yaml.safe_load` builds no code objects, but anchors and
aliases let 300 bytes stand for billions of nodes ("billion laughs"): cheap to parse, since an
alias shares its node, and then every walk of the tree (config merging, validation, hashing)
expands it. An alias can also point at its own parent (a recursive list). Both are refused
here, before anything walks the tree, as is nesting deeper than any config needs.
"""

from __future__ import annotations

from typing import Any

import yaml

from distill.tasks.platform.errors import UserError

MAX_NODES = 100_000  # values in the tree with every alias expanded; a config has a few hundred
MAX_DEPTH = 64


def load(text: str, what: str) -> Any:
    """`yaml.safe_load(text)`, or one UserError naming `what` (a file, a `--set` key) when the
    text is not YAML, nests too deep, refers to itself, or expands past MAX_NODES values."""
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UserError(f"{what} is not valid YAML: {str(err).splitlines()[0]}") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise UserError(f"{what} nests deeper than Python can parse") from None
    expanded_size(tree, what)
    return tree


def expanded_size(tree: Any, what: str) -> int:
    """Values in `tree` counting each alias as the copy a walk would make (shared nodes are
    sized once); one UserError past MAX_NODES, MAX_DEPTH or at a cycle."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()

    def size(node: Any, depth: int) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_:
            raise UserError(f"{what}: an alias refers to a value that contains it (a cycle)")
        if depth > MAX_DEPTH:
            raise UserError(f"{what}: nested deeper than {MAX_DEPTH} levels")
        open_.add(key)
        children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
        total = 1
        for child in children:
            total += size(child, depth + 1)
            if total > MAX_NODES:
                raise UserError(
                    f"{what}: its aliases expand to more than {MAX_NODES:,} values "
                    "(a YAML alias bomb?)"
                )
        open_.discard(key)
        sizes[key] = total
        return total

    return size(tree, 0)
