"""The generic recipe validator: a walk over dataclass fields and their type hints.

Types, unknown keys (with the nearest valid one), required keys, and numeric bounds declared
with `transferkit.core.fields.bounded(..., ge=0)`. Every problem is appended to `errors` as one line
naming the key path (`train.lr`, `schedule.phases.1.freeze`); nothing raises here.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import types
from collections.abc import Collection, Sequence
from dataclasses import MISSING
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from transferkit.core import BOUNDS
from transferkit.errors import did_you_mean

UNIONS = (Union, types.UnionType)


@functools.cache
def hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def key_path(path: Sequence[Any]) -> str:
    return ".".join(str(p) for p in path)


def show(value: Any) -> str:
    try:
        text = repr(value)
    except ValueError:  # ints past Python's digit limit cannot even be printed
        return f"<{type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(tp: Any) -> str:
    """How a type reads in 'expected ...' messages."""
    origin = get_origin(tp)
    if tp is type(None):
        return "null"
    if origin in UNIONS:
        return " or ".join(_describe(arm) for arm in get_args(tp))
    if origin is list:
        return "a list"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "a mapping"
    if origin is Literal:
        return " or ".join(map(str, get_args(tp)))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[tp]


def suggest(word: str, candidates: Collection[str]) -> str:
    """`did_you_mean`, plus initials (`learning_rate` -> `lr`), which difflib does not see."""
    initials = "".join(part[:1] for part in word.lower().split("_"))
    if len(initials) > 1 and initials in candidates and not did_you_mean(word, candidates):
        return f" Did you mean: {initials}?"
    return did_you_mean(word, candidates)


def _convert(value: Any, tp: Any, path: list[Any], errors: list[str]) -> Any:
    """Check `value` against type `tp`: return the typed value, appending problems to `errors`."""
    origin, args = get_origin(tp), get_args(tp)

    def wrong(expected: str) -> None:
        errors.append(f"recipe key {key_path(path)}: expected {expected}, got {show(value)}")

    if tp is Any:
        return copy.deepcopy(value)  # the Recipe must not share mutable state with the input
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path, errors)
    if origin in UNIONS:
        if value is None and type(None) in args:
            return None
        arms = [arm for arm in args if arm is not type(None)]
        for arm in arms:
            trial: list[str] = []
            result = _convert(value, arm, path, trial)
            if not trial:
                return result
        for arm in arms:
            # A container that has the shape of an arm: report the problems inside it.
            if isinstance(value, list) and get_origin(arm) is list:
                return _convert(value, arm, path, errors)
            if isinstance(value, dict) and (
                get_origin(arm) is dict or dataclasses.is_dataclass(arm)
            ):
                return _convert(value, arm, path, errors)
        return wrong(_describe(tp))
    if origin is Literal:
        # YAML 1.1 reads a bare `no` as false (`mixed_precision: no`); take the user's meaning.
        if value is False and "no" in args:
            return "no"
        if isinstance(value, str) and value in args:
            return value
        hint = did_you_mean(value, args) if isinstance(value, str) else ""
        errors.append(
            f"recipe key {key_path(path)}: must be one of {', '.join(args)}, got {show(value)}.{hint}"
        )
        return None
    if origin is list:
        if not isinstance(value, list):
            return wrong("a list")
        return [_convert(item, args[0], [*path, i], errors) for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            return wrong("a mapping")
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                errors.append(f"recipe key {key_path([*path, key])}: keys must be strings")
                continue
            out[key] = _convert(item, args[1], [*path, key], errors)
        return out
    if tp is bool:
        return value if isinstance(value, bool) else wrong("true or false")
    if tp is int:
        # bool is a subclass of int, but `epochs: true` is a mistake, not 1.
        is_int = isinstance(value, int) and not isinstance(value, bool)
        return value if is_int else wrong("an integer")
    if tp is float:
        # PyYAML reads `1e-3` (no dot) as a string, so numeric strings are accepted here.
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            return wrong("a number")
        try:
            number = float(value)
        except (ValueError, OverflowError):
            return wrong("a number")
        return number if math.isfinite(number) else wrong("a finite number")
    if tp is str:
        return value if isinstance(value, str) else wrong("a string")
    raise TypeError(f"unsupported recipe type {tp!r} at {key_path(path)}")  # a bug in the schema


def build(cls: type, value: Any, path: list[Any], errors: list[str]) -> Any:
    """Build dataclass `cls` from a mapping, checking keys, types and declared bounds."""
    if not isinstance(value, dict):
        errors.append(
            f"recipe key {key_path(path) or '(top level)'}: expected a mapping, got {show(value)}"
        )
        return None
    before = len(errors)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, item in value.items():
        sub = [*path, key]
        if key not in fields:
            errors.append(f"unknown recipe key {key_path(sub)}.{suggest(str(key), fields)}")
            continue
        kwargs[key] = result = _convert(item, hints(cls)[key], sub, errors)
        for bound, limit in fields[key].metadata.items():
            check, symbol = BOUNDS[bound]
            if isinstance(result, (int, float)) and not check(result, limit):
                errors.append(
                    f"recipe key {key_path(sub)}: must be {symbol} {limit}, got {show(result)}"
                )
    for name, f in fields.items():
        if name not in value and f.default is MISSING and f.default_factory is MISSING:
            errors.append(f"missing required recipe key {key_path([*path, name])}")
    return cls(**kwargs) if len(errors) == before else None
