"""After training: what is done with a finished run folder.

- `evaluate`: a run's saved model on a split of its data, or on other data (`transferkit eval`);
- `calibration`: per-task temperatures and reliability diagrams (`transferkit calibrate`);
- `wise_ft`: WiSE-FT, the weights between the start and the fine-tuned model (`interpolate`);
- `ensemble`: averaged predictions of runs with the same tasks, and weight soups (`soups`: the
  greedy soup's path);
- `export`: ONNX, TorchScript or a torch.export program, checked against PyTorch;
- `publish`: a finished run to the Hugging Face Hub (`transferkit push`);
- `compare`: Δm% against single-task runs and seconds per step, for benchmarks and notebooks.
"""

from transferkit.core import lazy_exports

_WHERE = {
    "check_tasks": "transferkit.runs.evaluate",
    "eval_split": "transferkit.runs.evaluate",
    "evaluate_run": "transferkit.runs.evaluate",
    "calibrate_run": "transferkit.runs.calibration",
    "ece": "transferkit.runs.calibration",
    "fit_temperature": "transferkit.runs.calibration",
    "nll": "transferkit.runs.calibration",
    "Curve": "transferkit.runs.wise_ft",
    "curve_table": "transferkit.runs.wise_ft",
    "interpolate": "transferkit.runs.wise_ft",
    "interpolated": "transferkit.runs.wise_ft",
    "parse_alphas": "transferkit.runs.wise_ft",
    "ensemble_report": "transferkit.runs.ensemble",
    "evaluate_ensemble": "transferkit.runs.ensemble",
    "predict_ensemble": "transferkit.runs.ensemble",
    "soup": "transferkit.runs.ensemble",
    "SoupStep": "transferkit.runs.soups",
    "greedy_path": "transferkit.runs.soups",
    "greedy_path_table": "transferkit.runs.soups",
    "write_ensemble_report": "transferkit.runs.ensemble",
    "ExportResult": "transferkit.runs.export",
    "export_run": "transferkit.runs.export",
    "PushResult": "transferkit.runs.publish",
    "push_run": "transferkit.runs.publish",
    "delta_m": "transferkit.runs.compare",
    "seconds_per_step": "transferkit.runs.compare",
}
__all__ = sorted(_WHERE)
__getattr__ = lazy_exports(__name__, _WHERE)
