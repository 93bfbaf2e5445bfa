"""Pydantic's validation errors as :class:`Issue`s: at the YAML key or value they are about,
in words about the YAML (``expected an integer, got the string '12'``), with a suggestion for a
near-miss key."""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from config.results import Issue, KeyPath, format_path, suggest
from config.yaml_doc import Document

__all__ = ["pydantic_issue"]


def _at(doc: Document, path: KeyPath, message: str, key: bool = False) -> Issue:
    line, col = doc.where(path, key)
    return Issue(doc.file, line, col, format_path(path), message)


def _real_path(data: Any, loc: Sequence[str | int]) -> tuple[KeyPath, bool]:
    """The data path ``loc`` points at, skipping pydantic's union-member and validator parts;
    the flag says the last element is a key the data does not have."""
    out: list[str | int] = []
    cur = data
    missing = False
    for part in loc:
        if isinstance(cur, dict) and isinstance(part, str):
            out.append(part)
            missing = part not in cur
            cur = cur.get(part)
        elif isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur):
            out.append(part)
            missing = False
            cur = cur[part]
    return tuple(out), missing


def _unwrap(tp: Any) -> Any:
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _model_keys(root: type[BaseModel], path: KeyPath) -> list[str]:
    """The keys the model at ``path`` (a mapping inside ``root``) accepts."""
    tp: Any = root
    for part in path:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            fields = {f.alias or n: f for n, f in tp.model_fields.items()}
            f = fields.get(str(part))
            if f is None:
                return []
            tp = f.annotation
        elif typing.get_origin(tp) is list:
            tp = typing.get_args(tp)[0]
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        else:
            return []
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [f.alias or n for n, f in tp.model_fields.items()]
    return []


_TYPE_WORDS = {"string_type": "a string", "int_type": "an integer", "float_type": "a number",
               "bool_type": "true or false", "list_type": "a list", "dict_type": "a mapping",
               "model_type": "a mapping", "int_from_float": "an integer"}


def _describe(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return f"the integer {v}"
    if isinstance(v, float):
        return f"the number {v}"
    if isinstance(v, str):
        return f"the string {v[:40]!r}"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "a mapping"
    return type(v).__name__


def pydantic_issue(doc: Document, model: type[BaseModel], err: Mapping[str, Any]) -> Issue:
    """The issue one pydantic error of validating ``doc``'s data with ``model`` stands for:
    at the offending key or value, in words about the YAML (not about pydantic's types)."""
    path, _ = _real_path(doc.data, err["loc"])
    kind = str(err["type"])
    value = err.get("input")
    if kind == "extra_forbidden":
        allowed = _model_keys(model, path[:-1])
        name = str(path[-1]) if path else ""
        hint = suggest(name, allowed)
        if not hint and allowed:
            hint = f" (known: {', '.join(sorted(allowed))})"
        return _at(doc, path, f"unknown key {name!r}{hint}", key=True)
    if kind == "missing":
        line, col = doc.where(path[:-1])
        name = str(path[-1]) if path else "?"
        return Issue(doc.file, line, col, format_path(path), f"missing required key {name!r}")
    msg = str(err.get("msg", kind))
    msg = msg.removeprefix("Value error, ")
    if kind in _TYPE_WORDS:
        msg = f"expected {_TYPE_WORDS[kind]}, got {_describe(value)}"
    elif kind == "literal_error":
        hint = suggest(str(value), [str(x) for x in (err.get("ctx") or {})
                                     .get("expected", "").replace("'", "").split(" or ")])
        msg = f"{msg.replace('Input should be', 'must be')}, got {_describe(value)}{hint}"
    elif kind in ("greater_than_equal", "less_than_equal", "too_short", "too_long",
                  "string_too_short"):
        msg = f"{msg.replace('Input should', 'should')}, got {_describe(value)}"
    return _at(doc, path, msg)
