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


def test_the_greedy_path_adds_a_member_only_when_the_soup_improves():
    """On plain numbers: best member first; a candidate goes in only on strict improvement."""
    from transferkit.runs import greedy_path

    soups = {(1, 0): 0.92, (1, 0, 2): 0.91, (1, 0, 3): 0.95}
    chosen, steps = greedy_path(
        ["a", "b", "c", "d"], [0.8, 0.9, 0.7, 0.6], lambda idx: soups[tuple(idx)]
    )
    assert chosen == [1, 0, 3]
    assert [(s.run, s.soup, s.added) for s in steps] == [
        ("b", 0.9, True), ("a", 0.92, True), ("c", 0.91, False), ("d", 0.95, True),
    ]  # fmt: skip
    # Lower is better (an error): the smallest first; a tie or NaN is no improvement.
    chosen, steps = greedy_path(
        ["a", "b", "c"], [3.0, 1.0, 2.0], lambda idx: {2: 1.0, 0: float("nan")}[idx[-1]],
        lower_is_better=True,
    )  # fmt: skip
    assert chosen == [1] and [s.run for s in steps] == ["b", "c", "a"]
    assert not any(s.added for s in steps[1:])


def test_a_greedy_soup_reports_its_path_and_saves_a_model(members, workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    saved = workdir / "ens" / "greedy_soup"
    args = ["ensemble", *members, "--eval", "--soup", "greedy", "--save-soup", str(saved)]
    assert main([*args, "--json"]) == 0
    out = capsys.readouterr()
    results = json.loads(out.out)
    assert f"wrote the greedy soup to {saved}" in out.err
    path = results["greedy path"]
    assert path["by"] == "digit/accuracy" and not path["lower_is_better"]
    alone = {m: results[m]["digit"]["accuracy"] for m in members}
    steps = path["steps"]
    assert [s["run"] for s in steps] == sorted(members, key=lambda m: -alone[m])
    assert steps[0]["added"] and [s["run"] for s in steps if s["added"]] == path["ingredients"]
    # Each accepted step beats the soup before it, so the soup is at least the best member.
    kept = [s["soup"] for s in steps if s["added"]]
    assert kept == sorted(kept) and len(set(kept)) == len(kept)
    soup_accuracy = results["greedy soup"]["digit"]["accuracy"]
    assert soup_accuracy == pytest.approx(kept[-1]) and soup_accuracy >= max(alone.values())
    # The saved soup is a model folder: eval reads it and finds the same metrics.
    from transferkit.rundir import RunDir
    from transferkit.runs import evaluate_run

    assert RunDir(saved).info().soup == {"kind": "greedy", "ingredients": path["ingredients"]}
    again = evaluate_run(saved, device="cpu")
    assert again["validation/digit/accuracy"] == pytest.approx(soup_accuracy, abs=1e-6)
    assert main(args) == 0  # the table, for reading
    assert "greedy soup by digit/accuracy (higher is better)" in capsys.readouterr().out


def test_a_run_souped_with_itself_is_not_added_twice(members, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    results = evaluate_ensemble([members[0], members[0]], with_soup="greedy")
    assert results["greedy path"]["ingredients"] == [members[0]]
    assert results["greedy soup"] == results[members[0]]
    with pytest.raises(UserError, match="--save-soup needs --soup"):
        evaluate_ensemble(members[:2], save_soup=workdir / "x")
    with pytest.raises(UserError, match="another folder than the members'"):
        evaluate_ensemble(members[:2], with_soup="greedy", save_soup=members[1])


def test_a_greedy_soup_of_runs_kept_by_their_mean_score_ranks_by_it():
    """Runs that `fit` planned for several tasks monitor `val/mean_score`: the soup ranks
    candidates by the tasks' accuracy and R^2 averaged, not by a metric no task has."""
    from types import SimpleNamespace

    from transferkit.runs.ensemble import _ranking

    tasks = {"digit": SimpleNamespace(kind="multiclass"), "ink": SimpleNamespace(kind="regression")}
    first = SimpleNamespace(info=SimpleNamespace(monitor="val/mean_score"), tasks=tasks)
    metrics = {"digit": {"accuracy": 0.8, "f1": 0.7}, "ink": {"r2": 0.4, "mae": 2.0}}
    train = SimpleNamespace(monitor_mode="max")
    by, value, lower = _ranking(first, metrics, train)
    assert (by, lower) == ("mean_score", False) and value(metrics) == pytest.approx(0.6)
    first.info.monitor = "val/ink/mae"  # an error: lower is better
    by, value, lower = _ranking(first, metrics, train)
    assert (by, lower, value(metrics)) == ("ink/mae", True, 2.0)
