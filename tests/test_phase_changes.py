"""What happens at a phase change of an LP-FT recipe: the new phase's learning-rate multipliers
apply from its first step, batch-norm statistics stay fixed when fine-tuning from weights, the
log warns where a setting risks a collapse, and small train sets keep their last batch."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import QUICK, ROOT, epoch_end_weights

from transferkit.engine import train
from transferkit.engine.batches import drop_last
from transferkit.engine.optim import build_lr_scheduler
from transferkit.engine.schedule import FreezeSchedule
from transferkit.models import create_backbone
from transferkit.recipes import PhaseSection, load_recipe, parse_recipe


def _heads_rates(schedule: FreezeSchedule, epochs: int, steps_per_epoch: int, scheduler: str):
    """The heads' learning rate at every optimizer step, with train.lr 1."""
    head = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [head], "group": "heads"}], lr=1.0)
    train_cfg = parse_recipe({"model": {"backbone": "timm:test_resnet"},
                              "tasks": {"a": {"kind": "binary"}},
                              "data": {"source": "disk", "path": "x"},
                              "train": {"epochs": epochs, "scheduler": scheduler}}).train  # fmt: skip
    lr_scheduler = build_lr_scheduler(optimizer, train_cfg, schedule, steps_per_epoch)
    used = []
    for epoch in range(epochs):
        schedule.apply(epoch)
        for _ in range(steps_per_epoch):
            used.append(optimizer.param_groups[0]["lr"])  # the rate this step runs with
            optimizer.step()
            lr_scheduler.step()
    return used


def test_a_phase_multiplier_applies_from_the_phases_first_step():
    backbone = create_backbone("timm:test_resnet", None)
    phases = [PhaseSection(from_epoch=0, freeze="all", lr_mult={"heads": 1.0}),
              PhaseSection(from_epoch=1, freeze="none", lr_mult={"heads": 0.1})]  # fmt: skip
    schedule = FreezeSchedule(backbone, phases, phase_warmup_epochs=0.0)
    used = _heads_rates(schedule, epochs=2, steps_per_epoch=3, scheduler="constant")
    assert used == pytest.approx([1.0, 1.0, 1.0, 0.1, 0.1, 0.1])


@pytest.mark.parametrize("cycle", ["run", "phase"])
def test_lr_cycle_runs_the_schedule_over_the_run_or_anew_in_each_phase(cycle):
    """`schedule.lr_cycle: phase` (fastai's fine_tune): the cosine restarts from train.lr at
    each phase and ends near 0 at the phase's end, after the phase's warmup; `run`: one cosine
    over every epoch."""
    backbone = create_backbone("timm:test_resnet", None)
    phases = [PhaseSection(from_epoch=0, freeze="all"), PhaseSection(from_epoch=2, freeze="none")]
    schedule = FreezeSchedule(backbone, phases, phase_warmup_epochs=1.0, total_epochs=6,
                              lr_cycle=cycle, unfrozen_lr_mult=1.0)  # fmt: skip
    used = _heads_rates(schedule, epochs=6, steps_per_epoch=2, scheduler="cosine")

    def cosine(step, total):
        return 0.5 * (1 + math.cos(math.pi * step / total))

    if cycle == "run":
        expected = [cosine(s, 12) for s in range(4)]
        expected += [cosine(s, 12) * min(1.0, (s - 3) / 3) for s in range(4, 12)]
    else:  # the probe's cosine over its 4 steps, then the fine-tune's over its 8, warmed up
        expected = [cosine(s, 4) for s in range(4)]
        expected += [cosine(s, 8) * min(1.0, (s + 1) / 3) for s in range(8)]
    assert used == pytest.approx(expected)


def test_a_phase_cycle_ends_with_the_run_when_the_next_phase_never_starts():
    """A run cut shorter than its phases (train.epochs 3, the fine-tune phase from epoch 4):
    the probe's cosine anneals over the 3 epochs that run, not over 4."""
    backbone = create_backbone("timm:test_resnet", None)
    phases = [PhaseSection(from_epoch=0, freeze="all"), PhaseSection(from_epoch=4, freeze="none")]
    schedule = FreezeSchedule(backbone, phases, total_epochs=3, lr_cycle="phase")
    assert schedule.lr_span(0) == (0, 3)
    used = _heads_rates(schedule, epochs=3, steps_per_epoch=2, scheduler="cosine")
    assert used == pytest.approx([0.5 * (1 + math.cos(math.pi * s / 6)) for s in range(6)])


def test_a_phase_that_moves_normalization_layers_changes_the_backbone():
    """The EMA is scored on images, not on the raw backbone's cached features, once any phase
    has changed the backbone: trained groups, or normalization layers of frozen ones."""
    backbone = create_backbone("timm:test_resnet", None)
    phases = [PhaseSection(from_epoch=0, freeze="all"),
              PhaseSection(from_epoch=1, freeze="all@norm=train"),
              PhaseSection(from_epoch=2, freeze="all")]  # fmt: skip
    schedule = FreezeSchedule(backbone, phases)
    assert [schedule.backbone_trained_by(e) for e in range(3)] == [False, True, True]
    schedule = FreezeSchedule(backbone, [phases[0], PhaseSection(from_epoch=1, freeze="none")])
    assert [schedule.backbone_trained_by(e) for e in range(2)] == [False, True]


def _stats(weights: dict) -> dict:
    return {k: v for k, v in weights.items() if "running_mean" in k or "running_var" in k}


@pytest.mark.parametrize(
    "weights, norm_stats, fixed",
    [("source", "auto", True), ("none", "auto", False), ("source", "train", False),
     ("none", "frozen", True)],
)  # fmt: skip
def test_batch_norm_statistics_while_fine_tuning(
    workdir, source_run, monkeypatch, capsys, weights, norm_stats, fixed
):
    monkeypatch.chdir(workdir)
    start = source_run / "model.safetensors" if weights == "source" else "none"
    overrides = [*QUICK, f"model.weights={start}", "schedule.phases.0.freeze=none",
                 f"schedule.norm_stats={norm_stats}", "train.epochs=1"]  # fmt: skip
    recipe = load_recipe(ROOT / "recipes/digits_transfer.yaml", overrides)
    # The starting statistics: the source run's, or those of a fresh model (zeros and ones).
    torch.manual_seed(recipe.seed)
    before = _stats(
        {f"backbone.model.{k}": v for k, v in create_backbone(
            recipe.model.backbone, recipe.model.weights).model.state_dict().items()}
    )  # fmt: skip
    run_dir = train(recipe, output=str(workdir / "runs" / f"bn_{weights}_{norm_stats}"))
    after = _stats(epoch_end_weights(run_dir))
    assert before and set(before) == set(after)
    same = all(torch.equal(before[k], after[k]) for k in before)
    assert same == fixed
    out = capsys.readouterr().out
    if fixed:
        assert "running statistics stay fixed" in out
    if weights == "source" and norm_stats == "train":
        assert "warning: this phase updates batch-norm statistics" in out


def test_small_train_sets_keep_their_last_batch():
    assert not drop_last(50, 32)  # 2 steps per epoch, not 1
    assert not drop_last(100, 64)
    assert drop_last(33, 32)  # a last batch of one image cannot train batch norm
    assert not drop_last(32, 32) and not drop_last(16, 32)
    assert drop_last(50, 16, processes=2)  # every process count sees the same samples


def test_the_default_batch_size_gives_small_train_sets_several_steps():
    from transferkit.engine.batches import default_batch_size

    assert default_batch_size(None, 100, 1, say=False) == 8  # 13 batches an epoch, not 4
    assert default_batch_size(None, 250, 1, say=False) == 16  # 16 batches
    assert default_batch_size(None, 512, 1, say=False) == 32
    edges = [default_batch_size(None, n, 1, say=False) for n in (240, 241, 480, 481)]
    assert edges == [8, 16, 16, 32]  # the thresholds docs/quality.md gives
    assert default_batch_size(None, 20, 1, say=False) == 8  # never below 8
    assert default_batch_size(None, 500, 2, say=False) == 16  # per process: 250 images each
    assert default_batch_size(64, 10, 1, say=False) == 64  # a chosen size is kept


def test_a_phase_that_unfreezes_after_a_probe_runs_at_a_lower_rate():
    backbone = create_backbone("timm:test_resnet", None)
    lpft = FreezeSchedule(backbone, [PhaseSection(from_epoch=0, freeze="all"),
                                     PhaseSection(from_epoch=2, freeze="up_to:layer1",
                                                  lr_mult={"layer4": 0.5})],
                          unfrozen_lr_mult=0.1)  # fmt: skip
    assert lpft.lr_factor("heads", epoch=0) == lpft.lr_factor("layer3", epoch=0) == 1.0
    # The fine-tune phase: every group in it, heads included, at the lower rate...
    assert (
        lpft.lr_factor("heads", epoch=2) == lpft.lr_factor("layer3", epoch=2) == pytest.approx(0.1)
    )
    assert lpft.lr_factor("layer4", epoch=2) == 0.5  # ...unless named in the phase: the recipe wins
    full = FreezeSchedule(backbone, [PhaseSection(freeze="none")], unfrozen_lr_mult=0.1)
    assert full.lr_factor("layer3", epoch=0) == 1.0  # never frozen: the full rate
    assert full.lr_factor("heads", epoch=0) == 1.0
    # Gradual unfreezing: every phase after the probe is a fine-tune phase.
    gradual = FreezeSchedule(backbone, [PhaseSection(from_epoch=0, freeze="all"),
                                        PhaseSection(from_epoch=1, freeze="up_to:layer3"),
                                        PhaseSection(from_epoch=2, freeze="none")],
                             unfrozen_lr_mult=0.1)  # fmt: skip
    assert [gradual.lr_factor("layer4", epoch=e) for e in (1, 2)] == pytest.approx([0.1, 0.1])
    assert gradual.lr_factor("heads", epoch=1) == pytest.approx(0.1)


def test_later_phases_warm_up_over_at_most_a_third_of_their_length():
    backbone = create_backbone("timm:test_resnet", None)
    phases = [PhaseSection(from_epoch=0, freeze="all"), PhaseSection(from_epoch=2, freeze="none")]
    schedule = FreezeSchedule(backbone, phases, phase_warmup_epochs=3.0, total_epochs=8)
    factors = [schedule.warmup_factor(step, steps_per_epoch=2) for step in range(16)]
    assert factors[:4] == [1.0] * 4  # the first phase: no ramp (train.warmup_epochs is its own)
    ramp = factors[4:8]  # 6 epochs long: 2 epochs (4 steps) of ramp, not 3
    assert ramp == pytest.approx([1 / 5, 2 / 5, 3 / 5, 4 / 5]) and factors[8:] == [1.0] * 8


def test_the_first_phase_warms_up_only_when_it_fine_tunes_loaded_weights():
    backbone = create_backbone("timm:test_resnet", None)
    full = [PhaseSection(from_epoch=0, freeze="none")]
    probe = [PhaseSection(from_epoch=0, freeze="all"), PhaseSection(from_epoch=4, freeze="none")]

    def factors(phases, from_weights):
        schedule = FreezeSchedule(backbone, phases, phase_warmup_epochs=1.0, total_epochs=8,
                                  from_weights=from_weights)  # fmt: skip
        return [schedule.warmup_factor(step, steps_per_epoch=2) for step in range(6)]

    assert factors(full, True) == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 1.0, 1.0])
    assert factors(full, False) == [1.0] * 6  # random weights: nothing to protect
    assert factors(probe, True) == [1.0] * 6  # a probe trains the heads only


LORA = "model.adapter={method: lora, targets: 'regex:.', r: 4}"


@pytest.mark.parametrize(
    "overrides, rate",
    [([], 0.25),  # pretrained weights train after the probe
     ([LORA], 1.0),  # only the adapter trains
     ([LORA[:-1] + ", train_rest: true}"], 0.25),  # the layers without an adapter train too
     ([LORA, "schedule.unfrozen_lr_mult=0.5"], 0.5)],  # set in the recipe: the recipe wins
)  # fmt: skip
def test_the_fine_tune_phase_rate_follows_the_rule_unless_set_and_the_run_records_it(
    workdir, source_run, monkeypatch, overrides, rate
):
    from transferkit.engine import build_run, make_accelerator

    monkeypatch.chdir(workdir)
    recipe = load_recipe(ROOT / "recipes/digits_transfer.yaml", [
        *QUICK, f"model.weights={source_run / 'model.safetensors'}",
        "schedule.unfrozen_lr_mult=null", "schedule.phases.1.lr_mult={}", *overrides])  # fmt: skip
    run = build_run(recipe, make_accelerator(recipe))
    fine_tune = run.schedule.phases[1].from_epoch
    assert run.schedule.lr_factor("heads", fine_tune) == pytest.approx(rate)
    assert run.schedule.lr_factor("layer4", fine_tune) == pytest.approx(rate)
    # recipe.yaml records the rate, so a resume keeps it even if the rule changes
    assert run.with_chosen_defaults(recipe).schedule.unfrozen_lr_mult == rate


@pytest.mark.parametrize(
    "overrides, warned",
    [([], None), (["schedule.unfrozen_lr_mult=1"], "at 1x train.lr;"),
     (["schedule.phase_warmup_epochs=0"], "at 0.25x train.lr with no warmup"),
     (["schedule.phase_warmup_epochs=0.01"], "at 0.25x train.lr with no warmup"),  # 0 steps
     (["schedule.phases.1.lr_mult={layer4: 0.5}"], "at 0.5x train.lr;"),
     (["model.weights=none", "schedule.unfrozen_lr_mult=1"], None),
     ([LORA, "schedule.unfrozen_lr_mult=1"], None),  # only the adapter trains: no pretrained weight moves
     ([LORA[:-1] + ", train_rest: true}", "schedule.unfrozen_lr_mult=1"], "at 1x train.lr;")],
)  # fmt: skip
def test_the_log_warns_when_a_fine_tune_phase_starts_at_a_collapsing_rate(
    workdir, source_run, monkeypatch, overrides, warned
):
    from transferkit.engine import build_run, make_accelerator
    from transferkit.engine.phases import rate_note

    monkeypatch.chdir(workdir)
    defaults = ["schedule.lr_cycle=phase", "schedule.unfrozen_lr_mult=0.25",
                "schedule.phase_warmup_epochs=3", "schedule.phases.1.lr_mult={}"]  # fmt: skip
    recipe = load_recipe(ROOT / "recipes/digits_transfer.yaml", [
        *QUICK, f"model.weights={source_run / 'model.safetensors'}", *defaults, *overrides])  # fmt: skip
    run = build_run(recipe, make_accelerator(recipe))
    note = rate_note(run, 1)
    assert rate_note(run, 0) is None  # the probe
    if warned is None:
        assert note is None
    else:
        assert note.startswith("warning: phase 1 fine-tunes pretrained groups") and warned in note
