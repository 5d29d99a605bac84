"""The Python API for notebooks and scripts.

    import transferkit as tk
    result = tk.fine_tune("digits_transfer", data=my_dataset_dict, train={"epochs": 5})
    result.history          # DataFrame, one row per epoch
    result.best             # {"val/digit/accuracy": ..., ...} at the kept model's epoch
    run = result.load()     # or tk.load(result.run_dir)
    run.predict(["a.png", pil_image], device="cuda", batch_size=64)

The recipe is a YAML file, a shipped recipe's name, a mapping or a `Recipe`; keyword sections
(`train={...}`) are merged into it and `overrides` are `--set` strings. In-memory data (a
`datasets.Dataset` or `DatasetDict`, or a list of `(image, labels)`) is saved into the run
folder first, so the run can be resumed and evaluated like any other.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transferkit.errors import UserError
from transferkit.recipes import Recipe, merged, resolve_recipe
from transferkit.rundir import RunDir

DATA_FOLDER = "data"  # where a run keeps in-memory data given to `fine_tune`


@dataclass
class FineTuneResult:
    """A finished run: its folder, metrics history, and the best and final metrics."""

    run_dir: RunDir

    @property
    def history(self):
        """metrics.jsonl as a DataFrame (one row per epoch)."""
        return self.run_dir.history()

    @property
    def best(self) -> dict[str, float]:
        """Validation metrics of the epoch whose model was kept (the monitored metric's best)."""
        return _validation(self.run_dir.best())

    @property
    def final(self) -> dict[str, float]:
        """Validation metrics of the last epoch."""
        return _validation(self.run_dir.final())

    def load(self):
        """The kept model, ready for `predict` (see `transferkit.load`)."""
        from transferkit.inference import load

        return load(self.run_dir)


def _validation(record: dict) -> dict[str, float]:
    return {k: v for k, v in record.items() if k.startswith("val/") and not k.endswith("/count")}


def fine_tune(
    recipe: str | os.PathLike | Mapping | Recipe,
    data: Any = None,
    *,
    output: str | os.PathLike | None = None,
    data_options: Mapping | None = None,
    overrides: Sequence[str] = (),
    resume: str | os.PathLike | None = None,
    overwrite: bool = False,
    **sections: Any,
) -> FineTuneResult:
    """Fine-tune as the recipe says (see the module docstring) and return the result.

    `data`: None (the recipe's data section); a `datasets.Dataset` (one training split; a
    validation split is carved), a `datasets.DatasetDict` (splits by name), or a list of
    `(image, labels)` pairs, images as paths or PIL images and labels as `{column: value}`;
    or a plain mapping, merged into the recipe's data section like the other sections.
    `data_options`: settings of the data section (`image_size`, `augment`, ...) to use with
    in-memory data. `overwrite`: train afresh into an `output` folder that holds a run,
    clearing it first (without it, such a folder is refused: resume it instead).
    """
    from transferkit.engine import train

    if resume is not None:
        folder = RunDir(resume)
        resolved = folder.resolved_recipe(list(overrides))
        return FineTuneResult(RunDir(train(resolved, resume=str(folder.path))))
    if isinstance(data, Mapping) and not _is_dataset(data):
        data, data_options = None, merged(dict(data), data_options or {})
    if data_options:
        sections["data"] = dict(data_options)
    if data is not None:  # the data section's source and path are replaced below
        placeholder = {"source": "disk", "path": "(in-memory data)"}
        sections["data"] = merged(placeholder, sections.get("data") or {})
    resolved = resolve_recipe(recipe, overrides, sections=sections)
    if data is None:
        resolved.check_data()
    built = resolved.recipe
    folder = RunDir(output if output is not None else f"{built.output_dir}/{built.name}")
    if data is not None:
        if overwrite and folder.path.is_dir():
            folder.clear()  # before the data is saved into it
        built = _with_data(built, data, folder)
    return FineTuneResult(RunDir(train(built, output=str(folder.path), overwrite=overwrite)))


def _is_dataset(data: Any) -> bool:
    import datasets

    return isinstance(data, (datasets.Dataset, datasets.DatasetDict))


def _with_data(recipe: Recipe, data: Any, folder: RunDir) -> Recipe:
    """Save in-memory data into the run folder and point the recipe's data section at it."""
    import datasets

    if isinstance(data, (list, tuple)):
        data = _from_pairs(data, recipe.data.image_column)
    if isinstance(data, datasets.Dataset):
        data = datasets.DatasetDict({"train": data})
    if not isinstance(data, datasets.DatasetDict):
        raise UserError(
            "data: expected a datasets.Dataset, a datasets.DatasetDict or a list of "
            f"(image, labels) pairs, got {type(data).__name__}"
        )
    image_column = _image_column(data, recipe)
    target = folder.path / DATA_FOLDER
    folder.path.mkdir(parents=True, exist_ok=True)
    data.save_to_disk(str(target))
    section = dataclasses.replace(recipe.data, source="disk", path=str(Path(target).resolve()),
                                  image_column=image_column)  # fmt: skip
    return dataclasses.replace(recipe, data=section)


def _from_pairs(pairs: Sequence, image_column: str):
    """A Dataset from `(image, {column: value})` pairs (paths or PIL images)."""
    import datasets
    import PIL.Image

    images, labels = [], {}
    for index, pair in enumerate(pairs):
        if not (
            isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[1], Mapping)
        ):
            raise UserError(f"data[{index}]: expected an (image, {{column: value}}) pair")
        image, row = pair
        if isinstance(image, (str, os.PathLike)):
            image = str(image)
        elif not isinstance(image, PIL.Image.Image):
            raise UserError(f"data[{index}]: the image must be a path or a PIL image")
        images.append(image)
        for column in row:
            labels.setdefault(column, [None] * index)
        for column, values in labels.items():
            values.append(row.get(column))
    if not images:
        raise UserError("data: the list of (image, labels) pairs is empty")
    table = datasets.Dataset.from_dict({image_column: images, **labels})
    return table.cast_column(image_column, datasets.Image())


def _image_column(data, recipe: Recipe) -> str:
    """The recipe's image column when the data has it, else the data's only image column."""
    import datasets

    split = next(iter(data.values()))
    wanted = recipe.data.image_column
    if wanted in split.column_names:
        return wanted
    found = [c for c, f in split.features.items() if isinstance(f, datasets.Image)]
    if len(found) != 1:
        raise UserError(
            f"data: no image column {wanted!r} (columns: {', '.join(split.column_names)}); "
            "set data.image_column, e.g. fine_tune(..., data_options={'image_column': 'img'})"
        )
    return found[0]
