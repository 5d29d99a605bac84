"""Work shared out over processes, checked without launching any: which rows each process
computes for the feature cache, how they are put back in order, and loading data with the
unreadable rows another process found."""

from __future__ import annotations

import pytest
import torch

from transferkit.data import load_data
from transferkit.data.config import DataSection, TaskSection
from transferkit.features.cache import interleave, shard_rows


@pytest.mark.parametrize("count, processes", [(10, 2), (11, 2), (7, 3), (2, 4), (5, 1)])
def test_shards_cover_every_row_once_and_interleave_back_in_order(count, processes):
    shards = [list(shard_rows(count, rank, processes)) for rank in range(processes)]
    assert sorted(row for shard in shards for row in shard) == list(range(count))
    size = max(len(shard) for shard in shards)
    # As gathered: each shard padded to the largest, features = the row number.
    padded = [torch.tensor(shard + [-1] * (size - len(shard))) for shard in shards]
    assert interleave(padded, count).tolist() == list(range(count))


def test_other_processes_reuse_the_unreadable_rows_found_once(tmp_path, monkeypatch):
    from transferkit.data import loading
    from transferkit.demo.digits import write_digits

    root = write_digits(tmp_path / "digits")
    images = sorted((root / "source" / "images").iterdir())
    images[3].write_bytes(b"not an image")
    data = DataSection(source="manifest", path=str(root / "source" / "manifest.csv"),
                       val_split=None, max_samples=60)  # fmt: skip
    tasks = {"digit": TaskSection(kind="multiclass")}
    first = load_data(data, tasks, seed=0)
    assert sum(len(rows) for rows in first.bad_rows.values()) == 1
    assert first.skipped_images and images[3].name in first.skipped_images[0]

    def no_decoding(*args, **kwargs):
        raise AssertionError("a process given bad_rows must not decode the images again")

    monkeypatch.setattr(loading, "find_bad_images", no_decoding)
    again = load_data(data, tasks, seed=0, bad_rows=first.bad_rows)
    for name, split in first.splits.items():
        assert len(again.splits[name]) == len(split)
        assert again.splits[name]["digit"] == split["digit"]
