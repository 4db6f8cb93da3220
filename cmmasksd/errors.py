"""Validation errors on one line, as the CLI and the stages print them (`error: ...`): the key path,
the problem and the value, and where the model says so, what is allowed instead."""

from __future__ import annotations

import types
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo


def one_line(err: BaseException, model: type[BaseModel] | None = None) -> str:
    """An error's message on one line, as the CLI and the stages print it: pydantic's report by key
    path (with what `model` allows), a KeyError without its quotes, other messages' lines joined."""
    if isinstance(err, ValidationError):
        return format_validation_error(err, model)
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
_SHOWN_ERRORS = 3  # a line a user reads, not every error of a foreign file


def format_validation_error(err: ValidationError, model: type[BaseModel] | None = None, prefix: str = "") -> str:
    """pydantic's report on one line: "`key.path`: problem, got value" for the first few errors.

    Given the `model` that raised `err`, an unknown key also lists the keys allowed beside it and a
    number out of range shows its whole range, so the line says what to write instead. `prefix` is
    where the validated mapping sits in the user's file (`sweep.variants[0]`).
    """
    walk = model if model is not None and err.title == model.__name__ else None
    problems = [_problem(error, walk, prefix) for error in err.errors()[:_SHOWN_ERRORS]]
    more = err.error_count() - len(problems)
    return "; ".join(problems) + (f" (and {more} more)" if more else "")


def _problem(error: dict[str, Any], model: type[BaseModel] | None, prefix: str) -> str:
    path = prefix
    for part in error["loc"]:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part != "[key]":  # pydantic's marker for a refused mapping key
            path += f".{part}" if path else part
    message = error["msg"].removeprefix("Value error, ")
    text = f"`{path}`: {message}" if path else message
    holder, field = _field_at(model, error["loc"]) if model else (None, None)
    if error["type"] == "extra_forbidden":
        if holder is not None:
            text += f" (allowed: {', '.join(f.alias or name for name, f in holder.model_fields.items())})"
    elif error["type"] not in ("missing", "value_error") and not isinstance(error.get("input"), (dict, list)):
        text += f", got {error.get('input')!r}"
        bounds = [f"{symbol} {getattr(m, key)}" for m in (field.metadata if field else [])
                  for key, symbol in _BOUNDS.items() if hasattr(m, key)]
        if len(bounds) > 1:  # one bound is what pydantic's message says already
            text += f" (allowed: {' and '.join(bounds)})"
    return text


def _field_at(model: type[BaseModel], loc: tuple) -> tuple[type[BaseModel] | None, FieldInfo | None]:
    """The model holding the last key of `loc` and that key's field; None where `loc` leaves the models."""
    holder, field, node = None, None, model
    for part in loc:
        if get_origin(node) in (Union, types.UnionType):  # `X | None`: the X
            options = [arg for arg in get_args(node) if arg is not type(None)]
            node = options[0] if len(options) == 1 else None
        if isinstance(node, type) and issubclass(node, BaseModel):
            holder = node
            field = next((f for name, f in node.model_fields.items() if (f.alias or name) == part), None)
            if field is None:
                return holder, None
            node = field.annotation
        elif get_origin(node) in (list, tuple, dict) and get_args(node):
            holder, field, node = None, None, get_args(node)[-1]  # an item or a value
        else:
            return None, None
    return holder, field
