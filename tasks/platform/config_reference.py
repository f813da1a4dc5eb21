"""docs/configuration.md, generated from the config schema (tasks/platform/config.py): every
key with its type, default, bounds, and the comment beside it in the schema's source.

    python -m distill.tasks.platform.config_reference > docs/configuration.md

tests/platform/test_config_reference.py fails when the file and the schema disagree."""

from __future__ import annotations

import ast
import inspect
import io
import tokenize
import types
import typing
from typing import Any

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from distill.tasks.platform import config

COMMAND = "python -m distill.tasks.platform.config_reference > docs/configuration.md"
HEADER = f"""# Configuration reference

Generated from the schema (`tasks/platform/config.py`) by
`{COMMAND}`; a test fails when it is stale. A config file is YAML with
these sections; `--set KEY=VALUE` on the command line and keywords of `distill.compress`
(`finetune={{"epochs": 5}}`) set the same keys. An unknown key is refused by name.
"""


def _comments() -> dict[tuple[str, str], str]:
    """(class name, field name) -> the comment on the field's lines, or the comment lines right
    above it, in config.py's source."""
    source = inspect.getsource(config)
    lines: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            lines[tok.start[0]] = tok.string.lstrip("#").strip()
    out = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            end = stmt.end_lineno or stmt.lineno
            text = [lines[n] for n in range(stmt.lineno, end + 1) if n in lines]
            above, n = [], stmt.lineno - 1
            while n in lines and source.splitlines()[n - 1].lstrip().startswith("#"):
                above.insert(0, lines[n])
                n -= 1
            words = " ".join(above + text).strip()
            if words:
                out[(node.name, stmt.target.id)] = words
    return out


def _type(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type(a) for a in args)
    if origin is typing.Annotated:
        return _type(args[0])
    if origin is not None:
        inner = ", ".join(_type(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            value = value.model_dump(exclude_none=True)
    elif field.default is PydanticUndefined:
        return "(required)"
    else:
        value = field.default
    return "null" if value is None else f"`{value!r}`".replace("|", "\\|")


def _bounds(field: FieldInfo) -> str:
    marks = {Gt: (">", "gt"), Ge: (">=", "ge"), Lt: ("<", "lt"), Le: ("<=", "le")}
    found = []
    for meta in field.metadata:
        for kind, (sign, attr) in marks.items():
            if isinstance(meta, kind):
                found.append(f"{sign} {getattr(meta, attr)}")
        pattern = getattr(meta, "pattern", None)
        if pattern:
            found.append(f"matches `{pattern}`")
    return ", ".join(found)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _section(
    prefix: str, model: type[BaseModel], comments: dict[tuple[str, str], str], note: str = ""
) -> list[str]:
    doc = " ".join(filter(None, [inspect.getdoc(model) if model.__doc__ else "", note]))
    rows, nested = [], []
    for name, field in model.model_fields.items():
        key = f"{prefix}.{field.alias or name}" if prefix else (field.alias or name)
        sub = _model_of(field.annotation)
        if sub is not None:
            note = comments.get((model.__name__, name), "")
            if field.default is None:
                note = f"Default: null (off). {note}".strip()
            elif field.default_factory is not None:
                given = _default(field)
                try:
                    plain = f"`{sub().model_dump(exclude_none=True)!r}`"
                except ValueError:  # a section that needs a choice (the budget's kind)
                    plain = None
                if given != plain:
                    note = f"Default: {given}. {note}".strip()
            nested.append((key, sub, note))
            continue
        what = comments.get((model.__name__, name), "")
        bounds = _bounds(field)
        if bounds:
            what = f"{what} ({bounds})".strip()
        rows.append(f"| `{key}` | {_type(field.annotation)} | {_default(field)} | {what} |")
    out = []
    if rows:
        out += [f"## `{prefix or 'top level'}`", ""]
        if doc:
            out += [" ".join(doc.split()), ""]
        out += ["| key | type | default | what |", "|---|---|---|---|", *rows, ""]
    for key, sub, sub_note in nested:
        out += _section(key, sub, comments, sub_note)
    return out


def reference() -> str:
    lines = [HEADER, *_section("", config.PipelineConfig, _comments())]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(reference(), end="")
