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


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The settings models a field holds, itself or in a list, dict, optional or union."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _models_in(typing.get_args(annotation)[0])
    if origin in (list, tuple, dict, typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
    return []


def _kind_of(model: type[BaseModel]) -> str | None:
    """A union member's tag: its ``kind`` field's one value (a destination's kind)."""
    field = model.model_fields.get("kind")
    values = typing.get_args(field.annotation) if field is not None else ()
    return str(values[0]) if len(values) == 1 else None


def _walk(model: type[BaseModel], loc: Loc) -> tuple[Loc, list[type[BaseModel]]]:
    """``loc`` without the tags pydantic puts in for a union's member (``destinations.0.
    dicomweb.url`` is ``destinations.0.url`` to people), and the models at its end."""
    current = [model]
    kept: list[str | int] = []
    for part in loc:
        if isinstance(part, int):
            kept.append(part)  # a list index: the model inside stays the same
            continue
        tagged = [m for m in current if _kind_of(m) == part]
        if len(current) > 1 and tagged:
            current = tagged
            continue
        kept.append(part)
        owner = next((m for m in current if part in m.model_fields), None)
        if owner is not None:
            current = _models_in(owner.model_fields[part].annotation)
        # else a dict's key: the model inside stays the same
    return tuple(kept), current


def known_keys(model: type[BaseModel], loc: Loc) -> list[str]:
    """The keys the section at ``loc`` accepts (``loc`` without the unknown key itself)."""
    _, models = _walk(model, loc)
    return list(models[0].model_fields) if len(models) == 1 else []


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
        raw: Loc = tuple(error["loc"])
        loc, _ = _walk(model, raw)
        key = _dotted(loc)
        if error["type"] == "extra_forbidden":
            text = f"unknown key {key!r}"
            guess = difflib.get_close_matches(str(loc[-1]), known_keys(model, raw[:-1]), n=1)
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

