"""The benchmark suite runs (at toy sizes) and reports every section, so it cannot rot."""

from __future__ import annotations

import json

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
    } <= results.keys()
    assert results["a_overhead"]["overhead_ratio"] > 0 and results["f_flops"]["step_gflop"] > 0
    depths = results["d_freeze_depth"]
    assert (
        depths[-1]["saved_activations_mb"] < depths[0]["saved_activations_mb"]
    )  # freezing saves memory
    assert depths[-1]["trainable_params"] < depths[0]["trainable_params"]
    assert "| (a) step time" in (tmp_path / "results.md").read_text()
