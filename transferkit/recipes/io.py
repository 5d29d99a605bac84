"""Recipes in and out: `key.path=value` overrides, parsing, YAML files."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import MISSING
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml

from transferkit.errors import UserError, did_you_mean
from transferkit.recipes.checks import cross_checks, normalized
from transferkit.recipes.schema import Recipe
from transferkit.recipes.validation import UNIONS, build, hints, key_path, show, suggest


def _container_arm(tp: Any) -> Any:
    """For `X | None` and the like, the arm an override can descend into (else `tp` itself)."""
    if get_origin(tp) in UNIONS:
        for arm in get_args(tp):
            if dataclasses.is_dataclass(arm) or get_origin(arm) in (list, dict):
                return arm
    return tp


def _default_plain(cls: type, name: str) -> Any:
    """The default of field `name` of dataclass `cls` as plain data (None when required)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    value = f.default_factory() if f.default_factory is not MISSING else f.default
    if value is MISSING:
        return None
    if isinstance(value, list):
        return [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value]
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def apply_override(data: dict, override: str) -> dict:
    """Return a copy of `data` with one `key.path=value` override applied (value read as YAML).

    The key path is checked against the schema (unknown keys get a suggestion); list items are
    addressed by index, and the index one past the end appends. Values are validated later, with
    the rest of the recipe.
    """
    if not isinstance(override, str) or "=" not in override:
        raise UserError(
            f"bad override {show(override)}: expected KEY.PATH=VALUE, e.g. train.lr=0.01"
        )
    key_text, _, value_text = override.partition("=")
    parts = key_text.strip().split(".")
    if not all(parts):
        raise UserError(
            f"bad override {override!r}: the key path {key_text.strip()!r} has an empty part"
        )
    try:
        value = yaml.safe_load(value_text)
    except yaml.YAMLError:
        raise UserError(
            f"bad override {override!r}: cannot read {value_text!r} as a YAML value"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"recipe: expected a mapping at the top level, got {show(data)}")
    result = copy.deepcopy(data)
    node: Any = result
    tp: Any = Recipe
    for i, part in enumerate(parts):
        path, tp = parts[: i + 1], _container_arm(tp)
        origin = get_origin(tp)
        if dataclasses.is_dataclass(tp):
            if part not in hints(tp):
                hint = suggest(part, hints(tp))
                raise UserError(
                    f"unknown recipe key {key_path(path)} (in override {override!r}).{hint}"
                )
            child_tp = hints(tp)[part]
        elif origin is dict or tp is Any:
            child_tp = get_args(tp)[1] if origin is dict else Any
        else:  # a list: the descent below only enters containers
            child_tp = get_args(tp)[0]
        key: Any = part
        if isinstance(node, list):
            if not part.isdecimal() or int(part) > len(node):
                raise UserError(
                    f"bad override {override!r}: {part!r} is not an index into recipe key "
                    f"{key_path(path[:-1])} (a list of length {len(node)})"
                )
            key = int(part)
            if key == len(node):
                node.append(None)
        if i == len(parts) - 1:
            node[key] = value
            break
        arm = _container_arm(child_tp)
        if not (arm is Any or dataclasses.is_dataclass(arm) or get_origin(arm) in (list, dict)):
            raise UserError(
                f"bad override {override!r}: recipe key {key_path(path)} has no sub-keys"
            )
        child = node[key] if isinstance(node, list) else node.get(key)
        if child is None and dataclasses.is_dataclass(tp) and key not in node:
            # Absent from the file: start from the default, so `schedule.phases.0.freeze=all`
            # edits the default phase instead of failing on an empty list.
            child = _default_plain(tp, key)
        want = list if get_origin(arm) is list else dict
        if child is None:  # null or no default: create the container the schema expects
            child = want()
        node[key] = child
        if not isinstance(child, (dict, list) if child_tp is Any else want):
            raise UserError(
                f"bad override {override!r}: recipe key {key_path(path)} is {show(child)}, "
                f"not {'a list' if want is list else 'a mapping'}"
            )
        node, tp = child, child_tp
    return result


def parse_recipe(data: dict, overrides: Sequence[str] = (), source: str = "<recipe>") -> Recipe:
    """Validate a recipe mapping (after applying `overrides`) and build a `Recipe`.

    Raises `UserError` listing every problem found, each with its key path; `source` (a file
    name) prefixes the message.
    """
    prefix = "" if source == "<recipe>" else f"{source}: "
    try:
        for override in overrides:
            data = apply_override(data, override)
    except UserError as err:
        raise UserError(f"{prefix}{err}") from None
    errors: list[str] = []
    recipe = build(Recipe, data, [], errors)
    if recipe is not None:
        errors = cross_checks(recipe)
    if errors:
        raise UserError(prefix + "; ".join(errors))
    return normalized(recipe)


LIBRARY = Path(__file__).parent / "library"  # the recipes shipped with transferkit


def shipped_recipes() -> list[str]:
    """Names of the recipes that ship inside the package (`digits_transfer`, ...)."""
    return sorted(p.stem for p in LIBRARY.glob("*.yaml"))


def find_recipe(name: str | Path) -> Path:
    """A recipe file: `name` itself when it exists, else the shipped recipe of that name."""
    path = Path(name)
    shipped_name = (LIBRARY / f"{path.name}.yaml").is_file()
    if (
        path.is_file()
        and path.suffix.lower() in _DATA_TABLES
        or (path.is_dir() and not shipped_name)
    ):
        raise UserError(f"{name} is data, not a recipe; `transferkit fit {name}` plans a run "
                        "for it (and writes the recipe, plan.yaml)")  # fmt: skip
    if path.is_file():
        return path
    shipped = LIBRARY / f"{path.stem}.yaml"
    if path.parent == Path(".") and path.suffix in ("", ".yaml") and shipped.is_file():
        return shipped
    names = shipped_recipes()
    raise UserError(
        f"recipe file not found: {name}; give a YAML file, or one of the shipped recipes: "
        f"{', '.join(names)}.{did_you_mean(path.stem, names)}"
    )


_DATA_TABLES = (".csv", ".tsv", ".parquet", ".pq", ".jsonl", ".ndjson")


def read_recipe_file(path: str | Path) -> dict:
    """The YAML mapping of a recipe file (or shipped recipe name), not yet validated."""
    path = find_recipe(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read recipe {path}: {err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{where}: invalid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe must be a YAML mapping, got {show(data)}")
    return data


def recipe_to_dict(recipe: Recipe) -> dict:
    """A plain, YAML/JSON-ready dict of every setting (defaults included); parses back equal."""
    return dataclasses.asdict(recipe)


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write the fully resolved recipe as YAML (parent folders are created)."""
    path = Path(path)
    try:
        text = yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except yaml.YAMLError as err:  # model.kwargs set from Python may hold non-YAML objects
        raise UserError(f"cannot write recipe {path}: {err}") from None
    except OSError as err:
        raise UserError(f"cannot write recipe {path}: {err}") from None
