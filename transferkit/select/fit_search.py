"""`fit`'s measured choices, within a time budget: the backbone by transferability on frozen
features, then the method (linear probe, LP-FT, full fine-tuning) and its learning rate by
trials that optuna samples (TPE) and prunes (median pruner on the validation curve).

The order of the trials: the plain defaults first (LP-FT at lr 1e-3), so there is always a
score to beat; then a probe (nearly free: its features come from the cache) and full
fine-tuning at the rate LP-FT fine-tunes at; then what TPE samples. A probe trains on
unaugmented images, whose features the feature cache keeps: after the first probe, another
costs only its heads (unless `--set data.augment` fixes the augmentation). A trial is started only
when its expected time fits what is left of the budget (each method's time is estimated from
a timed forward and backward pass, then corrected by the trials that ran), and a trial still
running when the budget ends is stopped after its epoch and not chosen; the first (the
defaults) always finishes, so that `fit` always returns a model.

Honest defaults: the best trial replaces the defaults only when its score is higher by more
than the noise: z standard errors of the defaults' score, sqrt(sum over tasks of
p (1 - p) / n) / tasks with n each task's labelled validation rows, where z grows with the number k of finished trials the best was picked
from (z = the normal quantile of 1 - 0.16 / k: one standard error for one challenger, 2.1 for
ten, 2.9 for a hundred), since the best of many equal trials beats the defaults by chance;
otherwise the defaults are kept and the report says so. A `--set` on `schedule.phases` fixes
the method, and one on `train.lr` the rate: the search varies only what the user left open.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from transferkit.errors import UserError
from transferkit.recipes import ResolvedRecipe, resolve_recipe
from transferkit.select.fit_defaults import FIT_METHODS as METHODS
from transferkit.select.trials import TrialResult, make_study, run_trial, score_parts

DEFAULT_METHOD, DEFAULT_LR = "lp-ft", 1e-3
LR_RANGE = (1e-4, 1e-2)  # AdamW rates worth trying for heads and backbones alike
FULL_LR = 2.5e-4  # full fine-tuning's first try: the rate LP-FT fine-tunes at (0.25 x 1e-3)
OFFLINE_CANDIDATES = tuple(f"timm:tf_efficientnet_lite{i}" for i in range(3))
_START_SECONDS = 4.0  # building a run before its first step, on this project's CPU
_HEAD_EPOCH_SECONDS = 0.3  # an epoch of heads on cached features, validation included
_TIMED_PASSES = 3  # the fastest of these times a pass


@dataclass
class SearchResult:
    trials: list[TrialResult]
    winner: TrialResult
    default: TrialResult | None
    reasons: list[str]
    budget_s: float
    spent_s: float
    backbones: list[tuple[str, float]] = field(default_factory=list)  # (candidate, LogME)


def phases(method: str, epochs: int) -> list[dict]:
    """The recipe's schedule.phases for a method over `epochs`."""
    probe = {"from_epoch": 0, "freeze": "all"}
    if method == "probe":
        return [probe]
    if method == "full":
        return [{"from_epoch": 0, "freeze": "none"}]
    return [probe, {"from_epoch": max(1, epochs // 2), "freeze": "none"}]


def trial_recipe(base: dict, method: str | None, lr: float | None,
                 cached_probe: bool = True) -> ResolvedRecipe:  # fmt: skip
    """`base` (the plan with the user's overrides) trained by `method` at `lr`; None keeps
    what `base` says. A probe trains on unaugmented images (`cached_probe`), so that its
    features come from the feature cache: one pass of the backbone, then only the heads."""
    recipe = copy.deepcopy(base)
    if method is not None:
        recipe["schedule"]["phases"] = phases(method, recipe["train"]["epochs"])
    if method == "probe" and cached_probe:
        recipe["data"]["augment"] = "none"
    if lr is not None:
        recipe["train"]["lr"] = float(lr)
    return resolve_recipe(recipe, where="a fit trial")


def fixed_by_overrides(overrides: list[str]) -> tuple[bool, bool, bool]:
    """Whether `--set` fixes the method (any schedule.phases key), the rate (train.lr) and
    the augmentation (data.augment)."""
    keys = [item.partition("=")[0].strip() for item in overrides]
    return (any(k.startswith("schedule.phases") for k in keys),
            any(k == "train.lr" for k in keys), any(k == "data.augment" for k in keys))  # fmt: skip


def choose_backbone(base: dict, candidates: list[str], device: str | None):
    """The candidate (`NAME` or `NAME@WEIGHTS`, as `rank` takes them) with the highest LogME on
    the training split's frozen features, among those whose weights load: returns the model
    section's `backbone` and `weights`, the scores [(candidate, LogME)] best first (empty with
    one candidate) and the candidates left out [(candidate, why)]."""
    from transferkit.models import pretrained_offline
    from transferkit.select.transferability import primary_task, rank

    usable, skipped = [], []
    for spec in candidates:
        backbone, _, weights = spec.partition("@")
        found, why = (
            (True, "") if weights and weights != "pretrained" else pretrained_offline(backbone)
        )
        (usable if found else skipped).append(spec if found else (spec, why))
    if not usable:
        raise UserError(f"--backbones {','.join(candidates)}: no candidate's weights load offline "
                        f"({skipped[0][1]}); give weights with NAME@FILE, or NAME@none for random "
                        "weights")  # fmt: skip
    scores: list[tuple[str, float]] = []
    chosen = usable[0]
    if len(usable) > 1:
        recipe = resolve_recipe(base, where="the fit plan").recipe
        rows = rank(recipe, candidates=usable, device=device, progress=False)
        key = primary_task(recipe)
        scores = [(row.candidate, row.scores[key]["logme"]) for row in rows]
        best = scores[0][0]  # BACKBONE@WEIGHTS, as rank labels it
        chosen = next(c for c in usable if _label(c) == best)
    backbone, _, weights = chosen.partition("@")
    model = {"backbone": backbone, "weights": weights if weights else base["model"]["weights"]}
    return model, scores, skipped


def _label(spec: str) -> str:
    """`rank`'s label of a candidate: BACKBONE@WEIGHTS, `none` for random weights."""
    backbone, _, weights = spec.partition("@")
    weights = weights or "pretrained"
    return f"{backbone}@{'none' if weights.lower() in ('none', 'random') else weights}"


class _Costs:
    """Each method's expected seconds: a timed pass of the backbone, corrected by trials."""

    def __init__(self, recipe: ResolvedRecipe, train_rows: int, val_rows: int) -> None:
        self.forward, self.backward = _time_backbone(recipe.recipe)
        self.train_rows, self.val_rows = train_rows, val_rows
        self.epochs = recipe.recipe.train.epochs
        self.ratios: dict[str, list[float]] = {}

    def raw(self, method: str) -> float:
        evaluate = self.val_rows * self.forward
        probe_epoch = self.train_rows * self.forward + evaluate  # no cache assumed
        tune_epoch = self.train_rows * self.backward + evaluate
        if method == "probe":  # cached features: one pass, then the heads alone
            return _START_SECONDS + probe_epoch + self.epochs * _HEAD_EPOCH_SECONDS
        tuned = self.epochs if method == "full" else self.epochs - self.epochs // 2
        return _START_SECONDS + (self.epochs - tuned) * probe_epoch + tuned * tune_epoch

    def expected(self, method: str) -> float:
        """The raw estimate times the method's median measured/estimated ratio (any
        method's before its own trial finished; 1.5 before any did)."""
        ratios = self.ratios.get(method) or [r for rs in self.ratios.values() for r in rs]
        return self.raw(method) * (sorted(ratios)[len(ratios) // 2] if ratios else 1.5)

    def learn(self, trial: TrialResult, method: str) -> None:
        if trial.status == "complete" and trial.epochs == self.epochs:
            ratio = trial.seconds / max(self.raw(method), 1e-3)
            self.ratios.setdefault(method, []).append(ratio)


def _time_backbone(recipe) -> tuple[float, float]:
    """Seconds per image of the backbone's forward pass (eval) and of forward and backward
    (train), at the recipe's image size, on the CPU threads this process has: the fastest of
    three passes each, as timeit advises, so one busy moment of the machine does not inflate
    every estimate of the search (a CI run once judged a 1-minute budget too small that way)."""
    import torch

    from transferkit.models import create_backbone

    backbone = create_backbone(recipe.model.backbone, None)
    size = recipe.data.image_size or 224
    batch = torch.randn(8, 3, size, size)

    def fastest(step) -> float:
        step()  # warm-up: allocations, lazy initialisation
        times = []
        for _ in range(_TIMED_PASSES):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return min(times) / len(batch)

    backbone.eval()
    with torch.no_grad():
        forward = fastest(lambda: backbone(batch))
    backbone.train()
    backward = fastest(lambda: backbone(batch).float().mean().backward())
    return forward, max(backward, forward)


def search(
    base: dict,
    folder: Path,
    tasks: dict[str, str],
    *,
    budget_minutes: float,
    methods: tuple[str, ...] = METHODS,
    fixed: tuple[bool, bool, bool] = (False, False, False),
    max_trials: int | None = None,
    split_rows: tuple[int, int],
    device: str | None = None,
    started: float | None = None,
    log=print,
) -> SearchResult:
    """Run trials into `folder/trials/` until the budget (counted from `started`, a
    `time.monotonic()`, default now) or `max_trials` ends them."""
    started = time.monotonic() if started is None else started
    budget = budget_minutes * 60.0
    method_fixed, lr_fixed, augment_fixed = fixed
    pool = (None,) if method_fixed else tuple(methods)
    costs = _Costs(trial_recipe(base, None, None), *split_rows)
    cheapest = min(costs.expected(m or DEFAULT_METHOD) for m in pool)
    if cheapest > budget:
        raise UserError(
            f"--time-budget {budget_minutes:g}: too small for even one trial here (the "
            f"cheapest, {pool[0] if len(pool) == 1 else 'a probe'}, needs about "
            f"{math.ceil(cheapest / 60 * 10) / 10:g} min); give at least that"
        )
    study = make_study("tpe", base.get("seed", 0), warmup_epochs=base["train"]["epochs"] // 2)
    distributions = _distributions(pool, lr_fixed)
    firsts = _first_trials(pool, lr_fixed)
    has_default = pool == (None,) or DEFAULT_METHOD in pool
    for first in firsts:
        study.enqueue_trial(first)
    if not distributions:  # --set fixed the method and the rate: one run is all there is
        max_trials = 1
    trials: list[TrialResult] = []
    while max_trials is None or len(trials) < max_trials:
        trial = study.ask(distributions)
        method = trial.params.get("method", pool[0])
        lr = trial.params.get("lr")
        left = budget - (time.monotonic() - started)
        expected = costs.expected(method or DEFAULT_METHOD)
        if expected > left:  # not this one; a cheaper method at the same rate may still fit
            study.tell(trial, state=_fail())
            fits = [m for m in pool if m and costs.expected(m) <= left]
            if "method" in distributions and fits:
                cheaper = min(fits, key=costs.expected)
                study.enqueue_trial({"method": cheaper} | ({"lr": lr} if lr else {}))
                continue
            log(f"fit: stopping the search: a {method or 'run'} trial needs about "
                f"{expected:.0f} s, {max(left, 0):.0f} s of the budget are left")  # fmt: skip
            break
        name = f"{len(trials):02d}_{method or 'plan'}" + (f"_lr{lr:.2g}" if lr else "")
        log(f"fit: trial {len(trials)}: {_describe(method, lr)} (about {expected:.0f} s)")
        recipe = trial_recipe(base, method, lr, cached_probe=not augment_fixed)
        # The first trial (the defaults) always finishes, so that fit always returns a model:
        # it runs only where its estimate fits the budget, but a loaded machine runs slower.
        deadline = started + budget if trials else None
        result = run_trial(study, trial, recipe, folder / "trials" / name, tasks,
                           deadline=deadline, device=device)  # fmt: skip
        result.params = {"method": method or "as --set says", "lr": lr or base["train"]["lr"]}
        result.number = len(trials)  # optuna's count includes the draws not trained
        # The defaults' own trial: the first one enqueued, if it was affordable (else a cheaper
        # method took its place, and that one is not the defaults).
        result.default = (has_default and dict(trial.params) == firsts[0]
                          and not any(t.default for t in trials))  # fmt: skip
        costs.learn(result, method or DEFAULT_METHOD)
        trials.append(result)
        log(
            f"fit: trial {result.number}: {result.status}"
            + (f", score {result.score:.4f}" if result.score is not None else f" ({result.error})")
        )
    return _decide(trials, has_default, budget, time.monotonic() - started, tasks)


def _distributions(pool: tuple, lr_fixed: bool) -> dict:
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    found = {} if lr_fixed else {"lr": FloatDistribution(*LR_RANGE, log=True)}
    if pool != (None,):
        found["method"] = CategoricalDistribution(list(pool))
    return found


def _first_trials(pool: tuple, lr_fixed: bool) -> list[dict]:
    """The defaults, then a probe and full fine-tuning where the pool has them."""
    firsts = [(DEFAULT_METHOD, DEFAULT_LR), ("probe", DEFAULT_LR), ("full", FULL_LR)]
    chosen = []
    for method, lr in firsts:
        if pool == (None,) and method != DEFAULT_METHOD:
            continue
        if pool != (None,) and method not in pool:
            continue
        params = {} if pool == (None,) else {"method": method}
        chosen.append(params | ({} if lr_fixed else {"lr": lr}))
    return chosen


def _fail():
    from optuna.trial import TrialState

    return TrialState.FAIL


def _describe(method: str | None, lr: float | None) -> str:
    what = {"probe": "linear probe", "lp-ft": "LP-FT", "full": "full fine-tuning"}
    return (what.get(method, "the planned method") if method else "the planned method") + (
        f" at lr {lr:.2g}" if lr else ""
    )


def _decide(trials: list[TrialResult], has_default: bool, budget: float, spent: float,
            tasks: dict[str, str]) -> SearchResult:  # fmt: skip
    """The winner: the best finished trial, unless the defaults' trial is within the noise of
    it."""
    done = [t for t in trials if t.status == "complete" and t.score is not None]
    if not done:
        failed = [t for t in trials if t.error]
        why = f": {failed[0].error}" if failed else " within the budget; give more --time-budget"
        raise UserError(f"fit: no trial finished{why}")
    best = max(done, key=lambda t: t.score)
    default = next((t for t in done if t.default), None) if has_default else None
    if default is None:
        why = ("did not finish or did not fit the budget" if has_default
               else "were not among --methods")  # fmt: skip
        return SearchResult(trials, best, None, [
            f"the defaults {why}; the best trial: {_name(best)}"
        ], budget, spent)  # fmt: skip
    parts = score_parts(default.record, tasks) or [(default.score, 1)]
    margin = noise_margin(parts, challengers=len(done) - 1)
    rows = "/".join(str(n) for _, n in parts)
    if best is default:
        why = f"the defaults ({_name(default)}) scored highest, {default.score:.4f}"
    elif best.score - default.score > margin:
        why = (f"{_name(best)} scored {best.score:.4f}, above the defaults' {default.score:.4f} "
               f"by more than the noise ({margin:.4f} on {rows} validation labels, "
               f"{len(done) - 1} challengers)")  # fmt: skip
    else:
        why = (f"{_name(best)} scored {best.score:.4f} against the defaults' "
               f"{default.score:.4f}, within the noise ({margin:.4f} on {rows} validation "
               f"labels, {len(done) - 1} challengers); the defaults are kept")  # fmt: skip
        best = default
    return SearchResult(trials, best, default, [why], budget, spent)


def noise_margin(parts: list[tuple[float, int]], challengers: int) -> float:
    """How far the best of `challengers` trials must beat the defaults (see the module
    docstring). `parts`: the defaults' (score, labelled validation rows) of each task; the
    standard error of their mean is sqrt(sum p (1 - p) / n) / tasks, p kept within
    [0.05, 0.95], times z(k)."""
    from statistics import NormalDist

    variance = sum(min(max(p, 0.05), 0.95) * (1 - min(max(p, 0.05), 0.95)) / max(n, 1)
                   for p, n in parts)  # fmt: skip
    z = NormalDist().inv_cdf(1 - 0.16 / max(challengers, 1))
    return z * math.sqrt(variance) / max(len(parts), 1)


def _name(trial: TrialResult) -> str:
    return f"trial {trial.number} ({trial.params['method']}, lr {trial.params['lr']:.2g})"
