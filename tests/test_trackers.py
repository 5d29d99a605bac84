"""`train.trackers`: MLflow (a file store in the run folder) and W&B (offline) get the values
TensorBoard gets and the recipe as config, read back here from what they wrote; a resumed run
continues the same tracker run; a tracker that is not installed is one error naming the extra."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import QUICK, ROOT

from transferkit.engine import train
from transferkit.errors import UserError
from transferkit.recipes import load_recipe
from transferkit.rundir import RunDir

pytest.importorskip("mlflow", reason="the mlflow extra (pip install 'transferkit[mlflow]')")
pytest.importorskip("wandb", reason="the wandb extra (pip install 'transferkit[wandb]')")

TRACKED = [*QUICK, "train.trackers=[tensorboard, mlflow, wandb]", "train.log_every=1"]
WATCHED = "val/digit/accuracy"


def _wandb_records(path: Path) -> list[bytes]:
    """The records of a W&B `.wandb` file: a 7-byte W&B header, then LevelDB's log format
    (32 KiB blocks of chunks with a 7-byte header: checksum, length, full/first/middle/last)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, block, pending, records = 7, 32768, b"", []
    while position + 7 <= len(data):
        room = block - position % block
        if room < 7:  # a block's tail too short for a header is padding
            position += room
            continue
        length, kind = (
            int.from_bytes(data[position + 4 : position + 6], "little"),
            data[position + 6],
        )
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind in (2, 3):
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
            pending = b""
    return records


def _wandb_logged(run_dir: Path) -> tuple[set[str], dict[int, float], dict[str, str]]:
    """Run ids, the watched metric by step, and the config, from every offline run folder."""
    from wandb.proto import wandb_internal_pb2

    ids, watched, config = set(), {}, {}
    for file in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for raw in _wandb_records(file):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(raw)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
                config |= {u.key: json.loads(u.value_json) for u in record.run.config.update}
            elif kind == "history":
                items = {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in record.history.item
                }  # a name with "/" comes as its parts
                if WATCHED in items:
                    watched[items["_step"]] = items[WATCHED]
    return ids, watched, config


def test_mlflow_and_wandb_get_the_values_and_a_resume_continues_their_runs(
    workdir, tmp_path, monkeypatch
):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(workdir)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "tracked"
    train(load_recipe(ROOT / "recipes/digits_source.yaml", TRACKED), output=str(out))
    run = RunDir(out)
    first_ids = run.tracker_ids()
    assert set(first_ids) == {"mlflow", "wandb"}
    train(run.recipe(["train.epochs=3"]), resume=str(out))  # one more epoch, in a new process
    assert run.tracker_ids() == first_ids
    expected = {r["step"]: r[WATCHED] for r in run.records()}
    assert len(expected) == 3

    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "digits_source"]
    (only,) = client.search_runs([experiment.experiment_id])  # the resume added no second run
    assert only.info.run_id == first_ids["mlflow"]
    history = client.get_metric_history(only.info.run_id, WATCHED)
    assert {m.step: m.value for m in history} == pytest.approx(expected)
    assert only.data.params["train.lr"] == str(run.recipe().train.lr)
    assert only.data.params["model.backbone"] == run.recipe().model.backbone
    steps = {m.step for m in client.get_metric_history(only.info.run_id, "train/loss")}
    assert len(steps) >= 6  # per step too (train.log_every=1)

    ids, watched, config = _wandb_logged(out)
    assert ids == {first_ids["wandb"]} and len(list((out / "wandb").glob("offline-run-*"))) == 2
    assert watched == pytest.approx(expected)
    assert config["train.lr"] == run.recipe().train.lr and config["data.max_samples"] == 48
    assert list((out / "tensorboard" / "tensorboard").glob("events.out.tfevents.*"))


def test_a_tracker_that_is_not_installed_is_one_error_naming_the_extra(
    workdir, tmp_path, monkeypatch
):
    monkeypatch.chdir(workdir)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "mlflow" else find_spec(name, *a),
    )
    recipe = load_recipe(ROOT / "recipes/digits_source.yaml", [*QUICK, "train.trackers=[mlflow]"])
    with pytest.raises(UserError, match=r"pip install 'transferkit\[mlflow\]'"):
        train(recipe, output=str(tmp_path / "no_mlflow"))
    assert not RunDir(tmp_path / "no_mlflow").has_model()
    with pytest.raises(UserError, match="train.trackers"):
        load_recipe(ROOT / "recipes/digits_source.yaml", ["train.trackers=[neptune]"])


def test_no_trackers_writes_no_logs(workdir, tmp_path, monkeypatch):
    monkeypatch.chdir(workdir)
    recipe = load_recipe(ROOT / "recipes/digits_source.yaml", [*QUICK, "train.trackers=[]"])
    out = Path(train(recipe, output=str(tmp_path / "quiet")))
    assert RunDir(out).is_complete() and not (out / "tensorboard").exists()
