"""A run folder written by an earlier version of transferkit still evaluates, predicts and
resumes, with the numbers that version gave.

`tests/fixtures/legacy_run/run/` was trained, calibrated and measured by the code of commit
18115f6, before the restructuring of issue #24 (`make_fixture.py` there says how): its
recipe.yaml, model.json, trainer_state.json and checkpoints are in that version's formats, and
`expected.json` holds what its eval, predict and a resume to 3 epochs gave.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from fixtures.legacy_run.make_fixture import digest  # the digest the expected values used

from transferkit.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "legacy_run"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())


@pytest.fixture
def legacy(tmp_path, monkeypatch) -> Path:
    """A copy of the fixture (run folder and data) as the working directory."""
    for name in ("data", "run"):
        shutil.copytree(FIXTURE / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _json_out(capsys, argv: list[str]):
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def _close(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_an_old_run_evaluates_as_it_did(legacy, capsys):
    _close(_json_out(capsys, ["eval", "run", "--json"]), EXPECTED["eval"])


def test_an_old_run_predicts_as_it_did(legacy, capsys):
    images = ["data/images/00.png", "data/images/01.png"]
    assert _json_out(capsys, ["predict", "run", *images, "--json"]) == EXPECTED["predict"]


def test_an_old_run_resumes_to_the_weights_that_version_gave(legacy, capsys):
    """Resumed to 3 epochs: the records and the final model (the best epoch's, kept from the old
    checkpoint) as that version wrote them, and the resumed weights that version reached.

    Those are compared to rounding, not bit for bit: the same code of 18115f6 rerun on another
    machine did not reproduce the checkpoint digest it had recorded (CPU kernels round by the
    instruction set they run on), and later code changed rounding on purpose (losses masked
    rather than indexed, engine/losses.py). `resumed_step9_at_18115f6.safetensors` is that
    version's own resume, rerun on 2026-12-06; any real change (a step lost, another rate, a
    phase) moves the weights by orders of magnitude more than the tolerance."""
    from safetensors.torch import load_file

    assert main(["train", "--resume", "run", "--set", "train.epochs=3"]) == 0
    want = EXPECTED["resume_to_3_epochs"]
    last = json.loads((legacy / "run/metrics.jsonl").read_text().splitlines()[-1])
    _close({k: v for k, v in last.items() if k.startswith(("val/", "train/loss"))},
           want["final_record"])  # fmt: skip
    assert digest(legacy / "run/model.safetensors") == want["model_sha256"]
    newest = sorted((legacy / "run/checkpoints").glob("step_*_end"))[-1]
    assert newest.name == "step_00000009_end"
    resumed = load_file(str(newest / "model.safetensors"))
    expected = load_file(str(FIXTURE / "resumed_step9_at_18115f6.safetensors"))
    assert set(resumed) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-4, atol=1e-5, msg=key)
