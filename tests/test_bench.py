"""The benchmark suite runs (at toy sizes) and reports every section, so it cannot rot."""

from __future__ import annotations

import json

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

    from transferkit.digits import write_overlaid_digits

    first = write_overlaid_digits(tmp_path / "a", n=20, seed=1)
    second = write_overlaid_digits(tmp_path / "b", n=20, seed=1)
    rows = list(csv.DictReader((first / "manifest.csv").open()))
    assert len(rows) == 20 and set(rows[0]) == {"image", "left", "right"}
    assert all(r["left"] in "0123456789" and r["right"] in "0123456789" for r in rows)
    image = rows[3]["image"]
    assert (first / image).read_bytes() == (second / image).read_bytes()
