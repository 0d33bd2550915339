"""Validation errors told for people: the key, where its value came from (the file or the
environment variable that set it), a "did you mean" for an unknown key, and no library
wording (pydantic's `(root):` and `Value error, `)."""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

Loc = tuple[str | int, ...]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The settings model a field holds, itself or in a list, dict or optional."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _model_in(typing.get_args(annotation)[0])
    if origin in (list, tuple, dict, typing.Union, types.UnionType):
        for arg in reversed(typing.get_args(annotation)):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def known_keys(model: type[BaseModel], loc: Loc) -> list[str]:
    """The keys the section at ``loc`` accepts (``loc`` without the unknown key itself)."""
    current: type[BaseModel] | None = model
    for part in loc:
        if current is None:
            return []
        if isinstance(part, int) or part not in current.model_fields:
            continue  # a list index, or a dict's key: the model inside stays the same
        current = _model_in(current.model_fields[part].annotation)
    return list(current.model_fields) if current is not None else []


def _dotted(loc: Loc) -> str:
    return ".".join(str(p) for p in loc)  # rules.0.match: as the messages always said


def _message(error: Mapping[str, Any]) -> str:
    cause = (error.get("ctx") or {}).get("error")
    if error["type"] == "value_error" and cause is not None:
        return str(cause)  # our own message, without pydantic's "Value error, "
    return str(error["msg"])


def _source(loc: Loc, sources: Mapping[Loc, str]) -> str | None:
    for length in range(len(loc), 0, -1):
        if loc[:length] in sources:
            return sources[loc[:length]]
    return None


def describe(exc: ValidationError, model: type[BaseModel], origin: str,
             sources: Mapping[Loc, str] | None = None) -> str:
    """One line for all the errors; each names its key and the file or variable it came
    from (``sources``: key path -> environment variable that set it)."""
    by_source: dict[str, list[str]] = {}
    for error in exc.errors():
        loc: Loc = tuple(error["loc"])
        key = _dotted(loc)
        if error["type"] == "extra_forbidden":
            text = f"unknown key {key!r}"
            guess = difflib.get_close_matches(str(loc[-1]), known_keys(model, loc[:-1]), n=1)
            if guess:
                text += f"; did you mean {_dotted((*loc[:-1], guess[0]))!r}?"
        elif error["type"] == "missing":
            text = f"{key} is required"
        elif key and not _message(error).startswith(key):
            text = f"{key}: {_message(error)}"
        else:
            text = _message(error)  # a check across keys: its message names them
        where = _source(loc, sources or {}) if loc else None
        by_source.setdefault(f"environment variable {where}" if where else origin,
                             []).append(text)
    return "; ".join(f"{where}: {'; '.join(texts)}" for where, texts in by_source.items())


def plain(exc: ValidationError) -> str:
    """The errors without a source, for values given on the command line."""
    return "; ".join(f"{_dotted(tuple(e['loc']))}: {_message(e)}" if e["loc"]
                     else _message(e) for e in exc.errors())

