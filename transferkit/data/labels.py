"""Label columns -> `TaskSpec`s (classes inferred or declared) and encoded targets.

Encodings, one column per task: multiclass int64 class index (-1 = missing); binary float32
0/1 (NaN = missing); multilabel a float32 multi-hot list (all NaN = missing); regression float32,
or a float32 list for several columns (NaN = missing). Missing labels are None, NaN or an empty
string. Errors name the recipe key `tasks.<name>...`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

import datasets

from transferkit.core import TASK_KINDS, TaskSpec
from transferkit.errors import UserError

NAN = float("nan")
# Words a 0/1 column may use; declared class names take precedence over them.
_BINARY_WORDS = {"0": 0, "false": 0, "1": 1, "true": 1}
# Separators for a multilabel cell stored as text (CSV cannot hold lists): "cat;dog".
_LABEL_SEPARATORS = re.compile(r"[;|,]")
# A multilabel cell that says "none of these labels" (an all-negative example); a blank cell
# means the labels are missing. A list column says it with an empty list.
NO_LABELS = ("-", "[]")
# "3.0" in a text column is pandas' way of writing the integer 3 in a column with gaps.
_WHOLE_FLOAT_TEXT = re.compile(r"^-?\d+\.0+$")


def clean(value: Any) -> Any:
    """None for a missing label; whole floats (3.0 or "3.0") become the integer (3 or "3").

    pandas turns an integer column with missing values into floats, so 3 arrives as 3.0.
    """
    if value is None:
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return int(value) if value.is_integer() else value
    if isinstance(value, str):
        value = value.strip()
        if _WHOLE_FLOAT_TEXT.match(value):
            return value.split(".")[0]
        return value or None
    return value


def column_values(split: datasets.Dataset, column: str) -> list:
    """A column as a Python list, with ClassLabel indices turned into their names."""
    values = split[column][:]
    feature = split.features[column]
    inner = getattr(feature, "feature", None)
    if isinstance(feature, datasets.ClassLabel):
        return [feature.int2str(v) if v is not None and v >= 0 else None for v in values]
    if isinstance(inner, datasets.ClassLabel):
        return [
            None if v is None else [inner.int2str(x) for x in v if x is not None and x >= 0]
            for v in values
        ]
    return values


def known_classes(split: datasets.Dataset, column: str) -> list[str] | None:
    """The class order a ClassLabel column declares (the dataset's own order), if any."""
    feature = split.features[column]
    feature = getattr(feature, "feature", feature)
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def _sorted_names(names: set[str]) -> list[str]:
    """Sorted, with number-looking names in numeric order (2 before 10)."""

    def key(name: str) -> tuple:
        try:
            return (0, float(name), name)
        except ValueError:
            return (1, 0.0, name)

    return sorted(names, key=key)


def _preview(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _label_list(value: Any) -> list[str] | None:
    """A multilabel cell as a list of names (None when missing; [] for `NO_LABELS`)."""
    value = clean(value)
    if value is None:
        return None
    if isinstance(value, str):
        if value in NO_LABELS:
            return []
        return [part.strip() for part in _LABEL_SEPARATORS.split(value) if part.strip()]
    if isinstance(value, (list, tuple)):
        return [str(clean(v)) for v in value if clean(v) is not None]
    return [str(value)]


def infer_task(
    name: str, cfg: Any, columns: list[str], values: list[list], known: list[str] | None = None
) -> TaskSpec:
    """The task's spec from its recipe entry and the raw values of its columns (all splits).

    `known` is the class order of a ClassLabel column, used when the recipe declares none. A
    multilabel task whose recipe column is a list reads one 0/1 column per label.
    """
    kind = cfg.kind
    if kind not in TASK_KINDS:
        raise UserError(f"tasks.{name}.kind must be one of {', '.join(TASK_KINDS)}, got {kind!r}")
    declared = [str(c) for c in cfg.classes] if getattr(cfg, "classes", None) is not None else None
    if kind in ("multiclass", "binary") and len(columns) != 1:
        raise UserError(f"tasks.{name}.column: a {kind} task reads one column, got {columns}")
    if kind == "multiclass":
        names = (
            declared
            or known
            or _sorted_names({str(v) for v in map(clean, values[0]) if v is not None})
        )
        if len(names) < 2:
            raise UserError(
                f"tasks.{name}: column {columns[0]!r} has {len(names)} class(es) "
                f"({_preview(names)}); "
                f"a multiclass task needs at least 2 (check the column or set tasks.{name}.classes)"
            )
        num_outputs = len(names)
    elif kind == "binary":
        names = declared or _binary_names(name, columns[0], values[0])
        if len(names) != 2:
            raise UserError(
                f"tasks.{name}.classes: a binary task has 2 classes (negative first), got {names}"
            )
        num_outputs = 1
    elif kind == "multilabel":
        if isinstance(cfg.column, (list, tuple)):
            names = declared or list(columns)  # several 0/1 columns, one per label
            if len(names) != len(columns):
                raise UserError(
                    f"tasks.{name}.classes: {len(names)} classes for {len(columns)} columns"
                )
        else:
            found = {label for v in values[0] for label in (_label_list(v) or [])}
            names = declared or known or _sorted_names(found)
            if not names:
                raise UserError(
                    f"tasks.{name}: column {columns[0]!r} has no labels; set tasks.{name}.classes"
                )
        num_outputs = len(names)
    else:
        names, num_outputs = None, len(columns)
    if declared is None and names is not None and not isinstance(cfg.column, (list, tuple)):
        _check_found_classes(name, cfg, names, _counts(kind, values[0]))
    return TaskSpec(
        name=name,
        kind=kind,
        num_outputs=num_outputs,
        hidden=getattr(cfg, "hidden", None),
        dropout=float(getattr(cfg, "dropout", 0.0) or 0.0),
        class_names=tuple(names) if names is not None else None,
    )


def _counts(kind: str, values: list) -> Counter:
    """Labelled examples per class name in a column's raw values."""
    if kind == "multilabel":
        return Counter(label for v in values for label in (_label_list(v) or []))
    return Counter(str(v) for v in map(clean, values) if v is not None)


def _check_found_classes(name: str, cfg: Any, names: list[str], counts: Counter) -> None:
    """Classes found in the data, checked before a head is built on them: names that differ
    only by case, spacing or one small edit from another, and classes with too few examples.
    Declaring the classes (`tasks.NAME.classes`) accepts them as they are."""
    problems = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            how = _how_alike(a, b)
            if how:
                problems.append(f"{a!r} ({counts[a]}) and {b!r} ({counts[b]}) differ only by {how}")
    if problems:
        raise UserError(
            f"tasks.{name}: the classes found in the data look like typos of each other: "
            f"{'; '.join(problems[:5])}. Fix the labels, or declare the classes to keep them "
            f"apart (tasks.{name}.classes: [...])"
        )
    least = max(1, int(getattr(cfg, "min_examples", 1) or 1))
    rare = [f"{n!r} ({counts[n]})" for n in names if counts[n] < least]
    if rare:
        raise UserError(
            f"tasks.{name}: {len(rare)} class(es) found in the data have fewer than {least} "
            f"labelled examples: {', '.join(rare[:8])}. Fix the labels, or accept them with "
            f"tasks.{name}.min_examples: 1 (or by declaring tasks.{name}.classes)"
        )


def _how_alike(a: str, b: str) -> str | None:
    """'case or spacing' / 'one small edit' when two class names look like one, else None.
    Names that differ in digits (class_1, class_2) or are short (cat, car) are left alone."""

    def squeeze(text: str) -> str:
        return re.sub(r"[\s_\-]+", "", text.lower())

    if squeeze(a) == squeeze(b):
        return "case or spacing"
    a, b = squeeze(a), squeeze(b)
    if min(len(a), len(b)) < 5 or re.sub(r"\d", "", a) == re.sub(r"\d", "", b):
        return None
    return "one small edit" if _one_edit_apart(a, b) else None


def _one_edit_apart(a: str, b: str) -> bool:
    """One insertion, deletion, substitution or swap of neighbours turns `a` into `b`."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        if len(diff) == 1:
            return not (a[diff[0]].isdigit() or b[diff[0]].isdigit())
        return (len(diff) == 2 and diff[1] == diff[0] + 1
                and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]])  # fmt: skip
    short, long = (a, b) if len(a) < len(b) else (b, a)
    return any(long[:i] + long[i + 1 :] == short for i in range(len(long)))


def _binary_names(name: str, column: str, values: list) -> list[str]:
    """Class names of an undeclared binary column: 0/1, False/True, or its two values sorted."""
    keys = sorted({str(v) for v in map(clean, values) if v is not None})
    lowered = {k.lower() for k in keys}
    if lowered <= {"0", "1"}:
        return ["0", "1"]
    if lowered <= {"false", "true"}:
        return ["False", "True"]
    if lowered <= {"no", "yes"}:
        return ["no", "yes"]
    if len(keys) == 2:
        return keys
    if len(keys) > 2:
        raise UserError(
            f"tasks.{name}: column {column!r} has {len(keys)} distinct values ({_preview(keys)}); "
            "a binary task needs 2 (use kind: multiclass)"
        )
    raise UserError(
        f"tasks.{name}: column {column!r} has only the value(s) {keys}, "
        "so which one is positive is unknown; "
        f"set tasks.{name}.classes: [negative, positive]"
    )


def encode_task(
    task: TaskSpec, columns: list[str], values: list[list], zero_one_columns: bool = False
) -> tuple[list, Any]:
    """Encode the raw values of one split (see the module docstring); also returns the feature.

    `zero_one_columns`: a multilabel task reads one 0/1 column per label (its column is a list).
    """
    if task.kind == "multiclass":
        index = {n: i for i, n in enumerate(task.class_names)}
        encoded = []
        for v in map(clean, values[0]):
            if v is None:
                encoded.append(-1)
            elif str(v) in index:
                encoded.append(index[str(v)])
            else:
                raise _outside(task, columns[0], v)
        return encoded, datasets.Value("int64")
    if task.kind == "binary":
        lookup = _binary_lookup(task.class_names)
        encoded = [_binary_value(task, columns[0], v, lookup) for v in values[0]]
        return encoded, datasets.Value("float32")
    vector = datasets.Sequence(datasets.Value("float32"))
    if task.kind == "multilabel" and not zero_one_columns:
        index = {n: i for i, n in enumerate(task.class_names)}
        encoded = []
        for v in values[0]:
            labels = _label_list(v)
            row = [NAN] * task.num_outputs if labels is None else [0.0] * task.num_outputs
            for label in labels or []:
                if label not in index:
                    raise _outside(task, columns[0], label)
                row[index[label]] = 1.0
            encoded.append(row)
        return encoded, vector
    if task.kind == "multilabel":
        lookup = dict(_BINARY_WORDS)
        rows = zip(
            *[[_binary_value(task, c, v, lookup) for v in vals] for c, vals in zip(columns, values)]
        )
        return [list(r) for r in rows], vector
    # regression
    per_column = [[_number(task, c, v) for v in vals] for c, vals in zip(columns, values)]
    if len(columns) == 1:
        return per_column[0], datasets.Value("float32")
    return [list(r) for r in zip(*per_column)], vector


def _binary_lookup(names: tuple[str, ...]) -> dict[str, int]:
    """Class name -> 0/1. 0/1/true/false also work unless a class name is one of those words
    (with classes [1, 3], a 0 is an unknown label, not the negative class)."""
    lowered = {n.lower() for n in names}
    lookup = {} if lowered & set(_BINARY_WORDS) else dict(_BINARY_WORDS)
    for i, n in enumerate(names):
        lookup[n.lower()] = i
        lookup[n] = i
    return lookup


def _binary_value(task: TaskSpec, column: str, value: Any, lookup: dict[str, int]) -> float:
    value = clean(value)
    if value is None:
        return NAN
    key = str(value)
    found = lookup.get(key, lookup.get(key.lower()))
    if found is None:
        if task.kind == "multilabel":
            raise UserError(
                f"tasks.{task.name}: value {value!r} in column {column!r} is not 0/1 "
                "(a multilabel task with a list of columns reads one 0/1 column per label)"
            )
        raise _outside(task, column, value)
    return float(found)


def _number(task: TaskSpec, column: str, value: Any) -> float:
    value = clean(value)
    if value is None:
        return NAN
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(
            f"tasks.{task.name}: value {value!r} in column {column!r} is not a number "
            "(regression task)"
        ) from None


def _outside(task: TaskSpec, column: str, value: Any) -> UserError:
    return UserError(
        f"tasks.{task.name}: label {value!r} in column {column!r} is not one of the classes "
        f"({_preview(list(task.class_names or ()))}); "
        f"add it to tasks.{task.name}.classes or fix the data"
    )
