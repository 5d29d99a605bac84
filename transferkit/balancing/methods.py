"""The registry of multi-task methods that a recipe's `multitask.method` can name."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from torchjd import aggregation

from transferkit.balancing.gradients import DBMTL, GradNorm, TorchJDAggregator
from transferkit.balancing.losses import build_loss_combiner


@dataclass(frozen=True)
class Method:
    """One method: how to build it and what it promises (the property tests read these)."""

    name: str
    kind: Literal["loss", "gradient"]
    family: str
    title: str
    build: Callable[[int, dict], object]  # (num_objectives, options) -> combiner or aggregator
    signature: Callable | None = None  # what `options` are checked against
    defaults: dict = field(default_factory=dict)
    stateful: bool = False
    randomized: bool = False
    # Loss-based: the scale of the plain sum it equals at the start (sum 1, mean 1/K, UW 0.5).
    start_scale: float | str | None = None
    # Gradient-based: the result for pairwise non-conflicting gradients ("sum" or "mean").
    no_conflict_result: str | None = None
    nonconflicting: bool = False  # the direction never increases any task's loss (J d >= 0)
    # What the engine must do for it (tests check the built method agrees):
    learnable: bool = False  # weights learned by the run's optimizer
    losses_after_step: bool = False  # the batch's losses again after the update
    global_values: bool = False  # state built from loss values, averaged over processes


def _loss(name: str, family: str, title: str, signature: Callable | None, **kw) -> Method:
    global_values = kw.get("global_values", False)
    return Method(name, "loss", family, title,
                  lambda k, o: build_loss_combiner(name, k, o, global_values=global_values),
                  signature, **kw)  # fmt: skip


def _jd(name: str, family: str, title: str, cls: type, *, needs_k: bool = False, **kw) -> Method:
    def build(k: int, options: dict) -> TorchJDAggregator:
        options = {**kw.get("defaults", {}), **options}
        aggregator = cls(k, **options) if needs_k else cls(**options)
        return TorchJDAggregator(aggregator, stateful=kw.get("stateful", False))

    return Method(name, "gradient", family, title, build, cls, **kw)


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        # ---- loss-based: one backward pass
        _loss("sum", "equal", "Equal weighting, sum (static weights: tasks.NAME.weight)", None,
              start_scale=1.0),
        _loss("mean", "equal", "Equal weighting, mean", None, start_scale="1/K"),
        _loss("uw", "learned weights", "Uncertainty weighting (Kendall et al., 2018)", None,
              stateful=True, start_scale=0.5, learnable=True),
        _loss("imtl_l", "learned weights", "IMTL-L (Liu et al., 2021)", None, stateful=True,
              start_scale=1.0, learnable=True),
        _loss("dwa", "loss rates", "Dynamic weight average (Liu et al., 2019)",
              lambda temperature=2.0: None, stateful=True, start_scale=1.0, global_values=True),
        _loss("famo", "loss rates", "FAMO (Liu et al., 2023)",
              lambda lr=0.025, weight_decay=1e-3: None, stateful=True, global_values=True,
              losses_after_step=True),
        _loss("rlw", "random", "Random loss weighting (Lin et al., 2022)", None, randomized=True),
        _loss("gls", "geometric", "Geometric loss strategy (Chennupati et al., 2019)", None),
        # ---- gradient-based: one Jacobian of the shared parameters per step
        _jd("mgda", "multi-objective", "MGDA (Sener & Koltun, 2018)", aggregation.MGDA,
            nonconflicting=True),
        _jd("pcgrad", "projection", "PCGrad (Yu et al., 2020)", aggregation.PCGrad,
            randomized=True, no_conflict_result="sum"),
        _jd("cagrad", "multi-objective", "CAGrad (Liu et al., 2021)", aggregation.CAGrad,
            defaults={"c": 0.4}),
        _jd("imtl_g", "projection", "IMTL-G (Liu et al., 2021)", aggregation.IMTLG),
        _jd("nash_mtl", "multi-objective", "Nash-MTL (Navon et al., 2022)", aggregation.NashMTL,
            needs_k=True, stateful=True),
        _jd("aligned_mtl", "projection", "Aligned-MTL (Senushkin et al., 2023)",
            aggregation.AlignedMTL),
        _jd("upgrad", "multi-objective", "UPGrad (Quinton & Rey, 2024)", aggregation.UPGrad,
            nonconflicting=True, no_conflict_result="mean"),
        _jd("dualproj", "multi-objective", "DualProj (Quinton & Rey, 2024)",
            aggregation.DualProj, nonconflicting=True, no_conflict_result="mean"),
        _jd("config", "projection", "ConFIG (Liu et al., 2024)", aggregation.ConFIG,
            nonconflicting=True),
        _jd("graddrop", "random", "GradDrop (Chen et al., 2020)", aggregation.GradDrop,
            randomized=True),
        _jd("rgw", "random", "Random gradient weighting (Lin et al., 2022)",
            aggregation.Random, randomized=True),
        _jd("fairgrad", "multi-objective", "FairGrad (Ban & Ji, 2024)", aggregation.FairGrad,
            defaults={"alpha": 1.0}),
        _jd("gradvac", "projection", "GradVac (Wang et al., 2021)", aggregation.GradVac,
            stateful=True, randomized=True),
        _jd("excess_mtl", "multi-objective", "ExcessMTL (He et al., 2024)",
            aggregation.ExcessMTL, stateful=True),
        _jd("pcd", "projection", "PCD: the first task is the primary one", aggregation.PCD,
            stateful=True),
        Method("gradnorm", "gradient", "gradient norms", "GradNorm (Chen et al., 2018)",
               lambda k, o: GradNorm(k, **o), GradNorm, stateful=True),
        Method("db_mtl", "gradient", "gradient norms", "DB-MTL (Lin et al., 2023)",
               lambda k, o: DBMTL(k, **o), DBMTL, stateful=True),
    ]
}  # fmt: skip


def option_names(method: Method) -> list[str]:
    """The options a recipe may set for `method` (its constructor's keyword arguments)."""
    if method.signature is None:
        return []
    params = inspect.signature(method.signature).parameters
    return [n for n in params if n not in _NOT_FROM_YAML]


# Constructor arguments a recipe cannot express (tensors, callables, solver objects) or that
# transferkit fills in itself (the number of tasks).
_NOT_FROM_YAML = ("self", "num_objectives", "n_tasks", "pref_vector", "projector", "f", "leak")


def methods_markdown() -> str:
    """The table of methods in docs/multitask.md (a test keeps the two identical)."""
    lines = [
        "| method | kind | family | | options (defaults) | state |",
        "|---|---|---|---|---|---|",
    ]
    for m in METHODS.values():
        options = ", ".join(
            f"{name}={_default(m, name)}" if _default(m, name) is not None else name
            for name in option_names(m)
        )
        notes = [n for n, on in (("checkpointed", m.stateful), ("random", m.randomized)) if on]
        if m.nonconflicting:
            notes.append("non-conflicting")
        lines.append(f"| `{m.name}` | {m.kind} | {m.family} | {m.title} | {options or '-'} | "
                     f"{', '.join(notes) or '-'} |")  # fmt: skip
    return "\n".join(lines)


def _default(method: Method, name: str):
    if name in method.defaults:
        return method.defaults[name]
    param = inspect.signature(method.signature).parameters[name]
    if param.default is inspect.Parameter.empty or callable(param.default):
        return None
    return param.default
