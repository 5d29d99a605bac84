"""The model card every finished run writes (README.md), and `transferkit push` up to the upload:
the Hub calls are replaced by a recorder, the offline and unreachable cases are real."""

from __future__ import annotations

import json
import shutil

import pytest
from huggingface_hub import constants
from huggingface_hub.utils import filter_repo_objects

from transferkit.cli import main
from transferkit.errors import UserError
from transferkit.rundir import render_card
from transferkit.rundir.folder import RunDir
from transferkit.runs.publish import push_run


def test_a_finished_run_has_a_model_card(multitask_run, source_run):
    card = (multitask_run / "README.md").read_text()
    summary = json.loads((multitask_run / "complete.json").read_text())
    data = summary["card"]["data"]
    assert card.startswith("---\nlibrary_name: transferkit\n")
    # The backbone and where its weights came from (the source run's file, loaded tensors).
    assert "Backbone: `timm:test_resnet`" in card
    assert f"Weights it started from: the weights in `{source_run}`" in card
    assert f"Loading them: loaded 90 tensors from {source_run}" in card
    # Tasks and classes.
    assert "| digit | multiclass | 5, 6, 7, 8, 9 |" in card
    assert "| parity | binary | even, odd |" in card
    ink = RunDir(multitask_run).info().task_specs["ink"]
    mean, sd = ink.target_mean[0], ink.target_std[0]
    assert (f"| ink | regression | 1 (learned standardized by the training split's mean "
            f"({mean:.3f}) and sd ({sd:.3f}); answers in the column's units) |") in card  # fmt: skip
    # Data sizes and label coverage per task: a fifth of parity and ink labels are missing.
    train = data["train"]
    assert train["images"] == 48 and train["labelled"]["digit"] == 48
    assert 0 < train["labelled"]["parity"] < 48
    parity = train["labelled"]["parity"]
    assert f"| train | 48 | 48 (100%) | {parity} ({100 * parity / 48:.0f}%) |" in card
    # Metrics per task, with the split and the epoch whose model was kept.
    best = RunDir(multitask_run).best()
    assert f"On the validation split, epoch {best['epoch']}" in card
    assert f"| digit | accuracy | {best['val/digit/accuracy']:.4f} |" in card
    assert f"| ink | mae | {best['val/ink/mae']:.4f} |" in card
    # Freeze schedule, training time, hardware.
    assert "| 0 | all | - |" in card and "| 1 | up_to:stem | layer3 0.3, layer4 1.0 |" in card
    seconds = sum(r["epoch_time_s"] for r in RunDir(multitask_run).records())
    assert f"Training time: {seconds:.0f} s" in card
    assert "Hardware: 1 x cpu" in card or "Hardware: 1 x NVIDIA" in card
    # Limitations, and the recipe itself.
    assert "## Limitations" in card and "carved at random (30%)" in card
    assert f"`parity`: {48 - parity} training images had no label for it." in card
    assert "```yaml\nname: digits_transfer" in card
    # The card is a function of the folder and the summary: rendering again gives it back.
    assert render_card(RunDir(multitask_run), summary) == card


class _Recorder:
    """Stands in for huggingface_hub.HfApi: records the calls and the files it would upload."""

    calls: list = []

    def __init__(self, token=None) -> None:
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, folder_path, repo_id, ignore_patterns, **kwargs):
        from pathlib import Path

        root = Path(folder_path)
        files = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]
        kept = sorted(filter_repo_objects(files, ignore_patterns=ignore_patterns))
        readme = (root / "README.md").read_text()
        self.calls.append(("upload_folder", repo_id, kept, readme))
        return type("Commit", (), {"commit_url": f"https://hub/{repo_id}/commit/1"})()


def test_push_uploads_the_run_folder_with_its_card(multitask_run, monkeypatch, capsys):
    import huggingface_hub

    _Recorder.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", _Recorder)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert main(["push", str(multitask_run), "me/digits", "--private", "--token", "t"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("pushed ") and "me/digits: https://hub/me/digits/commit/1" in out
    (create, repo, options), (upload, repo2, files, readme) = _Recorder.calls
    assert (create, repo, options["private"], options["exist_ok"]) == (
        "create_repo",
        "me/digits",
        True,
        True,
    )
    assert upload == "upload_folder" and repo2 == "me/digits"
    assert {"README.md", "model.safetensors", "model.json", "recipe.yaml", "metrics.jsonl",
            "complete.json"} <= set(files)  # fmt: skip
    assert not [f for f in files if f.startswith(("checkpoints/", "feature_cache/"))]
    assert any(f.startswith("checkpoints/") for f in map(str, _all_files(multitask_run)))
    assert readme == (multitask_run / "README.md").read_text() and "## Metrics" in readme


def _all_files(folder):
    return [p.relative_to(folder) for p in folder.rglob("*") if p.is_file()]


def test_push_writes_a_missing_card_first(multitask_run, tmp_path, monkeypatch):
    import huggingface_hub

    old = tmp_path / "old_run"  # finished before model cards existed
    shutil.copytree(multitask_run, old, ignore=shutil.ignore_patterns("checkpoints", "README.md"))
    _Recorder.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", _Recorder)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    push_run(old, "me/old")
    assert "README.md" in _Recorder.calls[1][2] and (old / "README.md").is_file()


def test_push_offline_or_unreachable_gives_one_clear_error(multitask_run, monkeypatch, capsys):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["push", str(multitask_run), "me/digits"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "HF_HUB_OFFLINE is set" in err

    # Not offline, but nothing listens at the endpoint: a real connection attempt fails.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(
        UserError, match=r"cannot reach the Hugging Face Hub at http://127\.0\.0\.1:9"
    ):
        push_run(multitask_run, "me/digits", token="hf_test")


def test_push_refuses_an_unfinished_run(multitask_run, tmp_path):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(multitask_run, unfinished, ignore=shutil.ignore_patterns("checkpoints"))
    (unfinished / "complete.json").unlink()
    with pytest.raises(UserError, match="is not a finished run"):
        push_run(unfinished, "me/x")
    with pytest.raises(UserError, match="no such run folder"):
        push_run(tmp_path / "nowhere", "me/x")


@pytest.mark.parametrize(
    "weights, said",
    [(None, "random initialization (trained from scratch)"),
     ("pretrained", "pretrained weights for `timm:resnet18` (`model.weights: pretrained`)"),
     ("runs/source/model.safetensors", "the weights in `runs/source/model.safetensors`")],
)  # fmt: skip
def test_the_card_says_where_the_weights_came_from(weights, said):
    from transferkit.rundir.card import _weights

    assert _weights(weights, "timm:resnet18") == said
