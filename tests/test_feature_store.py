"""The shared feature cache (features/store.py, docs/feature_cache.md): heads trained from
it equal heads trained without it, every key input changes the key, a killed build leaves
nothing that looks complete, two processes asking at once build once, LRU eviction, the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pyarrow as pa
import pytest
import torch
from conftest import epoch_end_weights

from transferkit.cli import main as cli
from transferkit.data import TaskImageDataset, build_transforms, load_data
from transferkit.data.config import DataSection, TaskSection
from transferkit.engine import train
from transferkit.errors import UserError
from transferkit.features.store import (
    MANIFEST,
    FeatureStore,
    data_fingerprint,
    shared_cache,
)
from transferkit.models import create_backbone
from transferkit.models.backbone import Backbone
from transferkit.recipes import parse_recipe
from transferkit.rundir.folder import RunDir
from transferkit.runs import evaluate_run
from transferkit.select.lr_range_test import range_test

NAME = "timm:test_resnet {}"
CPU = torch.device("cpu")


@pytest.fixture
def tiny_data(workdir, tmp_path) -> Path:
    """A manifest of 24 digit images of this test's own (the test may change its files)."""
    source = workdir / "data" / "digits" / "transfer"
    lines = (source / "manifest.csv").read_text().splitlines()
    header, rows = lines[0], lines[1:25]
    (tmp_path / "data" / "images").mkdir(parents=True)
    for row in rows:
        image = row.split(",")[0]
        shutil.copy(source / image, tmp_path / "data" / image)
    manifest = tmp_path / "data" / "manifest.csv"
    manifest.write_text("\n".join([header, *rows]) + "\n")
    return manifest


def _backbone() -> Backbone:
    torch.manual_seed(0)
    backbone = create_backbone("timm:test_resnet")
    backbone.freeze("all")
    return backbone


def _dataset(
    manifest: Path, backbone: Backbone, size: int = 32, rows: int | None = None
) -> TaskImageDataset:
    data = DataSection(source="manifest", path=str(manifest), val_split=None, max_samples=rows)
    loaded = load_data(
        data, {"digit": TaskSection(kind="multiclass")}, seed=0, carve_validation=False
    )
    transform = build_transforms(backbone.data_config, False, "none", size)
    return TaskImageDataset(loaded.splits["train"], loaded.tasks, transform)


def _ask(store: FeatureStore, backbone: Backbone, dataset, name: str = NAME):
    return shared_cache(store, backbone, name, dataset, 8, 0, CPU, max_gb=1.0)


def _direct(backbone: Backbone, dataset) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([backbone(dataset[i]["image"][None]) for i in range(len(dataset))])


# ------------------------------------------------------------------------------ correctness
def _recipe(workdir: Path, name: str, cache: str, cache_dir: Path, limit_gb: float = 20.0):
    return parse_recipe({
        "name": name, "seed": 0, "model": {"backbone": "timm:test_resnet"},
        "tasks": {"digit": {"kind": "multiclass"}},
        "data": {"source": "manifest", "path": str(workdir / "data/digits/transfer/manifest.csv"),
                 "val_split": None, "image_size": 32, "augment": "none", "max_samples": 64},
        "schedule": {"phases": [{"from_epoch": 0, "freeze": "all"}]},
        "train": {"epochs": 2, "batch_size": 16, "feature_cache": cache, "keep_checkpoints": 1,
                  "feature_cache_dir": str(cache_dir), "feature_cache_limit_gb": limit_gb},
    })  # fmt: skip


def _probe(workdir: Path, name: str, cache: str, cache_dir: Path, limit_gb: float = 20.0) -> Path:
    recipe = _recipe(workdir, name, cache, cache_dir, limit_gb)
    return train(recipe, output=str(cache_dir.parent / name))


def test_heads_from_a_warm_cache_equal_cold_and_uncached(workdir, tmp_path, capsys, monkeypatch):
    cache_dir = tmp_path / "cache"
    uncached = _probe(workdir, "uncached", "forbid", cache_dir)
    assert not cache_dir.exists()
    cold = _probe(workdir, "cold", "auto", cache_dir)
    assert "features: computed once into the shared cache" in capsys.readouterr().out
    entries = sorted(p.name for p in cache_dir.iterdir() if not p.name.startswith("."))
    assert len(entries) == 2  # the train and the validation split

    def no_backbone(self, images):
        raise AssertionError("a warm cache must not run the backbone")

    monkeypatch.setattr(Backbone, "forward", no_backbone)
    warm = _probe(workdir, "warm", "auto", cache_dir)
    assert "features: read from the shared cache" in capsys.readouterr().out
    expected = epoch_end_weights(uncached)
    heads = [k for k in expected if k.startswith("heads.")]
    assert heads
    for run in (cold, warm):
        weights = epoch_end_weights(run)
        for key in heads:
            assert torch.allclose(weights[key], expected[key], rtol=0, atol=1e-5), (run, key)
    assert sorted(p.name for p in cache_dir.iterdir() if not p.name.startswith(".")) == entries

    # lr-find on the probe phase and eval of the probe's heads read the same entries.
    found = range_test(_recipe(workdir, "lr_find", "auto", cache_dir), steps=12)
    assert len(found.lrs) >= 3 and found.suggestion > 0
    values = evaluate_run(warm, split="validation")
    best = RunDir(warm).summary()["best"]
    assert values["validation/digit/accuracy"] == pytest.approx(best, abs=1e-6)
    assert sorted(p.name for p in cache_dir.iterdir() if not p.name.startswith(".")) == entries


def test_each_key_input_is_a_miss(tiny_data, tmp_path):
    store = FeatureStore(tmp_path / "cache")
    backbone = _backbone()
    base = _dataset(tiny_data, backbone)
    first, hit = _ask(store, backbone, base)
    assert not hit
    again, hit = _ask(store, _backbone(), _dataset(tiny_data, _backbone()))  # rebuilt: same key
    assert hit and torch.equal(again.features, first.features)
    spelled_out = _backbone()  # the same freeze, written as the last group's prefix
    spelled_out.freeze(f"up_to:{spelled_out.group_names[-1]}")
    assert _ask(store, spelled_out, base)[1]

    changed_weights = _backbone()
    with torch.no_grad():
        next(changed_weights.parameters()).add_(1e-3)
    smaller_crop = _backbone()
    smaller_crop.data_config = dataclasses.replace(smaller_crop.data_config, crop_pct=0.8)
    partly_frozen = _backbone()
    partly_frozen.freeze(f"up_to:{partly_frozen.group_names[-2]}")
    changes = {
        "weights": (changed_weights, base, NAME),
        "transform": (backbone, _dataset(tiny_data, smaller_crop), NAME),
        "size": (backbone, _dataset(tiny_data, backbone, size=40), NAME),
        "frozen groups": (partly_frozen, base, NAME),
        "backbone options": (backbone, base, 'timm:test_resnet {"global_pool": "max"}'),
        "row selection": (backbone, _dataset(tiny_data, backbone, rows=20), NAME),
    }
    for what, (model, dataset, name) in changes.items():
        assert not _ask(store, model, dataset, name)[1], what

    image = tiny_data.parent / tiny_data.read_text().splitlines()[5].split(",")[0]
    from PIL import Image

    Image.new("RGB", (32, 32), (255, 255, 255)).save(image)  # a data file changes
    changed = _dataset(tiny_data, backbone)
    features, hit = _ask(store, backbone, changed)
    assert not hit, "data file"
    assert torch.allclose(features.features, _direct(backbone, changed), atol=1e-5)  # not stale
    assert not torch.allclose(features.features[4], first.features[4], atol=1e-3)
    assert len([e for e in store.entries() if e.manifest]) == 1 + len(changes) + 1


def test_fingerprint_of_images_held_in_the_dataset():
    pixels = [bytes([i]) * 64 for i in range(4)]
    features = datasets.Features({"image": datasets.Image(decode=False)})

    def fingerprint(blobs: list[bytes]) -> str:
        rows = [{"bytes": b, "path": None} for b in blobs]
        return data_fingerprint(datasets.Dataset.from_dict({"image": rows}, features=features))

    assert fingerprint(pixels) == fingerprint(list(pixels))
    assert fingerprint(pixels) != fingerprint([*pixels[:3], bytes([9]) * 64])
    assert fingerprint(pixels).startswith("datasets:")


# --------------------------------------------------------------------------- several processes
BUILD = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[5])
from test_feature_store import _backbone, _dataset, _ask
from transferkit.features.store import FeatureStore

manifest, root, out, delay = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
hold = sys.argv[6] == "hold"  # the build waits for the test's `.release` file before finishing
backbone = _backbone()
dataset = _dataset(Path(manifest), backbone)
forward = backbone.forward

def slow(images):
    time.sleep(delay)
    while hold and not Path(out + ".release").exists():
        time.sleep(0.02)
    return forward(images)

backbone.forward = slow
ready, go = Path(out + ".ready"), Path(out + ".go")
ready.touch()  # set up (imports, data): the test says when to ask
while not go.exists():
    time.sleep(0.02)
Path(out + ".asking").touch()
start = time.time()
cache, hit = _ask(FeatureStore(root), backbone, dataset)
json.dump({"hit": hit, "start": start, "end": time.time(), "features": cache.features.tolist()},
          open(out, "w"))
"""


def _start(
    tmp_path: Path, manifest: Path, out: str, delay: float, hold: bool = False
) -> subprocess.Popen:
    """A process that sets up, then asks for the features when `_go(tmp_path, out)` says so."""
    script = tmp_path / "build.py"
    script.write_text(BUILD)
    args = [sys.executable, str(script), str(manifest), str(tmp_path / "cache"),
            str(tmp_path / out), str(delay), str(Path(__file__).parent),
            "hold" if hold else "go"]  # fmt: skip
    return subprocess.Popen(args, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _wait(condition, process: subprocess.Popen, what: str) -> None:
    deadline = time.time() + 300
    while not condition():
        assert process.poll() is None and time.time() < deadline, f"{what} never happened"
        time.sleep(0.05)


def _go(tmp_path: Path, out: str, process: subprocess.Popen) -> None:
    _wait((tmp_path / f"{out}.ready").exists, process, "set-up")
    (tmp_path / f"{out}.go").touch()


def _building(tmp_path: Path, process: subprocess.Popen) -> None:
    """Until the builder has begun writing features (its partial Arrow file exists)."""
    _wait(lambda: list((tmp_path / "cache").rglob("*.partial")), process, "the build")


@pytest.mark.slow
def test_a_killed_build_leaves_nothing_complete_and_is_rebuilt(tiny_data, tmp_path):
    builder = _start(tmp_path, tiny_data, "killed.json", delay=5.0)
    _go(tmp_path, "killed.json", builder)
    _building(tmp_path, builder)
    os.kill(builder.pid, signal.SIGKILL)
    builder.wait()
    store = FeatureStore(tmp_path / "cache")
    (entry,) = store.entries()
    assert entry.manifest is None and not (entry.path / MANIFEST).exists()  # not complete
    backbone = _backbone()
    dataset = _dataset(tiny_data, backbone)
    features, hit = _ask(store, backbone, dataset)  # the OS released the dead builder's lock
    assert not hit
    assert torch.allclose(features.features, _direct(backbone, dataset), atol=1e-5)
    assert [e.manifest is not None for e in store.entries()] == [True]
    assert not list((tmp_path / "cache").rglob("*.partial"))


@pytest.mark.slow
def test_two_processes_asking_at_once_build_once(tiny_data, tmp_path):
    # The builder holds its build open until the reader has asked: the order is certain even
    # on a loaded machine, where fixed delays were not.
    builder = _start(tmp_path, tiny_data, "first.json", delay=0.1, hold=True)
    reader = _start(tmp_path, tiny_data, "second.json", delay=0.1)
    _go(tmp_path, "first.json", builder)
    _building(tmp_path, builder)  # the first holds the lock and is computing
    _go(tmp_path, "second.json", reader)
    _wait((tmp_path / "second.json.asking").exists, reader, "the second request")
    time.sleep(0.5)  # the reader is now blocked on the builder's lock
    (tmp_path / "first.json.release").touch()
    assert builder.wait(timeout=300) == 0 and reader.wait(timeout=300) == 0
    first = json.loads((tmp_path / "first.json").read_text())
    second = json.loads((tmp_path / "second.json").read_text())
    assert not first["hit"] and second["hit"]  # one built it, the other read it
    assert second["start"] < first["end"] <= second["end"]  # it asked during the build, waited
    assert first["features"] == second["features"]
    assert len(FeatureStore(tmp_path / "cache").entries()) == 1


# --------------------------------------------------------------------------------- bounded
def _fake_entry(store: FeatureStore, key: str, megabytes: float, used: float) -> None:
    folder = store.begin(key)
    (folder / "data.bin").write_bytes(b"\0" * int(megabytes * 1e6))
    store.commit(key, {"count": 1, "width": 1, "processes": 1})
    os.utime(folder / "last_used", (used, used))


def test_least_recently_used_entries_go_first_until_the_cache_fits(tmp_path):
    store = FeatureStore(tmp_path, limit_gb=0.0025)  # 2.5 MB
    now = time.time()
    for age, key in enumerate(["newest", "middle", "older", "oldest"]):
        _fake_entry(store, key, 1.0, now - 100 * age)
    assert [e.key for e in store.entries()] == ["oldest", "older", "middle", "newest"]
    assert store.evict(keep="oldest") == ["older", "middle"]  # the kept one stays
    assert sorted(e.key for e in store.entries()) == ["newest", "oldest"]
    with store.lock("newest"):  # being built elsewhere: never removed under its builder
        store.limit_bytes = 0
        assert store.evict() == ["oldest"]
    assert [e.key for e in store.entries()] == ["newest"]


def test_cache_list_and_clear(tmp_path, capsys):
    store = FeatureStore(tmp_path)
    for key in ("aaaa1111", "bbbb2222", "cccc3333"):
        _fake_entry(store, key, 0.01, time.time())
    (tmp_path / "dddd4444").mkdir()  # a killed build's leftovers
    assert cli(["cache", "list", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "4 entries" in out and "aaaa1111" in out and "incomplete" in out
    assert cli(["cache", "clear", "bbbb", "--dir", str(tmp_path)]) == 0
    assert sorted(e.key for e in store.entries()) == ["aaaa1111", "cccc3333", "dddd4444"]
    assert cli(["cache", "clear", "--dir", str(tmp_path)]) == 2
    assert "give --all" in capsys.readouterr().err
    assert cli(["cache", "clear", "zzzz", "--dir", str(tmp_path)]) == 2
    assert cli(["cache", "clear", "--all", "--dir", str(tmp_path)]) == 0
    assert store.entries() == [] and "removed 3 entries" in capsys.readouterr().out
    assert cli(["cache", "list", "--json", "--dir", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["entries"] == []


def test_an_unwritable_cache_folder_is_one_clear_error(tiny_data, tmp_path):
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    backbone = _backbone()
    with pytest.raises(UserError, match="train.feature_cache_dir .* train.feature_cache_shared"):
        _ask(FeatureStore(blocked / "cache"), backbone, _dataset(tiny_data, backbone))


def test_an_entry_removed_while_being_read_is_built_again(tiny_data, tmp_path, monkeypatch):
    """Readers take no lock: an entry that another process's eviction (or `cache clear`)
    removes between finding and reading it is a miss, built again, never a crash."""
    import transferkit.features.store as feature_store

    store = FeatureStore(tmp_path / "cache")
    backbone = _backbone()
    dataset = _dataset(tiny_data, backbone)
    built, hit = _ask(store, backbone, dataset)
    assert not hit
    read = feature_store.load_entry
    removed = []

    def removed_first(folder, *args):
        if not removed:  # the first read finds the entry gone
            shutil.rmtree(folder)
            removed.append(folder)
        return read(folder, *args)

    monkeypatch.setattr(feature_store, "load_entry", removed_first)
    again, hit = _ask(store, backbone, dataset)
    assert removed and not hit and len(store.entries()) == 1
    assert torch.allclose(again[0]["features"], built[0]["features"])


def test_an_entry_evicted_right_after_its_build_is_built_again(tiny_data, tmp_path, monkeypatch):
    """The lock is released before the new entry is read: another run's eviction can remove it
    in between. That is a miss built again, not a crash."""
    import transferkit.features.store as feature_store

    store = FeatureStore(tmp_path / "cache")
    backbone = _backbone()
    dataset = _dataset(tiny_data, backbone)
    read, removed = feature_store.load_entry, []

    def evicted_first(folder, *args):
        if not removed:
            shutil.rmtree(folder)
            removed.append(folder)
        return read(folder, *args)

    monkeypatch.setattr(feature_store, "load_entry", evicted_first)
    features, hit = _ask(store, backbone, dataset)
    assert removed and not hit and len(features) == len(dataset) and len(store.entries()) == 1


def test_an_entry_that_cannot_be_read_for_another_reason_is_kept(tiny_data, tmp_path, monkeypatch):
    """Only a removed or incomplete entry is rebuilt: an error such as running out of memory
    to map it is one clear error, and the entry other runs may be reading stays."""
    import transferkit.features.store as feature_store

    store = FeatureStore(tmp_path / "cache")
    backbone = _backbone()
    dataset = _dataset(tiny_data, backbone)
    _ask(store, backbone, dataset)

    def no_memory(*args):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(feature_store, "_read_entry", no_memory)
    with pytest.raises(UserError, match="cannot read the feature cache entry .* is kept"):
        _ask(store, backbone, dataset)
    assert len(store.entries()) == 1 and store.entries()[0].manifest


def test_a_run_evicts_older_entries_to_fit_its_limit_but_keeps_its_own(workdir, tmp_path):
    """After a build, least recently used entries go until the cache fits
    `train.feature_cache_limit_gb`; the run's train and validation entries both stay (the
    validation build used to evict the train entry just built under a small limit)."""
    stores = {}
    for name, limit_gb in (("roomy", 20.0), ("tight", 1e-6)):  # the default; room for none
        stores[name] = FeatureStore(tmp_path / name / "cache")
        for age, key in enumerate(["old1", "old2"]):
            _fake_entry(stores[name], key, 1.0, time.time() - 1000 * (age + 1))
        _probe(workdir, "run", "auto", stores[name].root, limit_gb=limit_gb)
    assert len(stores["roomy"].entries()) == 4  # everything fits: nothing removed
    entries = stores["tight"].entries()
    assert len(entries) == 2 and all(e.manifest and e.manifest["count"] for e in entries)
    assert not {"old1", "old2"} & {e.key for e in entries}


def test_features_stream_to_disk_while_the_entry_is_built(tiny_data, tmp_path, monkeypatch):
    """RAM holds one batch of features: each is on disk before the next is computed."""
    from transferkit.features import cache as feature_cache  # the module, to patch

    sizes = []
    append = feature_cache.ArrowStore.append

    def spy(self, chunk, rows):
        sizes.append(self.partial.stat().st_size)
        append(self, chunk, rows)

    monkeypatch.setattr(feature_cache.ArrowStore, "append", spy)
    backbone = _backbone()
    _ask(FeatureStore(tmp_path / "cache"), backbone, _dataset(tiny_data, backbone))
    assert len(sizes) == 3  # 24 images in batches of 8
    assert sizes[0] < sizes[1] < sizes[2]  # the file grew with every batch written


@pytest.mark.parametrize("max_gb", [1.0, 0.0], ids=["in_memory", "memory_mapped"])
def test_an_entry_cut_short_is_built_again(tiny_data, tmp_path, max_gb):
    """A shard with fewer rows than its manifest says (a crash after the manifest went in) is
    never read as features: the entry is rebuilt."""
    store = FeatureStore(tmp_path / "cache")
    backbone = _backbone()
    dataset = _dataset(tiny_data, backbone)
    built, _ = _ask(store, backbone, dataset)
    (shard,) = store.path(store.entries()[0].key).rglob("features.arrow")
    table = pa.ipc.open_stream(shard.read_bytes()).read_all().slice(0, 10)
    with pa.ipc.new_stream(str(shard), table.schema) as writer:
        writer.write_table(table)
    again, hit = shared_cache(store, backbone, NAME, dataset, 8, 0, CPU, max_gb=max_gb)
    assert not hit and len(again) == len(built)
    assert torch.allclose(again[len(dataset) - 1]["features"], built[len(dataset) - 1]["features"])


def test_an_entry_removed_after_its_manifest_was_read_is_a_miss(tiny_data, tmp_path, monkeypatch):
    store = FeatureStore(tmp_path / "cache")
    backbone = _backbone()
    dataset = _dataset(tiny_data, backbone)
    _ask(store, backbone, dataset)
    touch, gone = store.touch, []

    def removed_meanwhile(key):
        if not gone:  # another process removed the folder between the two calls
            gone.append(key)
            shutil.rmtree(store.path(key))
        touch(key)

    monkeypatch.setattr(store, "touch", removed_meanwhile)
    again, hit = _ask(store, backbone, dataset)
    assert gone and not hit and len(again) == len(dataset)


def test_eval_with_a_read_only_cache_folder_evaluates_the_images(workdir, tmp_path):
    cache_dir = tmp_path / "cache"
    run = _probe(workdir, "probe", "auto", cache_dir)
    shutil.rmtree(cache_dir)
    cache_dir.write_text("")  # a file where the folder was: nothing can be written there
    values = evaluate_run(run, split="validation")
    assert values["validation/digit/accuracy"] == pytest.approx(
        RunDir(run).summary()["best"], abs=1e-6
    )
