"""The benchmark suite runs (at toy sizes) and reports every section, so it cannot rot."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT


def test_bench_quick_writes_every_section(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from bench.run import main

    main(["--quick", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    assert {
        "a_overhead",
        "b_feature_cache",
        "c_multitask",
        "d_freeze_depth",
        "e_data_pipeline",
        "f_flops",
        "g_gpu",
    } <= results.keys()
    gpu = results["g_gpu"]
    if torch.cuda.is_available():
        assert gpu["transferkit_images_per_s"] > 0 and gpu["anchor_images_per_s"] > 0
        assert gpu["achieved_tflops"] > 0
    else:  # skipped, saying why, in the JSON and the markdown
        assert "no CUDA GPU" in gpu["skipped"]
        assert "(g) GPU: skipped, no CUDA GPU" in (tmp_path / "results.md").read_text()
    assert results["a_overhead"]["overhead_ratio"] > 0 and results["f_flops"]["step_gflop"] > 0
    loaders = results["e_data_pipeline"]["loaders"]["rows"]
    assert set(loaders) == {"image folder", "manifest", "shards"}
    assert all(r["transferkit_images_per_s"] > 0 and r["ratio"] > 0 for r in loaders.values())
    assert "transferkit's loader / timm's create_loader" in (tmp_path / "results.md").read_text()
    depths = results["d_freeze_depth"]
    assert (
        depths[-1]["saved_activations_mb"] < depths[0]["saved_activations_mb"]
    )  # freezing saves memory
    assert depths[-1]["trainable_params"] < depths[0]["trainable_params"]
    assert "| (a) step time" in (tmp_path / "results.md").read_text()
    cache = results["b_feature_cache"]
    assert (
        cache["shared_warm_s"] > 0 and cache["sweep_uncached_s"] > 0 and cache["warm_speedup"] > 0
    )
    assert "warm shared cache" in (tmp_path / "results.md").read_text()


def test_multitask_bench_quick_reports_delta_m_and_step_time(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from bench.multitask import main

    main(["--quick", "--out", str(tmp_path), "--methods", "sum,upgrad"])
    report = json.loads((tmp_path / "multitask.json").read_text())
    runs = [r for r in report["runs"] if r["error"] is None]
    assert {r["dataset"] for r in runs} == {"quickstart", "overlaid"}
    upgrad = [r for r in runs if r["method"] == "upgrad"]
    assert upgrad and all(r["delta_m"] is not None and r["step_vs_ew"] > 0 for r in upgrad)
    singles = [r for r in runs if r["kind"] == "single-task"]
    assert len(singles) == 5  # digit, parity, ink; left, right
    assert "| upgrad | gradient |" in (tmp_path / "multitask.md").read_text()


def test_overlaid_digits_are_deterministic_with_two_labels(tmp_path):
    import csv

    from transferkit.demo.digits import write_overlaid_digits

    first = write_overlaid_digits(tmp_path / "a", n=20, seed=1)
    second = write_overlaid_digits(tmp_path / "b", n=20, seed=1)
    rows = list(csv.DictReader((first / "manifest.csv").open()))
    assert len(rows) == 20 and set(rows[0]) == {"image", "left", "right"}
    assert all(r["left"] in "0123456789" and r["right"] in "0123456789" for r in rows)
    image = rows[3]["image"]
    assert (first / image).read_bytes() == (second / image).read_bytes()


@pytest.mark.slow
def test_quality_bench_quick_reports_every_method_and_the_chain(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from bench.quality import CHAIN_VARIANTS, RECIPE_METHODS, main

    report = main(["--quick", "--out", str(tmp_path)])
    methods = {cell["method"] for cell in report["a_budgets"]}
    assert methods == {*RECIPE_METHODS, "hand-written LP-FT"}
    assert all(0.0 <= cell["mean"] <= 1.0 for cell in report["a_budgets"])
    assert {cell["variant"] for cell in report["b_chain"]} == set(CHAIN_VARIANTS)
    markdown = (tmp_path / "quality.md").read_text()
    assert "| ImageNet LP-FT |" in markdown and "| every default |" in markdown
    # The unfreeze table: each LP-FT method's probe, first fine-tune and last epochs.
    assert "| ImageNet LP-FT | 2 | 1 |" in markdown and "| hand-written LP-FT | 2 | 1 |" in markdown
    assert "LP-FT against the hand-written loop, draw by draw" in markdown
    lpft = [r for r in report["a_runs"] if r["method"] == "ImageNet LP-FT"]
    assert lpft and all(len(r["trace"]) == 2 and r["trace"][-1] == r["accuracy"] for r in lpft)


def test_budget_split_keeps_validation_fixed_and_draws_training_per_seed(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    import pandas as pd

    from bench.quality import VAL_PER_CLASS, write_budget
    from transferkit.demo.digits import write_digits

    root = write_digits(tmp_path / "digits")
    one, other = (pd.read_csv(write_budget(root, 5, seed)) for seed in (0, 1))
    val_one, val_other = (f[f["split"] == "validation"] for f in (one, other))
    assert sorted(val_one["image"]) == sorted(val_other["image"])
    assert len(val_one) == 5 * VAL_PER_CLASS
    train_one, train_other = (f[f["split"] == "train"] for f in (one, other))
    assert (train_one["digit"].value_counts() == 5).all() and len(train_one) == 25
    assert set(train_one["image"]) != set(train_other["image"])
    assert not set(train_one["image"]) & set(val_one["image"])


@pytest.mark.slow
def test_transfer_methods_bench_quick_reports_every_measure(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from bench.transfer_methods import main

    main(["--quick", "--out", str(tmp_path), "--methods", "lpft,loha,bss"])
    report = json.loads((tmp_path / "transfer_methods.json").read_text())
    rows = report["results"]["5"]
    assert set(rows) == {"lpft", "loha", "bss"} and all(r["error"] is None for r in rows.values())
    for row in rows.values():
        assert 0 <= row["accuracy_mean"] <= 1 and row["step_s"] > 0 and row["peak_memory_mb"] > 0
    # The adapter trains a small part of what full fine-tuning (with BSS) trains.
    assert rows["loha"]["trainable_params"] < rows["bss"]["trainable_params"] / 5
    assert rows["bss"]["trainable_params"] == rows["lpft"]["trainable_params"]
    assert "| 5 | loha |" in (tmp_path / "transfer_methods.md").read_text()


@pytest.mark.slow  # about 80 s on 2 free cores: two short trainings per candidate
def test_rank_validation_quick_correlates_scores_with_reached_accuracy(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from bench.rank_validation import main

    result = main(["--quick", "--out", str(tmp_path), "--data", str(tmp_path / "digits")])
    saved = json.loads((tmp_path / "rank_validation.json").read_text())
    assert saved["candidates"] == result["candidates"] and len(result["candidates"]) == 3
    for row in result["candidates"]:
        assert {"digit", "parity", "ink"} <= row["scores"].keys()
        assert 0 <= row["reached"]["digit"] <= 1 and row["lpft_seconds"] > 0
    assert set(result["correlations"]) == {"digit/logme", "digit/knn", "parity/logme", "parity/knn"}
    for c in [*result["correlations"].values(), result["cuts"]["digit/logme"]]:
        assert c["n"] >= 3 and (c["spearman"] is None or -1 <= c["spearman"] <= 1)
    assert [r["group"] for r in result["cuts"]["rows"]].count("(output)") == 1
    assert result["candidates"][0]["wise_ft"]["alphas"] == [0.0, 0.5, 1.0]
    assert "| score vs LP-FT accuracy |" in (tmp_path / "rank_validation.md").read_text()


@pytest.mark.slow  # three short trainings: about 20 s of CPU, more on a busy machine
def test_features_bench_quick_writes_the_table(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from bench.features import main

    report = main(["--quick", "--out", str(tmp_path), "--features", "ema,temperature"])
    summary = report["summary"]
    assert set(summary) == {"baseline", "ema", "temperature"}
    # The temperature is fitted on validation and changes test confidence, never the class.
    base, scaled = summary["baseline"], summary["temperature"]
    assert scaled["digit/accuracy"] == base["digit/accuracy"]
    assert scaled["digit/ece"]["mean"] != base["digit/ece"]["mean"]
    table = (tmp_path / "features.md").read_text()
    assert "| EMA (final model) |" in table and "| temperature |" in table


def test_paired_table_counts_each_draw_against_the_loop(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from bench.quality import HAND_WRITTEN
    from bench.quality_tables import paired_table

    rows = [{"method": m, "budget": 5, "seed": s, "accuracy": a} for m, s, a in [
        ("ImageNet LP-FT", 0, 0.90), ("ImageNet LP-FT", 1, 0.80), ("ImageNet LP-FT", 2, 0.70),
        (HAND_WRITTEN, 0, 0.85), (HAND_WRITTEN, 1, 0.80), (HAND_WRITTEN, 2, 0.75)]]  # fmt: skip
    # Differences +5, 0, -5 points: mean 0, standard error 5 / sqrt(3).
    assert "| 5 | 3 | +0.0 | 2.9 | 1 / 1 / 1 |" in paired_table(
        rows, "ImageNet LP-FT", HAND_WRITTEN
    )


@pytest.mark.slow  # two short LP-FT runs of EfficientNet-Lite0: about 25 s
def test_standardize_bench_quick_compares_raw_and_standardized(tmp_path):
    from bench import standardize

    report = standardize.main(["--quick", "--out", str(tmp_path)])
    runs = report["results"]["10"]
    assert len(runs["raw"]) == len(runs["standardized"]) == 1
    assert set(standardize.METRICS) <= set(runs["raw"][0])
    table = (tmp_path / "standardize.md").read_text()
    assert "| 10 | val/ink/r2 |" in table and (tmp_path / "standardize.json").is_file()
    assert not list(tmp_path.glob("*_work"))  # the runs were left in a temporary folder


@pytest.mark.slow  # two short LP-FT runs of EfficientNet-Lite0 and their soups: about a minute
def test_soups_bench_quick_scores_every_model_on_held_out_digits(tmp_path):
    from bench import soups

    report = soups.main(["--quick", "--out", str(tmp_path)])
    (row,) = report["seeds"]
    assert set(soups.MODELS) <= set(row) and 1 <= row["kept"] <= 2
    assert row["test images"] > 500  # the transfer digits no run saw
    for who in soups.MODELS:
        assert 0.0 <= row[who]["digit/accuracy"] <= 1.0
    table = (tmp_path / "soups.md").read_text()
    assert "| greedy soup |" in table and (tmp_path / "soups.json").is_file()


@pytest.mark.slow  # a teacher and two students, two epochs at 32 px: about a minute
def test_distill_bench_quick_scores_teacher_and_students_on_held_out_images(tmp_path):
    from bench import distill

    report = distill.main(["--quick", "--out", str(tmp_path)])
    (row,) = report["results"]["digits"]
    assert set(distill.MODELS) <= set(row) and row["test images"] > 300
    for who in distill.MODELS:
        assert 0.0 <= row[who]["digit/accuracy"] <= 1.0 and row[who]["images/s"] > 0
    table = (tmp_path / "distill.md").read_text()
    assert "| student distilled |" in table and (tmp_path / "distill.json").is_file()


def test_fit_bench_quick_scores_every_method_on_unseen_test_images(tmp_path):
    from bench import fit as bench_fit

    report = bench_fit.main(["--quick", "--out", str(tmp_path), "--work", str(tmp_path / "w")])
    rows = report["rows"]
    assert [r["method"] for r in rows] == ["fit", "defaults", "full FT", "hand-written LP-FT"]
    assert all("error" not in r and 0 <= r["first"] <= 1 for r in rows), rows
    assert rows[0]["trials"] >= 1 and rows[0]["chose"] in ("probe", "lp-ft", "full")
    (entry,) = report["summary"]
    assert entry["set"] == "shapes" and entry["fit - defaults"].startswith(("+", "-"))
    assert "| shapes | 5 |" in (tmp_path / "fit.md").read_text()
    # the test images are no run's: fit trained on the 25 labelled rows (carving validation
    # from them), never on the set's 150 test images
    from transferkit.data import load_data
    from transferkit.recipes import load_recipe

    recipe = load_recipe(tmp_path / "w/runs/shapes_k5_s0_fit/recipe.yaml")
    splits = load_data(recipe.data, recipe.tasks, recipe.seed).splits
    assert (len(splits["train"]), len(splits["validation"]), len(splits["test"])) == (20, 5, 150)


def test_fit_bench_hand_written_scores_only_labelled_rows_per_task():
    """The hand-written loop's scores: accuracy per class task and R^2 per regression task,
    over each task's labelled rows only (its loss likewise ignores the unlabelled ones)."""
    import torch

    from bench.fit_handwritten import _loss, _scores
    from transferkit.core.task_spec import TaskSpec

    tasks = [TaskSpec("shape", "multiclass", 3), TaskSpec("odd", "binary"),
             TaskSpec("count", "regression")]  # fmt: skip
    targets = {"shape": torch.tensor([0, 2, 1, 1]), "odd": torch.tensor([1.0, 0.0, 1.0, 0.0]),
               "count": torch.tensor([[1.0], [2.0], [3.0], [9.0]])}  # fmt: skip
    mask = {"shape": torch.tensor([True, True, True, False]),
            "odd": torch.tensor([True, True, False, False]),
            "count": torch.tensor([True, True, True, False])}  # fmt: skip
    scale = {"count": (torch.tensor(2.0), torch.tensor(1.0))}
    right = {"shape": torch.eye(3)[[0, 2, 1, 0]] * 5, "odd": torch.tensor([[3.0], [-3.0], [-3.0], [3.0]]),
             "count": torch.tensor([[-1.0], [0.0], [1.0], [0.0]])}  # fmt: skip
    assert _scores(right, targets, mask, tasks, scale) == {"shape": 1.0, "odd": 1.0, "count": 1.0}
    wrong = {**right, "shape": torch.eye(3)[[1, 2, 1, 0]] * 5, "count": torch.zeros(4, 1)}
    scores = _scores(wrong, targets, mask, tasks, scale)
    assert abs(scores["shape"] - 2 / 3) < 1e-6 and scores["count"] == 0.0  # the mean: R^2 0
    # the unlabelled rows change neither the loss nor the scores
    changed = {**right, "shape": torch.eye(3)[[0, 2, 1, 2]] * 5, "odd": right["odd"] * -1}
    changed["odd"][:2] = right["odd"][:2]
    assert _scores(changed, targets, mask, tasks, scale) == _scores(
        right, targets, mask, tasks, scale
    )
    assert torch.equal(
        _loss(changed, targets, mask, tasks, scale), _loss(right, targets, mask, tasks, scale)
    )
    assert _loss(wrong, targets, mask, tasks, scale) > _loss(right, targets, mask, tasks, scale)


def test_checkpointing_bench_quick_measures_both_models_both_ways(tmp_path):
    from bench import grad_checkpointing

    report = grad_checkpointing.main(["--quick", "--out", str(tmp_path)])
    assert [r["model"] for r in report["rows"]] == list(grad_checkpointing.MODELS)
    for row in report["rows"]:
        assert row["off"]["step_s"] > 0 and row["on"]["step_s"] > 0
        assert row["off"]["activation_mb"] >= 0
    assert "| ViT (test_vit, 12 x 384) |" in (tmp_path / "grad_checkpointing.md").read_text()


def test_end_to_end_bench_times_both_runs_and_every_part(tmp_path):
    """One epoch, one repeat, against the hand-written loop (no timm checkout in the tests)."""
    from bench import end_to_end

    report = end_to_end.main(["--epochs", "1", "--repeats", "1", "--timm-train", "",
                              "--out", str(tmp_path)])  # fmt: skip
    assert report["anchor"].startswith("a hand-written timm loop")
    assert report["transferkit_s"][0] > 0 and report["anchor_s"][0] > 0
    parts = report["transferkit_parts_s"]
    assert parts["training steps (data loading included)"] > 0
    assert parts["validation and its metrics (the first imports torchmetrics)"] > 0
    assert parts["checkpoints"] > 0
    assert "Ratio transferkit / anchor" in (tmp_path / "end_to_end.md").read_text()
