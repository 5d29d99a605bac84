"""`transferkit ensemble`: averaged predictions, soups, and clear errors for mismatched runs."""

from __future__ import annotations

import json

import pytest
from conftest import QUICK, ROOT

from transferkit.cli import main
from transferkit.engine import train
from transferkit.errors import UserError
from transferkit.recipes import load_recipe
from transferkit.runs.ensemble import evaluate_ensemble

TRANSFER = ROOT / "recipes/digits_transfer.yaml"


@pytest.fixture(scope="module")
def members(workdir, source_run):
    """Three fine-tunes of one source backbone, differing in learning rate."""
    import os

    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        return [
            str(
                train(
                    load_recipe(
                        TRANSFER, [*QUICK, f"model.weights={source_run}", f"train.lr={lr}"]
                    ),
                    output=str(workdir / "ens" / f"lr{lr}"),
                )
            )
            for lr in (0.003, 0.001, 0.0003)
        ]
    finally:
        os.chdir(cwd)


def test_ensemble_of_one_run_with_itself_is_that_run(members, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    results = evaluate_ensemble([members[0], members[0]], with_soup=True)
    for who in ("ensemble", "soup"):
        for task, values in results[members[0]].items():
            for metric, value in values.items():
                assert results[who][task][metric] == pytest.approx(value, abs=1e-6), (
                    who,
                    task,
                    metric,
                )


def test_ensemble_report_and_soup(members, workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    assert (
        main(
            [
                "ensemble",
                *members,
                "--eval",
                "--soup",
                "--output",
                str(workdir / "ens_report"),
                "--json",
            ]
        )
        == 0
    )
    results = json.loads(capsys.readouterr().out)
    assert set(results) == {*members, "ensemble", "soup"}
    assert (
        set(results["ensemble"]) == {"digit", "parity", "ink"}
        and "accuracy" in results["ensemble"]["digit"]
    )
    table = (workdir / "ens_report" / "ensemble_report.md").read_text()
    assert table.count("\n") == 2 + len(members) + 2 and "| ensemble |" in table
    # A different model from the members', better than the worst member on the digit task.
    digit = [results[m]["digit"]["accuracy"] for m in members]
    assert results["ensemble"]["digit"]["accuracy"] >= min(digit)


def test_ensemble_predict(members, workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    image = sorted((workdir / "data/digits/transfer/images").iterdir())[0]
    assert main(["ensemble", *members[:2], "--predict", str(image), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert (
        row["digit"]["label"] in {"5", "6", "7", "8", "9"} and 0.0 <= row["digit"]["score"] <= 1.0
    )
    assert row["parity"]["label"] in {"even", "odd"} and "value" in row["ink"]


def test_mismatched_runs_are_clear_errors(members, source_run, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    with pytest.raises(UserError, match="does not match"):
        evaluate_ensemble([members[0], str(source_run)])
    scratch = train(
        load_recipe(TRANSFER, [*QUICK, "model.weights=none"]),
        output=str(workdir / "ens" / "scratch"),
    )
    with pytest.raises(UserError, match="--soup: .* started from random weights"):
        evaluate_ensemble([members[0], str(scratch)], with_soup=True)
    assert main(["ensemble", members[0], "--eval"]) == 2
