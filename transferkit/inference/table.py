"""Batch prediction to a table: `transferkit predict MODEL FOLDER --output predictions.csv`.

One row per image (its absolute path), one column per task (label and score, the labels that
are on and every label's score, or the value; `transferkit.inference.predictions.table_columns`). Rows
are written batch by batch, so a run over a large folder that stops can `resume`: images
already in the table are skipped. A CSV grows in place (a torn last line is dropped on resume); a Parquet file cannot be
appended to, so batches go to `FILE.parts/` and are joined into FILE at the end.

Works with a run folder's `Run` and an exported `OnnxRun` alike, and imports no torch.
"""

from __future__ import annotations

import csv
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from transferkit.errors import UserError
from transferkit.inference.predictions import (
    describe_prediction,
    image_files,
    table_columns,
    table_row,
)

TABLE_FORMATS = (".csv", ".parquet")
IMAGE = "image"
ERROR = "error"  # why an image could not be read (bad_images: skip); empty for the others


@dataclass
class TableSummary:
    path: Path
    written: int  # rows added now
    already: int  # rows found from an earlier, interrupted call
    skipped: list[tuple[str, str]] = field(default_factory=list)  # unreadable: (image, reason)


def write_predictions(
    run, inputs, output, resume: bool = False, overwrite: bool = False, batch_size: int = 64,
    device=None, progress: bool = True, tta: list[str] | None = None, bad_images: str = "error",
) -> TableSummary:  # fmt: skip
    """Predict every image of `inputs` (files or folders) into the table `output` (`tta`: the
    test-time views, by default the recipe's). `bad_images: skip` writes a row for each
    unreadable image with its reason in the `error` column, and predicts the rest."""
    output = Path(output)
    if output.suffix.lower() not in TABLE_FORMATS:
        raise UserError(f"--output {output}: the table must end in {' or '.join(TABLE_FORMATS)}")
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other: pick one")
    columns = [IMAGE] + [c for spec in run.tasks.values() for c in table_columns(spec)] + [ERROR]
    table = _CsvTable(output) if output.suffix.lower() == ".csv" else _ParquetTable(output)
    if table.exists() and not (resume or overwrite):
        raise UserError(
            f"{output} exists: pass --resume to add the images it lacks, or --overwrite to replace it"
        )
    if overwrite:
        table.remove()
    if resume and table.header() == columns[:-1]:
        columns = columns[:-1]  # a table begun before the error column: kept as it was
    # Absolute paths in the table, so a resume from another directory, or with the folder
    # given another way, still finds the rows already written.
    done = {_absolute(d) for d in table.done(columns)} if resume else set()
    files = [_absolute(f) for item in _as_list(inputs) for f in image_files(Path(item))]
    todo = [f for f in files if f not in done]
    written = 0
    skipped: list[tuple[str, str]] | None = [] if bad_images == "skip" else None
    bar = _progress(len(files), len(files) - len(todo), progress)
    try:
        if todo:
            for names, probabilities in run.probabilities(todo, device, batch_size, tta, skipped):
                rows = []
                for i, name in enumerate(names):
                    row = [name]
                    for task, spec in run.tasks.items():
                        row += table_row(spec, describe_prediction(spec, probabilities[task][i]))
                    rows.append(row + [None] * (columns[-1] == ERROR))
                table.append(columns, rows)
                written += len(rows)
                bar.update(len(rows))
        if skipped and columns[-1] == ERROR:
            empty = [None] * (len(columns) - 2)
            table.append(columns, [[name, *empty, reason] for name, reason in skipped])
            written += len(skipped)  # an older table without the column lists them nowhere
        table.finish(columns)
    finally:
        bar.close()
    return TableSummary(output, written, len(files) - len(todo), skipped or [])


def _absolute(path) -> str:
    return str(Path(path).expanduser().resolve())


def _as_list(inputs) -> list:
    return [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)


def _progress(total: int, initial: int, show: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="img", desc="predict", disable=not show)


def _check_header(path: Path, found: list[str], columns: list[str]) -> None:
    if found != columns:
        raise UserError(
            f"--resume: {path} has columns {found}, this model writes {columns}; "
            "resume with the model that started it, or use --overwrite"
        )


class _CsvTable:
    def __init__(self, path: Path) -> None:
        self.path = path

    def exists(self) -> bool:
        return self.path.exists()

    def header(self) -> list[str]:
        if not self.path.is_file():
            return []
        with self.path.open(newline="") as handle:
            return next(csv.reader(handle), [])

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def done(self, columns: list[str]) -> set[str]:
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return set()
        data = self.path.read_bytes()
        if not data.endswith(b"\n"):  # interrupted mid-row: keep the complete rows only
            with self.path.open("r+b") as handle:
                handle.truncate(data.rfind(b"\n") + 1)
        with self.path.open(newline="") as handle:
            reader = csv.reader(handle)
            _check_header(self.path, next(reader, []), columns)
            return {row[0] for row in reader if row}

    def append(self, columns: list[str], rows: list[list]) -> None:
        new = not self.path.is_file() or self.path.stat().st_size == 0
        with self.path.open("a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(columns)
            writer.writerows(rows)  # one batch per write: an interruption tears one row at most

    def finish(self, columns: list[str]) -> None:
        if not self.path.is_file():
            self.append(columns, [])  # no image needed predicting: still a table with a header


class _ParquetTable:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.parts = path.with_name(path.name + ".parts")

    def exists(self) -> bool:
        return self.path.exists() or self.parts.exists()

    def header(self) -> list[str]:
        import pyarrow.parquet as pq

        files = self._files()
        return pq.read_schema(files[0]).names if files else []

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        shutil.rmtree(self.parts, ignore_errors=True)

    def _files(self) -> list[Path]:
        found = sorted(self.parts.glob("part-*.parquet")) if self.parts.is_dir() else []
        return ([self.path] if self.path.is_file() else []) + found

    def done(self, columns: list[str]) -> set[str]:
        import pyarrow.parquet as pq

        names: set[str] = set()
        for file in self._files():
            table = pq.read_table(file)
            _check_header(file, table.column_names, columns)
            names.update(table.column(IMAGE).to_pylist())
        return names

    def append(self, columns: list[str], rows: list[list]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.parts.mkdir(parents=True, exist_ok=True)
        index = len(list(self.parts.glob("part-*.parquet")))
        target = self.parts / f"part-{index:06d}.parquet"
        tmp = target.with_name(target.name + ".tmp")  # renamed once complete: no torn part
        pq.write_table(pa.table({c: [r[i] for r in rows] for i, c in enumerate(columns)}), tmp)
        os.replace(tmp, target)

    def finish(self, columns: list[str]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = [pq.read_table(f) for f in self._files()]
        if not tables:
            tables = [pa.table({c: pa.array([], pa.string()) for c in columns})]
        tmp = self.path.with_name(self.path.name + ".tmp")
        pq.write_table(pa.concat_tables(tables, promote_options="permissive"), tmp)
        os.replace(tmp, self.path)
        shutil.rmtree(self.parts, ignore_errors=True)
