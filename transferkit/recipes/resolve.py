"""One way from whatever names a recipe to a validated `Recipe`: `resolve_recipe`.

A source is a YAML file, a shipped recipe's name, a mapping or a `Recipe`; keyword sections
(`train={"epochs": 5}`) merge into it and `key.path=value` overrides apply last, so every error
names its key the same way. A recipe saved in a run folder is resolved with the folder it was
trained in (`origin`): a relative `data.path` or `model.weights` file that does not exist from
here but does from there is made absolute for reading, while `written` keeps the paths as the
user wrote them, which is what the run folder's recipe.yaml records.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transferkit.errors import UserError
from transferkit.recipes.io import (
    LIBRARY,
    find_recipe,
    parse_recipe,
    read_recipe_file,
    recipe_to_dict,
)
from transferkit.recipes.schema import Recipe

RecipeSource = str | os.PathLike | Mapping | Recipe


@dataclass(frozen=True)
class ResolvedRecipe:
    recipe: Recipe  # validated and normalized; its paths usable from the working directory
    written: Recipe  # the same with data.path and model.weights as the user wrote them
    shipped: bool = False  # one of the recipes that ship inside the package

    def check_data(self) -> None:
        """A shipped recipe reads the example data `make demo` writes: say how to write it
        when it is missing here, before anything else fails on it."""
        data = self.recipe.data
        if self.shipped and data.source != "hub" and not Path(data.path).expanduser().exists():
            raise UserError(
                f"the shipped recipe {self.recipe.name} reads {data.path}, the example digits "
                f"that `make demo` writes, and it is not in {Path.cwd()}; write it here with "
                "`python -m transferkit.demo --data-only`, or run from the folder of `make demo`"
            )


def resolve_recipe(
    source: RecipeSource,
    overrides: Sequence[str] = (),
    *,
    sections: Mapping[str, Any] | None = None,
    origin: Path | None = None,
    where: str = "<recipe>",
) -> ResolvedRecipe:
    """Validate a recipe source with its sections and overrides (see the module docstring);
    errors start with `where` (a file's path) when the source is a mapping read from one."""
    name, shipped = "", False
    if isinstance(source, Recipe):
        if not overrides and not sections:  # validated already
            written = source if source.name else dataclasses.replace(source, name="run")
            return ResolvedRecipe(_with_origin(written, origin), written)
        data = recipe_to_dict(source)
    elif isinstance(source, Mapping):
        data = copy.deepcopy(dict(source))
    elif isinstance(source, (str, os.PathLike)):
        path = find_recipe(source)
        data, name, where = read_recipe_file(path), path.stem, str(path)
        shipped = path.parent == LIBRARY
    else:
        raise UserError(
            f"recipe: expected a YAML path, a shipped recipe name, a mapping or a Recipe, "
            f"got {type(source).__name__}"
        )
    written = parse_recipe(merged(data, sections or {}), overrides, source=where)
    if not written.name:
        written = dataclasses.replace(written, name=name or "run")
    return ResolvedRecipe(_with_origin(written, origin), written, shipped)


def merged(base: Mapping, update: Mapping) -> dict:
    """`update` merged into `base` recursively (mappings merge, anything else replaces)."""
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def from_origin(value: str, origin: Path) -> str:
    """`value` as given when it exists from here (or is absolute); else under `origin` when it
    exists there."""
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists() or not (origin / path).exists():
        return value
    return str(origin / path)


def _with_origin(recipe: Recipe, origin: Path | None) -> Recipe:
    """`recipe` with its relative paths read from `origin` where only there they exist."""
    if origin is None:
        return recipe
    data, model = recipe.data, recipe.model
    if data.source != "hub" and data.path:
        data = dataclasses.replace(data, path=from_origin(data.path, origin))
    if model.weights not in (None, "pretrained"):
        model = dataclasses.replace(model, weights=from_origin(model.weights, origin))
    if data.unlabeled:
        data = dataclasses.replace(data, unlabeled=from_origin(data.unlabeled, origin))
    distill = recipe.distill
    if distill is not None:
        distill = dataclasses.replace(distill, teacher=from_origin(distill.teacher, origin))
    return dataclasses.replace(recipe, data=data, model=model, distill=distill)


def load_recipe(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Recipe:
    """Read and validate a YAML recipe (a file, or a shipped recipe's name); an empty `name`
    becomes the file's stem."""
    return resolve_recipe(path, overrides).recipe
