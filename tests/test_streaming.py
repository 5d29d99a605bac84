"""Streamed training data: WebDataset tar shards and Hugging Face streaming datasets.

Every sample is read once a pass by any number of processes and workers, a run resumes
mid-epoch on exactly the batches it would have trained on, and what cannot work says so.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from conftest import epoch_end_weights, write_digit_shards

from transferkit.data import DataSection, StreamedTaskDataset, TaskSection, load_data
from transferkit.engine import train
from transferkit.engine.batches import StreamLoader
from transferkit.errors import UserError
from transferkit.recipes import load_recipe
from transferkit.rundir import RunDir

pytest.importorskip("webdataset")

IDS = {"id": TaskSection(kind="regression", column="id", standardize=False)}
SHARDS, PER_SHARD, BATCH = 4, 40, 8  # one pass: 160 rows, 20 batches


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shards")
    write_digit_shards(folder, SHARDS, PER_SHARD)
    write_digit_shards(folder, 1, 40, start=1000, split="validation")
    return folder


def _loader(folder: Path, process: int, processes: int, workers: int, batches: int,
            buffer: int = 50, tasks=IDS, transform=None, source: str = "webdataset") -> StreamLoader:  # fmt: skip
    section = DataSection(source=source, path=str(folder), shuffle_buffer=buffer,
                          streaming=source == "hub")  # fmt: skip
    loaded = load_data(section, tasks, seed=0)
    dataset = StreamedTaskDataset(loaded.stream, loaded.encoder,
                                  transform or (lambda image: torch.tensor(image.size)),
                                  batch_size=BATCH, seed=0, shuffle_buffer=buffer,
                                  bad_images="skip", process=process, processes=processes,
                                  readers=max(workers, 1))  # fmt: skip
    return StreamLoader(dataset, batches, workers, "cpu")


def _ids(loader: StreamLoader) -> list[int]:
    return [int(i) for batch in loader for i in batch["targets"]["id"].tolist()]


@pytest.mark.parametrize("processes,workers", [(1, 0), (1, 2), (2, 0), (2, 2)])
def test_every_sample_is_read_once_an_epoch_across_processes_and_workers(
    shards, processes, workers
):
    """An epoch of 20 batches, shared by the processes, reads the 160 rows once each, in
    another order each epoch."""
    loaders = [_loader(shards, p, processes, workers, 20 // processes) for p in range(processes)]
    orders = []
    for epoch in range(3):
        seen = []
        for loader in loaders:
            loader.set_epoch(epoch)
            seen += _ids(loader)
        assert sorted(seen) == list(range(SHARDS * PER_SHARD)), epoch
        orders.append(seen)
    assert orders[0] != orders[1] != orders[2]


@pytest.mark.parametrize("workers", [0, 2])
def test_an_epoch_started_part_way_gives_the_batches_the_whole_epoch_gives(shards, workers):
    """`skipping(n)` (a mid-epoch resume) reads past the first n batches: what follows is the
    rest of the uninterrupted epoch, images (augmented by position) included; odd n puts the
    second worker first."""
    import torchvision.transforms.v2 as v2

    augment = v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(16, antialias=True)])
    loader = _loader(shards, 0, 1, workers, 7, transform=augment)
    loader.set_epoch(1)
    whole = list(loader)
    for skipped in (1, 4):
        rest = list(loader.skipping(skipped))
        assert len(rest) == len(whole) - skipped
        for got, expected in zip(rest, whole[skipped:]):
            assert torch.equal(got["image"], expected["image"])
            assert torch.equal(got["targets"]["id"], expected["targets"]["id"])


def test_epochs_continue_the_stream_and_a_resume_skips_whole_passes_unread(shards, monkeypatch):
    """Four epochs of 7 batches (224 rows: the 160-row pass 0 and part of pass 1) read each
    shard at most once a pass (reading is lazy): an epoch goes on from where the last stopped. A new loader resumed 2
    batches into epoch 3 (row 184, in pass 1) gives the same batches, and reads only pass 1's
    shards: pass 0's rows are counted from the tar headers, not read."""
    from transferkit.data import ShardStream

    reads = []
    read = ShardStream.read
    monkeypatch.setattr(ShardStream, "read", lambda self, shard: reads.append(shard)
                        or read(self, shard))  # fmt: skip
    loader = _loader(shards, 0, 1, 0, 7)
    epochs = []
    for epoch in range(4):
        loader.set_epoch(epoch)
        epochs.append([batch["targets"]["id"] for batch in loader])
    assert len(reads) <= 2 * SHARDS  # each epoch restarting from row 0 would read 4 + 8 + 8 + 8
    reads.clear()
    resumed = _loader(shards, 0, 1, 0, 7)
    resumed.set_epoch(3)
    rest = [batch["targets"]["id"] for batch in resumed.skipping(2)]
    assert len(reads) <= SHARDS  # reading past pass 0 would read its 4 shards first
    assert len(rest) == 5 and all(torch.equal(a, b) for a, b in zip(rest, epochs[3][2:]))


def _recipe(shards: Path, *overrides: str):
    text = f"""
name: streamed
seed: 0
model: {{backbone: "timm:test_efficientnet", weights: null}}
tasks:
  digit: {{kind: multiclass, column: cls, classes: {json.dumps([str(d) for d in range(10)])}}}
  odd: {{kind: binary}}
data: {{source: webdataset, path: {shards}, image_size: 32, augment: light, num_workers: 1}}
train: {{epochs: 2, batch_size: 8, steps_per_epoch: 6, log_every: 2}}
"""
    path = shards.parent / f"stream_recipe_{abs(hash(overrides))}.yaml"
    path.write_text(text)
    return load_recipe(path, list(overrides))


def test_a_streamed_run_trains_labels_from_cls_and_json_and_resumes_exactly(
    shards, tmp_path, monkeypatch
):
    """`KEY.cls` indexes tasks.digit.classes, `KEY.json` gives `odd`; stopped in the second
    epoch and resumed, the run ends with the weights of the run that was never stopped."""
    from test_reliability import _AskedAfter

    from transferkit.engine import trainer as trainer_module
    from transferkit.errors import Interrupted

    recipe = _recipe(shards)
    whole = RunDir(train(recipe, output=str(tmp_path / "whole")))
    assert [r["step"] for r in whole.records()] == [6, 12]
    assert whole.records()[-1]["val/digit/count"] == 40
    card = (whole.path / "README.md").read_text()
    assert f"streamed: {SHARDS} shard(s) of {shards}" in card

    monkeypatch.setattr(trainer_module, "StopRequest", lambda: _AskedAfter(checks=9))
    with pytest.raises(Interrupted) as stopped:
        train(recipe, output=str(tmp_path / "stopped"))
    assert stopped.value.step == 9  # in the second epoch, after 3 of its 6 steps
    monkeypatch.undo()
    run = RunDir(tmp_path / "stopped")
    train(load_recipe(run.recipe_path), resume=str(run.path))
    resumed, expected = epoch_end_weights(run.path), epoch_end_weights(whole.path)
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)


def test_resuming_with_another_reader_layout_says_how_to_resume(shards, tmp_path):
    recipe = _recipe(shards, "train.epochs=1")
    run = RunDir(train(recipe, output=str(tmp_path / "run")))
    more = load_recipe(run.recipe_path, ["train.epochs=2", "data.num_workers=2"])
    with pytest.raises(UserError, match=r"^this run streamed with 1 process\(es\) x 1 reader\(s\) each, "
                       r"and would resume with 1 x 2.*data.num_workers: 0 or 1"):  # fmt: skip
        train(more, resume=str(run.path))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["train.steps_per_epoch=null"], "train.steps_per_epoch: the training split streams"),
        (["tasks.digit.classes=null"], "tasks.digit.classes: the training split streams"),
        (["data.max_samples=10"], "data.max_samples: not available with a streamed"),
        (["data.val_split=null"], "data.val_split: a streamed training split cannot be carved"),
        (["data.train_split=training-*.tar"], "data.train_split: .*training-\\*.tar: no such"),
        (["train.feature_cache=force", "data.augment=none",
          "schedule.phases=[{from_epoch: 0, freeze: all}]"],
         "train.feature_cache: force, but phase 0 trains from a stream"),
    ],
    ids=["no epoch length", "no classes", "max_samples", "no validation", "no shards",
         "forced feature cache"],
)  # fmt: skip
def test_what_a_stream_cannot_do_is_one_clear_error(shards, tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        train(_recipe(shards, *overrides), output=str(tmp_path / "run"))


def test_more_processes_than_shards_is_an_error_and_workers_are_capped(shards, capsys):
    from transferkit.engine.batches import stream_readers

    assert stream_readers(4, 2, SHARDS, say=True) == 2
    assert (
        "2 workers per process, not 4: 4 shard(s) shared by 2 process(es)"
        in capsys.readouterr().out
    )
    with pytest.raises(UserError, match="4 shard\\(s\\) for 8 processes"):
        stream_readers(1, 8, SHARDS, say=False)


def test_an_unreadable_image_in_a_shard_is_skipped_or_named(tmp_path):
    """A shard with a truncated PNG: `bad_images: skip` leaves it out of its batch (with a
    warning); `error` names it."""
    import webdataset

    folder = tmp_path / "bad"
    write_digit_shards(folder, 1, 16)
    write_digit_shards(folder, 1, 8, start=500, split="validation")
    with webdataset.TarWriter(str(folder / "train-000001.tar")) as tar:
        for row in range(100, 116):
            broken = b"\x89PNG\r\n\x1a\n" + b"0" * 20 if row == 103 else None
            good = folder / "train-000000.tar"  # any valid PNG will do: take one back
            tar.write({"__key__": f"b{row}", "png": broken or _first_png(good),
                       "json": json.dumps({"id": row}).encode()})  # fmt: skip
    loader = _loader(folder, 0, 1, 0, 4)
    ids = _ids(loader)
    assert 103 not in ids and len(ids) == 31  # 32 rows in 4 batches, one left out
    loader.dataset.bad_images = "error"
    with pytest.raises(UserError, match="cannot read image b103.png"):
        _ids(loader)


def _first_png(shard: Path) -> bytes:
    import tarfile

    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".png"))
        return tar.extractfile(member).read()


def _parquet_stream(folder: Path, files: int, rows: int) -> Path:
    """`train-0000N-of-0000F.parquet` files of `rows` random 8 px images each (columns image,
    id, label: a, b or c by id) and one validation file of 8."""
    import datasets
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, count, size in (("train", files, rows), ("validation", 1, 8)):
        for index in range(count):
            table = {"image": [], "id": [], "label": []}
            for row in range(index * size, (index + 1) * size):
                png = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(png, "PNG")
                table["image"].append({"bytes": png.getvalue(), "path": None})
                table["id"].append(row)
                table["label"].append(["a", "b", "c"][row % 3])
            part = datasets.Dataset.from_dict(table).cast_column("image", datasets.Image())
            part.to_parquet(str(folder / f"{split}-{index:05d}-of-{count:05d}.parquet"))
    return folder


def test_a_hugging_face_parquet_stream_is_read_once_an_epoch_per_process(tmp_path):
    """`data.source: hub` with `data.streaming: true` on a folder of parquet files: each file
    is a shard, split over the processes like tar shards."""
    folder = _parquet_stream(tmp_path / "parquet", files=2, rows=24)
    loaders = [_loader(folder, p, 2, 0, 3, source="hub") for p in range(2)]
    for epoch in range(2):
        seen = []
        for loader in loaders:
            loader.set_epoch(epoch)
            seen += _ids(loader)
        assert sorted(seen) == list(range(48))

    text = f"""
name: hub_stream
model: {{backbone: "timm:test_resnet", weights: null}}
tasks: {{label: {{kind: multiclass, classes: [a, b, c]}}}}
data: {{source: hub, path: {folder}, streaming: true, image_size: 32, num_workers: 0}}
train: {{epochs: 1, steps_per_epoch: 3, batch_size: 8}}
"""
    (tmp_path / "hub.yaml").write_text(text)
    run = RunDir(train(load_recipe(tmp_path / "hub.yaml"), output=str(tmp_path / "run")))
    assert run.records()[-1]["step"] == 3 and run.records()[-1]["val/label/count"] == 8


def _torchrun(cwd: Path, *args: str):
    import os
    import subprocess
    import sys

    from conftest import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_port", str(free_port()), *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("source", ["webdataset", "parquet"])
def test_two_torchrun_processes_read_every_sample_once_an_epoch(shards, tmp_path, source):
    """The run `transferkit train` builds on 2 processes with 2 workers each: 4 readers, one
    shard (a tar or a parquet file) each; every epoch reads the 160 rows once between them,
    half on each process."""
    from transferkit.recipes import save_recipe

    ids = "tasks.id={kind: regression, column: id, standardize: false}"
    recipe = _recipe(shards, "train.epochs=2", "data.num_workers=2", "train.steps_per_epoch=10",
                     ids)  # fmt: skip
    if source == "parquet":
        folder = _parquet_stream(tmp_path / "parquet", files=SHARDS, rows=PER_SHARD)
        recipe = _recipe(shards, "train.epochs=2", "data.num_workers=2",
                         "train.steps_per_epoch=10", "data.source=hub", f"data.path={folder}",
                         "data.streaming=true", "tasks={label: {kind: multiclass, classes: "
                         "[a, b, c]}}", ids)  # fmt: skip
    save_recipe(recipe, tmp_path / "recipe.yaml")
    out = tmp_path / "ids.json"
    _torchrun(tmp_path, str(Path(__file__).parent / "stream_coverage.py"),
              str(tmp_path / "recipe.yaml"), str(out))  # fmt: skip
    epochs = json.loads(out.read_text())
    assert len(epochs) == 2
    for per_process in epochs:
        assert [len(ids) for ids in per_process] == [80, 80]
        assert sorted(per_process[0] + per_process[1]) == list(range(SHARDS * PER_SHARD))
    assert epochs[0] != epochs[1]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_train_and_resume_mid_epoch_exactly_from_the_cli(shards, tmp_path):
    """`transferkit train` on 2 torchrun processes; the same run resumed from its step-9
    checkpoint (in the second epoch) ends with the uninterrupted run's weights."""
    import shutil

    from transferkit.recipes import save_recipe

    recipe = _recipe(shards, "train.checkpoint_every=3", "train.keep_checkpoints=10")
    save_recipe(recipe, tmp_path / "recipe.yaml")
    whole = tmp_path / "whole"
    _torchrun(tmp_path, "-m", "transferkit.cli", "train", "recipe.yaml", "--output", str(whole))
    run = tmp_path / "resumed"
    shutil.copytree(whole, run)
    for checkpoint in RunDir(run).checkpoints():
        if int(checkpoint.name.split("_")[1]) > 9:
            shutil.rmtree(checkpoint)
    assert RunDir(run).checkpoints()[-1].name == "step_00000009"
    _torchrun(tmp_path, "-m", "transferkit.cli", "train", "--resume", str(run))
    resumed, expected = epoch_end_weights(run), epoch_end_weights(whole)
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)
    assert [r["step"] for r in RunDir(run).records()] == [6, 12]


def test_a_shard_counted_from_its_headers_has_the_rows_reading_it_gives(tmp_path):
    """What a resume skips unread must be what reading would have given: a tar with a folder
    entry, webdataset's meta files, samples of one and of three members, keys with dots."""
    import tarfile

    from transferkit.data import ShardStream

    members = ["a/", "__meta__", "a/x.png", "a/x.cls", "a/y.png", "b.c.png", "b.c.json",
               "b.c.cls", "__index__/z.png", "d.png"]  # fmt: skip
    shard = tmp_path / "train-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for name in members:
            info = tarfile.TarInfo(name.rstrip("/"))
            if name.endswith("/"):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                data = b'{"k": 1}' if name.endswith(".json") else b"1"
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    stream = ShardStream((str(shard),), DataSection(source="webdataset", path=str(tmp_path)))
    assert stream.count(str(shard)) == len(list(stream.read(str(shard)))) == 4


def test_a_hub_stream_with_class_labels_needs_no_class_list(tmp_path):
    """A `ClassLabel` column names its classes itself: the stream's integer labels are read
    by those names, in the dataset's order (c, a, b here, not sorted)."""
    import datasets

    folder = tmp_path / "labelled"
    folder.mkdir()
    features = datasets.Features({"image": datasets.Image(), "id": datasets.Value("int64"),
                                  "label": datasets.ClassLabel(names=["c", "a", "b"])})  # fmt: skip
    png = io.BytesIO()
    __import__("PIL.Image").Image.new("RGB", (8, 8)).save(png, "PNG")
    for split, rows in (("train", range(16)), ("validation", range(16, 22))):
        table = {"image": [{"bytes": png.getvalue(), "path": None}] * len(rows),
                 "id": list(rows), "label": [row % 3 for row in rows]}  # fmt: skip
        part = datasets.Dataset.from_dict(table, features=features)
        part.to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    tasks = {"label": TaskSection(kind="multiclass"), **IDS}
    loader = _loader(folder, 0, 1, 0, 2, tasks=tasks, source="hub")
    assert loader.dataset.encoder.tasks[0].class_names == ("c", "a", "b")
    for batch in loader:
        assert torch.equal(batch["targets"]["label"], batch["targets"]["id"].long() % 3)


@pytest.fixture()
def served(shards):
    """The shards over HTTP, as object storage serves them (a local server; webdataset reads
    http:// URLs through curl)."""
    import functools
    import http.server
    import shutil
    import threading

    if shutil.which("curl") is None:
        pytest.skip("webdataset reads http:// URLs with curl, which this machine lacks")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shards))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize("workers", [0, 2])
def test_shards_at_urls_are_read_once_an_epoch_and_a_resume_reads_past_them(served, workers):
    """Shards given as a URL pattern stream as local ones do: an epoch reads every row once,
    and a resume part-way (a URL cannot be counted from its headers, so it is read past)
    gives the rest of the epoch."""
    section = DataSection(source="webdataset", path=served, shuffle_buffer=50,
                          train_split=f"{served}/train-{{000000..{SHARDS - 1:06d}}}.tar",
                          val_split=f"{served}/validation-000000.tar")  # fmt: skip
    loaded = load_data(section, IDS, seed=0)
    assert len(loaded.splits["validation"]) == 40
    dataset = StreamedTaskDataset(loaded.stream, loaded.encoder, lambda image: torch.tensor(0),
                                  batch_size=BATCH, seed=0, shuffle_buffer=50, bad_images="skip",
                                  process=0, processes=1, readers=max(workers, 1))  # fmt: skip
    loader = StreamLoader(dataset, 20, workers, "cpu")
    loader.set_epoch(1)
    whole = [batch["targets"]["id"] for batch in loader]
    assert sorted(int(i) for ids in whole for i in ids) == list(range(SHARDS * PER_SHARD))
    rest = [batch["targets"]["id"] for batch in loader.skipping(5)]
    assert len(rest) == 15 and all(torch.equal(a, b) for a, b in zip(rest, whole[5:]))
