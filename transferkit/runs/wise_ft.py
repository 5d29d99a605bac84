"""`transferkit interpolate RUN_DIR --alpha 0,0.25,0.5,0.75,1`: WiSE-FT (Wortsman et al., CVPR
2022, "Robust fine-tuning of zero-shot models"), weight-space ensembles of a fine-tuned backbone
and the weights it started from.

For each alpha the backbone becomes `(1 - alpha) * start + alpha * fine_tuned`, tensor by
tensor; the task heads stay the fine-tuned ones (the start has none). alpha = 1 is the run's
model, alpha = 0 its starting backbone under the trained heads. Each mix is evaluated on a split
of the run's data, and the curve is written into the run folder (`RunDir.wise_ft_json`, `.png`);
the best mix can be saved as a model folder of its own, which `load`, `predict` and `eval` read.

The start is what the run's recipe loaded (`model.weights`: pretrained, a file or a run folder),
rebuilt exactly as the engine builds it (same constructor arguments, same seed for any tensor
the file lacks), or `start=` another weights file or run folder. Start and run must be the same
architecture: the same tensor names and shapes, else one clear error. A run trained from random
weights has no start to go back to: WiSE-FT needs a pretrained one.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from transferkit.core import LOWER_IS_BETTER, MEAN_SCORE
from transferkit.data import TaskImageDataset, collate
from transferkit.engine import evaluate, mean_score
from transferkit.errors import UserError
from transferkit.inference import Run, load, resolve_device
from transferkit.models import create_backbone, merge_adapters
from transferkit.rundir import RunDir
from transferkit.runs.evaluate import check_tasks, eval_split

DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class Curve:
    """The metrics of every mix, the monitored one, and the best alpha by it."""

    run: str
    start: str
    split: str
    monitor: str  # e.g. "validation/digit/accuracy"
    alphas: list[float]
    metrics: list[dict[str, float]]
    best_alpha: float
    saved: str | None = None

    @property
    def values(self) -> list[float]:
        return [m[self.monitor] for m in self.metrics]


def parse_alphas(text: str | list[float] | tuple[float, ...]) -> list[float]:
    """`"0,0.5,1"` or numbers -> sorted unique alphas in [0, 1], or a clear error."""
    try:
        values = [float(a) for a in (text.split(",") if isinstance(text, str) else text)]
    except ValueError:
        raise UserError(
            f"--alpha {text!r}: give numbers separated by commas, e.g. 0,0.5,1"
        ) from None
    if not values or any(not 0.0 <= a <= 1.0 for a in values):
        raise UserError(
            f"--alpha {text!r}: each alpha must lie in [0, 1] (0: the start, 1: the fine-tuned model)"
        )
    return sorted(set(values))


def _start_state(folder: RunDir, run: Run, start: str | None = None) -> tuple[dict, str]:
    """The starting backbone's state dict and a description of where it came from."""
    if start is not None and RunDir(start).has_model():
        # Another run's backbone (its heads are not used).
        return load(start).model.backbone.model.state_dict(), f"run {start}"
    recipe = folder.recipe()
    weights = start if start is not None else recipe.model.weights
    if weights is None:
        raise UserError(
            f"{folder.path} was trained from random weights (model.weights: none): WiSE-FT mixes "
            "a fine-tuned model with the pretrained weights it started from, and there are none. "
            "Pass --start WEIGHTS (a file or run folder of the same architecture)"
        )
    # The engine builds the backbone right after `set_seed(recipe.seed)`: with the same seed,
    # any tensor the weights file lacks (a non-strict load) starts exactly as it did there.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        try:
            backbone = create_backbone(run.info.backbone, weights, **run.info.model_kwargs)
        except UserError as err:
            raise UserError(
                f"cannot rebuild the start of {folder.path} (model.weights: {weights}): {err}. "
                "Relative paths are read from the current folder; run from where the run was "
                "trained, or pass --start"
            ) from None
    return backbone.model.state_dict(), f"model.weights: {weights}"


def check_same_architecture(start: dict, tuned: dict, start_name: str, run_name: str) -> None:
    """One clear error unless both state dicts have the same tensor names and shapes."""
    only_run = sorted(tuned.keys() - start.keys())
    only_start = sorted(start.keys() - tuned.keys())
    shapes = [k for k in tuned.keys() & start.keys() if tuned[k].shape != start[k].shape]
    if not (only_run or only_start or shapes):
        return
    detail = []
    if only_run:
        detail.append(f"{len(only_run)} tensors only in the run (e.g. {only_run[0]})")
    if only_start:
        detail.append(f"{len(only_start)} tensors only in the start (e.g. {only_start[0]})")
    if shapes:
        k = sorted(shapes)[0]
        detail.append(
            f"{len(shapes)} of other shapes (e.g. {k}: {tuple(tuned[k].shape)} vs {tuple(start[k].shape)})"
        )
    raise UserError(
        f"cannot interpolate {run_name} with {start_name}: they are different architectures "
        f"({'; '.join(detail)}). WiSE-FT mixes weights tensor by tensor: give a start of the "
        "run's own backbone"
    )


def mix(start: dict, tuned: dict, alpha: float) -> dict:
    """`(1 - alpha) * start + alpha * tuned` for every floating-point tensor.

    BatchNorm running means and variances are mixed like the weights: they are statistics of
    the activations that the weights produce, and the mixed weights' activations lie between
    the two ends, so mixed statistics normalize them better than either end's, and alpha = 0
    and 1 give back exactly the start and the fine-tuned model (WiSE-FT's reference code mixes
    the whole state dict too). With the default `norm_stats: auto` from pretrained weights,
    they never changed, and the mix leaves them as they are. Integer counters
    (`num_batches_tracked`) keep the fine-tuned value.
    """
    mixed = {}
    for name, value in tuned.items():
        if value.is_floating_point():
            base = start[name].to(value.dtype)
            # The ends exactly, not up to rounding: alpha 0 and 1 are the two models.
            ends = {0.0: base, 1.0: value.clone()}
            mixed[name] = ends[alpha] if alpha in ends else torch.lerp(base, value, alpha)
        else:
            mixed[name] = value.clone()
    return mixed


def _load_plain(folder: RunDir) -> Run:
    """The run with any peft adapter folded into its layers: the start has plain layers only,
    and the merged weights are the fine-tuned ones (so a saved mix is plain too)."""
    run = load(folder)
    merge_adapters(run.model)
    run.info = dataclasses.replace(run.info, adapter=None)
    return run


def interpolated(run_dir, alpha: float, start: str | None = None) -> Run:
    """The run's model with its backbone mixed at `alpha` (for `predict`, or to inspect)."""
    folder = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    run = _load_plain(folder)
    tuned = run.model.backbone.model.state_dict()
    state, name = _start_state(folder, run, start)
    check_same_architecture(state, tuned, name, str(folder.path))
    run.model.backbone.model.load_state_dict(mix(state, tuned, parse_alphas([alpha])[0]))
    return run


def interpolate(
    run_dir,
    alphas=DEFAULT_ALPHAS,
    split: str = "validation",
    start: str | None = None,
    save: str | None = None,
    device=None,
    batch_size: int | None = None,
) -> Curve:
    """Evaluate the mix at every alpha on `split`; write `wise_ft.json` and `wise_ft.png` into
    the run folder; with `save`, write the best mix there as a model folder."""
    alphas = parse_alphas(alphas)
    folder = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    run = _load_plain(folder)
    tuned = {k: v.clone() for k, v in run.model.backbone.model.state_dict().items()}
    state, start_name = _start_state(folder, run, start)
    check_same_architecture(state, tuned, start_name, str(folder.path))

    recipe, rows, specs = eval_split(folder, split)
    check_tasks(folder.path, run.tasks, specs)
    dataset = TaskImageDataset(rows, list(run.tasks.values()), run.transform,
                               bad_images=recipe.data.bad_images)  # fmt: skip
    size = batch_size or recipe.train.eval_batch_size or recipe.train.batch_size or 64
    loader = DataLoader(dataset, batch_size=size, collate_fn=collate)
    model = run.model.to(resolve_device(device))
    metrics = []
    for alpha in alphas:
        model.backbone.model.load_state_dict(mix(state, tuned, alpha))
        metrics.append(evaluate(model, loader, run.tasks, prefix=split))

    watched = run.info.monitor or f"val/{next(iter(run.tasks))}/accuracy"
    monitor = f"{split}/{watched.split('/', 1)[1]}"
    if watched.endswith(f"/{MEAN_SCORE}"):  # a multi-task run kept by its tasks' mean score
        for values in metrics:
            values[monitor] = mean_score(values, run.tasks, split)
    if monitor not in metrics[0]:
        monitor = next(k for k in metrics[0] if not k.endswith("/count"))
    lower = monitor.rsplit("/", 1)[-1] in LOWER_IS_BETTER or recipe.train.monitor_mode == "min"
    values = [m[monitor] for m in metrics]
    best = alphas[values.index(min(values) if lower else max(values))]
    curve = Curve(str(folder.path), start_name, split, monitor, alphas, metrics, best)
    if save:
        curve.saved = str(_save(folder, run, state, tuned, best, start_name, Path(save)))
    folder.wise_ft_json.write_text(json.dumps(asdict(curve), indent=2))
    plot(curve, folder.wise_ft_plot)
    return curve


def _save(
    folder: RunDir, run: Run, state, tuned, alpha: float, start_name: str, path: Path
) -> Path:
    """The mix at `alpha` as a model folder (with the run's recipe, so `eval` works too)."""
    target = RunDir(path)
    if target.path.resolve() == folder.path.resolve():
        raise UserError("--save must be another folder than the run's: it would replace its model")
    target.path.mkdir(parents=True, exist_ok=True)
    model = run.model.cpu()
    model.backbone.model.load_state_dict(mix(state, tuned, alpha))
    mixed = {"alpha": alpha, "start": start_name, "run": str(folder.path)}
    target.save_model(model, dataclasses.replace(run.info, wise_ft=mixed))
    shutil.copyfile(folder.recipe_path, target.recipe_path)
    return target.path


def curve_table(curve: Curve) -> str:
    """The curve as text: one line per alpha, every non-count metric."""
    keys = [k for k in curve.metrics[0] if not k.endswith("/count")]
    width = max(len(k) for k in keys)
    lines = [f"{'alpha':>{width}s} " + " ".join(f"{a:>7.2f}" for a in curve.alphas)]
    for key in keys:
        mark = "*" if key == curve.monitor else " "
        lines.append(f"{key:>{width}s}{mark}" + " ".join(f"{m[key]:7.4f}" for m in curve.metrics))
    lines.append(f"* monitored; best alpha {curve.best_alpha:g}; start: {curve.start}")
    return "\n".join(lines)


def plot(curve: Curve, path: Path) -> Path:
    """The monitored metric (and every other of its task) against alpha."""
    from matplotlib.figure import Figure  # no pyplot: a notebook's backend is left alone

    figure = Figure(figsize=(6, 4))
    axis = figure.subplots()
    task = curve.monitor.split("/")[1]
    for key in curve.metrics[0]:
        if key.split("/")[1] == task and not key.endswith("/count"):
            style = "o-" if key == curve.monitor else ".--"
            axis.plot(curve.alphas, [m[key] for m in curve.metrics], style, label=key)
    axis.axvline(
        curve.best_alpha, color="grey", linestyle=":", label=f"best alpha {curve.best_alpha:g}"
    )
    axis.set_xlabel("alpha (0: start, 1: fine-tuned)")
    axis.set_title(f"WiSE-FT: {Path(curve.run).name} ({curve.split})")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path
