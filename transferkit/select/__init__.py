"""Before training: choosing what to train, by measurement.

- `transferability`: rank backbones (and their layers) from frozen features (`rank`);
- `scores`: LogME and a leave-one-out kNN probe, the scores `rank` uses (NumPy);
- `lr_find`: a learning-rate range test on one phase;
- `sweep`: train every combination of a grid, resumable and shareable between processes;
- `sweep --search`: trials drawn by optuna's samplers and pruned (`sampled_sweep`, `trials`);
- `fit`: from a folder or a table to a plan (`fit_plan`: tasks typed from the data), the method
  and rate chosen by trials within a time budget (`fit_search`), the run and its report.
"""

from transferkit.core import lazy_exports

_WHERE = {
    "rank": "transferkit.select.transferability",
    "primary_task": "transferkit.select.transferability",
    "rank_table": "transferkit.select.transferability",
    "write_ranking": "transferkit.select.transferability",
    "knn_score": "transferkit.select.scores",
    "logme": "transferkit.select.scores",
    "lr_find": "transferkit.select.lr_range_test",
    "range_test": "transferkit.select.lr_range_test",
    "parse_grid": "transferkit.select.grid_sweep",
    "sweep": "transferkit.select.grid_sweep",
    "search_sweep": "transferkit.select.sampled_sweep",
    "fit_score": "transferkit.select.trials",
    "noise_margin": "transferkit.select.fit_search",
    "FIT_METHODS": "transferkit.select.fit_defaults",
    "DEFAULT_BUDGET_MINUTES": "transferkit.select.fit_defaults",
    "fit": "transferkit.select.fit_run",
    "FitResult": "transferkit.select.fit_run",
    "Plan": "transferkit.select.fit_plan",
    "make_plan": "transferkit.select.fit_plan",
}
__all__ = sorted(_WHERE)
__getattr__ = lazy_exports(__name__, _WHERE)
