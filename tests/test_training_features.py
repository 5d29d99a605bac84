"""Training features (issue 15): label smoothing, class weights, focal loss, the balanced
sampler, mixup/CutMix across tasks, EMA of the weights; their recipe errors and exact resume."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate.utils.other import load as safe_load
from conftest import ROOT, records
from safetensors.torch import load_file

from transferkit.engine import train
from transferkit.engine.imbalance import BalancedSampler
from transferkit.engine.losses import LossOptions, balanced_class_weights, task_loss
from transferkit.engine.mixing import TaskMixer
from transferkit.errors import UserError
from transferkit.models import TaskSpec
from transferkit.recipes import load_recipe, parse_recipe
from transferkit.recipes.schema import MixupSection

DIGIT = TaskSpec("digit", "multiclass", 3)
EVEN = TaskSpec("even", "binary")
TAGS = TaskSpec("tags", "multilabel", 2)
SIZE = TaskSpec("size", "regression")
TRANSFER = ROOT / "recipes/digits_transfer.yaml"


# --- losses ---------------------------------------------------------------------------------


def test_label_smoothing_and_class_weights_on_multiclass():
    torch.manual_seed(1)
    logits, target = torch.randn(6, 3), torch.tensor([0, 1, 2, 2, 1, 0])
    mask = torch.tensor([True, True, True, True, False, True])
    smooth = task_loss(DIGIT, logits, target, mask, LossOptions(label_smoothing=0.2))
    # Smoothing by hand: the loss against (1 - 0.2) one-hot + 0.2 / 3 everywhere.
    soft = F.one_hot(target, 3).float() * 0.8 + 0.2 / 3
    by_hand = -(soft * logits.log_softmax(-1)).sum(-1)[mask].mean()
    assert smooth.item() == pytest.approx(by_hand.item(), rel=1e-6)
    weights = torch.tensor([1.0, 4.0, 0.5])
    weighted = task_loss(DIGIT, logits, target, mask, LossOptions(class_weights=weights))
    nll = -logits.log_softmax(-1)[torch.arange(6), target]
    w = weights[target]
    assert weighted.item() == pytest.approx(((w * nll)[mask].sum() / w[mask].sum()).item())
    # Mixup's probability targets: a one-hot row weighs what its class index does (torch
    # alone divides probability targets by the row count), with smoothing too.
    one_hot = F.one_hot(target, 3).float()
    for options in (LossOptions(class_weights=weights),
                    LossOptions(class_weights=weights, label_smoothing=0.2)):  # fmt: skip
        hard = task_loss(DIGIT, logits, target, mask, options)
        assert task_loss(DIGIT, logits, one_hot, mask, options).item() == pytest.approx(
            hard.item(), rel=1e-6
        )


def test_binary_and_multilabel_class_weights():
    logits = torch.tensor([0.5, -1.0, 2.0, 0.0])
    target = torch.tensor([1.0, 0.0, 0.0, 1.0])
    mask = torch.ones(4, dtype=torch.bool)
    loss = task_loss(
        EVEN, logits, target, mask, LossOptions(class_weights=torch.tensor([1.0, 3.0]))
    )
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    w = torch.tensor([3.0, 1.0, 1.0, 3.0])
    assert loss.item() == pytest.approx(((w * bce).sum() / w.sum()).item())
    # Multilabel weights weigh the positives: torch's pos_weight, on hard targets.
    logits2, target2 = torch.randn(5, 2), torch.tensor([[1.0, 0.0], [0, 1], [1, 1], [0, 0], [1, 0]])
    pos = torch.tensor([2.0, 0.5])
    ours = task_loss(TAGS, logits2, target2, torch.ones(5, dtype=torch.bool),
                     LossOptions(class_weights=pos))  # fmt: skip
    reference = F.binary_cross_entropy_with_logits(logits2, target2, pos_weight=pos)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-6)


def test_focal_loss_down_weights_easy_rows():
    logits = torch.tensor([4.0, -0.2])  # an easy positive, a hard one
    target = torch.ones(2)
    mask = torch.ones(2, dtype=torch.bool)
    focal = task_loss(EVEN, logits[:1], target[:1], mask[:1], LossOptions(focal_gamma=2.0))
    bce = F.binary_cross_entropy_with_logits(logits[:1], target[:1])
    p = torch.sigmoid(logits[0])
    assert focal.item() == pytest.approx((bce * (1 - p) ** 2).item(), rel=1e-5)
    hard = task_loss(EVEN, logits[1:], target[1:], mask[1:], LossOptions(focal_gamma=2.0))
    assert focal.item() < 1e-3 * bce.item() and hard.item() > 0.2  # the hard row dominates


def test_smoothing_and_focal_loss_on_sigmoid_tasks():
    """Binary and multilabel: smoothing pulls targets towards 1/2; focal loss is torchvision's
    sigmoid_focal_loss per label, averaged over the labelled rows."""
    from torchvision.ops import sigmoid_focal_loss

    torch.manual_seed(2)
    logits, target = torch.randn(5, 2), torch.tensor([[1.0, 0], [0, 1], [1, 1], [0, 0], [1, 0]])
    mask = torch.tensor([True, True, False, True, True])
    smooth = task_loss(TAGS, logits, target, mask, LossOptions(label_smoothing=0.2))
    soft = target * 0.8 + 0.1
    assert smooth.item() == pytest.approx(
        F.binary_cross_entropy_with_logits(logits[mask], soft[mask]).item(), rel=1e-6
    )
    even = task_loss(EVEN, logits[:, 0], target[:, 0], mask, LossOptions(label_smoothing=0.2))
    assert even.item() == pytest.approx(
        F.binary_cross_entropy_with_logits(logits[mask, 0], soft[mask, 0]).item(), rel=1e-6
    )
    focal = task_loss(TAGS, logits, target, mask, LossOptions(focal_gamma=2.0))
    reference = sigmoid_focal_loss(logits[mask], target[mask], alpha=-1, gamma=2.0).mean()
    assert focal.item() == pytest.approx(reference.item(), rel=1e-6)
    assert focal.item() < task_loss(TAGS, logits, target, mask, LossOptions()).item()


def test_balanced_weights_from_training_labels():
    target = torch.tensor([0, 0, 0, 0, 1, 2, 0])
    mask = torch.tensor([True] * 6 + [False])
    weights = balanced_class_weights(DIGIT, target, mask)
    assert weights.tolist() == pytest.approx([6 / (3 * 4), 6 / 3, 6 / 3])
    tags = torch.tensor([[1.0, 0.0], [1, 0], [1, 1], [0, 0]])
    tags_weights = balanced_class_weights(TAGS, tags, torch.ones(4, dtype=torch.bool))
    assert tags_weights.tolist() == pytest.approx([1 / 3, 3])


def test_balanced_sampler_draws_classes_evenly_and_replays():
    labels = torch.tensor([0] * 90 + [1] * 10 + [0] * 20)
    mask = torch.tensor([True] * 100 + [False] * 20)  # 20 rows without this task's label
    sampler = BalancedSampler(labels, mask, seed=3)
    sampler.set_epoch(0)
    drawn = torch.tensor(list(sampler) + [i for e in (1, 2, 3) for i in _epoch(sampler, e)])
    labelled = drawn[drawn < 100]
    share = (labelled >= 90).float().mean().item()
    assert 0.4 < share < 0.6  # the 10% class is drawn about as often as the 90% one
    assert 0.1 < (drawn >= 100).float().mean().item() < 0.25  # unlabelled rows keep their share
    assert _epoch(sampler, 2) == _epoch(BalancedSampler(labels, mask, seed=3), 2)
    assert _epoch(sampler, 2) != _epoch(sampler, 1)


def _epoch(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


# --- mixup across tasks ---------------------------------------------------------------------


def _batch():
    torch.manual_seed(0)
    return {
        "image": torch.randn(4, 3, 8, 8),
        "targets": {"digit": torch.tensor([0, 1, 2, 0]), "even": torch.tensor([1.0, 0, 1, 0]),
                    "size": torch.tensor([1.0, 2.0, 3.0, 4.0]),
                    "tags": torch.tensor([[1.0, 0], [0, 1], [1, 1], [0, 0]])},
        "mask": {"digit": torch.tensor([True, True, True, True]),
                 "even": torch.tensor([True, False, True, True]),
                 "size": torch.tensor([True, True, True, True]),
                 "tags": torch.tensor([True, True, True, True])},
        "index": torch.arange(4),
    }  # fmt: skip


@pytest.mark.parametrize("regression", ["mix", "exclude"])
def test_mixup_mixes_every_task_and_keeps_missing_labels_masked(regression):
    section = MixupSection(mixup_alpha=0.8, cutmix_alpha=0.0, regression=regression)
    tasks = {"digit": DIGIT, "even": EVEN, "size": SIZE, "tags": TAGS}
    mixer = TaskMixer(section, tasks, seed=0, process=0, processes=1)
    batch, numpy_state = _batch(), np.random.get_state()[1].copy()
    mixed = mixer(batch, 1, 1)
    assert np.array_equal(np.random.get_state()[1], numpy_state)  # NumPy's global RNG untouched
    lam = (mixed["image"][0] - batch["image"][3]).norm() / (
        batch["image"][0] - batch["image"][3]
    ).norm()
    lam = lam.item()
    digit = mixed["targets"]["digit"]
    assert digit.shape == (4, 3) and torch.allclose(digit.sum(-1), torch.ones(4))
    assert digit[1].tolist() == pytest.approx([0, lam, 1 - lam], abs=1e-5)  # rows 1 and 2 mix
    # Row 1 has no `even` label, so rows 1 and 2 (its partner, reversed order) are masked.
    assert mixed["mask"]["even"].tolist() == [True, False, False, True]
    # Multilabel targets mix per label: row 0 ([1, 0]) with row 3 ([0, 0]).
    assert mixed["targets"]["tags"][0].tolist() == pytest.approx([lam, 0], abs=1e-5)
    assert mixed["targets"]["tags"][1].tolist() == pytest.approx([1 - lam, 1], abs=1e-5)
    if regression == "mix":
        assert mixed["targets"]["size"][0].item() == pytest.approx(
            lam * 1 + (1 - lam) * 4, abs=1e-5
        )
        assert mixed["mask"]["size"].all()
    else:
        assert not mixed["mask"]["size"].any()
    again = TaskMixer(section, tasks, seed=0, process=0, processes=1)(_batch(), 1, 1)
    assert torch.equal(again["image"], mixed["image"])  # a function of the position only
    # Process 1 of 2 at its batch 1 is micro-batch 2 of 1 process: the same draw.
    two = TaskMixer(section, tasks, seed=0, process=1, processes=2)(_batch(), 1, 1)
    one = TaskMixer(section, tasks, seed=0, process=0, processes=1)(_batch(), 1, 2)
    assert torch.equal(two["image"], one["image"])


def test_a_row_without_a_class_label_masks_its_mixed_partner_too():
    """A missing multiclass label is stored as the placeholder class 0; mixed with its partner
    it must stay masked (both rows), never become a soft label towards class 0."""
    section = MixupSection(mixup_alpha=0.8, cutmix_alpha=0.0)
    batch = _batch()
    batch["mask"]["digit"] = torch.tensor([True, False, True, True])  # row 1: no digit label
    mixed = TaskMixer(section, {"digit": DIGIT}, seed=0, process=0, processes=1)(batch, 1, 1)
    assert mixed["mask"]["digit"].tolist() == [True, False, False, True]
    logits = torch.randn(4, 3)
    masked = task_loss(DIGIT, logits, mixed["targets"]["digit"], mixed["mask"]["digit"],
                       LossOptions())  # fmt: skip
    kept = [0, 3]
    expected = -(mixed["targets"]["digit"][kept] * logits[kept].log_softmax(-1)).sum(-1).mean()
    assert masked.item() == pytest.approx(expected.item(), rel=1e-6)


def test_cutmix_pastes_a_box_and_mixes_by_its_area():
    section = MixupSection(mixup_alpha=0.0, cutmix_alpha=1.0)
    mixer = TaskMixer(section, {"digit": DIGIT}, seed=5, process=0, processes=1)
    batch = _batch()
    mixed = mixer(batch, 0, 1)
    pasted = (mixed["image"][1] == batch["image"][2]).all(0).float().mean().item()
    assert 0 < pasted < 1  # row 1 (digit 1) got a box of row 2 (digit 2)
    assert mixed["targets"]["digit"][1].tolist() == pytest.approx([0, 1 - pasted, pasted])


# --- recipe errors --------------------------------------------------------------------------

BASE = {
    "model": {"backbone": "timm:test_resnet"},
    "tasks": {"digit": {"kind": "multiclass", "classes": ["a", "b", "c"]}, "ink": {"kind": "regression"}},
    "data": {"source": "manifest", "path": "x.csv"},
}  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["tasks.digit.class_weights=[1, 2]"],
            "tasks.digit.class_weights: 2 weights for 3 classes",
        ),
        (["tasks.ink.label_smoothing=0.1"], "tasks.ink.label_smoothing: a regression task"),
        (["tasks.digit.focal_gamma=2"], "focal loss is for binary and multilabel"),
        (["data.horizontal_flip=false", "data.tta=[hflip]"], "data.horizontal_flip is false"),
        (["data.balanced_sampler=ink"], "balance by a multiclass or binary task"),
        (["data.balanced_sampler=digt"], "Did you mean: digit"),
        (["tasks.digit.class_weights=even"], "tasks.digit.class_weights"),
    ],
)
def test_bad_feature_options_are_one_clear_error(overrides, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[")):
        parse_recipe(copy.deepcopy(BASE), overrides)


def test_mixup_with_only_regression_tasks_is_refused():
    data = copy.deepcopy(BASE)
    del data["tasks"]["digit"]
    with pytest.raises(UserError, match="every task is a regression task"):
        parse_recipe(data, ["train.mixup.mixup_alpha=0.4"])


def test_class_weights_of_the_wrong_length_for_found_classes(workdir, monkeypatch):
    monkeypatch.chdir(workdir)  # digit: 5 classes found in the data, none declared
    recipe = load_recipe(TRANSFER, ["model.weights=none", "tasks.digit.class_weights=[1, 2, 3]",
                                    "data.max_samples=32", "train.epochs=1"])  # fmt: skip
    with pytest.raises(UserError, match=r"3 weights, but task 'digit' has 5 classes \(5, 6, 7"):
        train(recipe, output=str(workdir / "features" / "bad_weights"))


# --- training with every option, EMA, exact resume ------------------------------------------

FEATURES = [
    "model.weights=none", "data.max_samples=64", "train.batch_size=16", "train.epochs=2",
    "train.checkpoint_every=1", "train.keep_checkpoints=50", "train.scheduler=constant",
    "data.augment=light", "data.horizontal_flip=false", "data.balanced_sampler=digit",
    "tasks.digit.label_smoothing=0.1", "tasks.digit.class_weights=balanced",
    "tasks.parity.focal_gamma=2", "tasks.parity.class_weights=[1.0, 2.0]",
    "train.ema.decay=0.8", "train.ema.final_model=true", "train.mixup.prob=0.8",
]  # fmt: skip


def _checkpoint(path):
    """Every tensor of a checkpoint: the model, and each registered object (the EMA's too)."""
    tensors = dict(load_file(str(path / "model.safetensors")))
    for pkl in sorted(path.glob("custom_checkpoint_*.pkl")):
        for key, value in safe_load(pkl, map_location="cpu", weights_only=True).items():
            if torch.is_tensor(value):
                tensors[f"{pkl.stem}/{key}"] = value
    return tensors


def test_the_average_of_a_probe_after_fine_tuning_is_scored_on_its_own_features(
    workdir, monkeypatch
):
    """A frozen phase after a fine-tuning one trains from cached features of the raw backbone;
    the EMA's backbone is another (an average), so its val_ema metrics come from the images."""
    import transferkit
    from transferkit.data import TaskImageDataset, collate
    from transferkit.engine import evaluate
    from transferkit.rundir.folder import RunDir
    from transferkit.runs import eval_split

    monkeypatch.chdir(workdir)
    out = workdir / "features" / "ema_probe_after_ft"
    train(load_recipe(TRANSFER, [
        "model.weights=none", "data.max_samples=48", "train.batch_size=16", "train.epochs=2",
        "train.lr=0.01", "train.ema.decay=0.5", "train.feature_cache=auto",
        "schedule.phases.0.freeze=none", "schedule.phases.1.freeze=all",
    ]), output=str(out))  # fmt: skip
    last = records(out)[-1]
    assert last["phase"] == 1
    run = transferkit.load(out)
    ema = _checkpoint(sorted((out / "checkpoints").glob("step_*_end"))[-1])
    run.model.load_state_dict(
        {k.split("/module.", 1)[1]: v for k, v in ema.items() if "/module." in k}
    )
    _, rows, _ = eval_split(RunDir(out))
    dataset = TaskImageDataset(rows, list(run.tasks.values()), run.transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, collate_fn=collate)
    values = evaluate(run.model, loader, run.tasks, prefix="val_ema")
    assert values["val_ema/ink/mae"] == pytest.approx(last["val_ema/ink/mae"], abs=1e-5)


def test_features_train_and_resume_bit_exact_with_ema(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    full = workdir / "features" / "full"
    train(load_recipe(TRANSFER, FEATURES), output=str(full))
    rows = records(full)
    assert {"val_ema/digit/accuracy", "val/digit/accuracy", "val_ema/ink/mae"} <= rows[-1].keys()
    ends = sorted((full / "checkpoints").glob("step_*_end"))
    last = _checkpoint(ends[-1])
    ema = {k.split("/module.", 1)[1]: v for k, v in last.items() if "/module." in k}
    assert ema and ema.keys() == {k for k in last if "/" not in k}
    assert any(not torch.equal(ema[k], last[k]) for k in ema)  # the average is not the weights
    # With final_model the saved model is the EMA of its epoch, picked by val_ema metrics.
    saved, info = load_file(str(full / "model.safetensors")), (full / "model.json").read_text()
    best = _checkpoint(ends[[r["epoch"] for r in rows].index(_epoch_of(info))])
    assert all(torch.equal(saved[k], best[f"custom_checkpoint_1/module.{k}"]) for k in saved)
    assert '"monitor": "val_ema/digit/accuracy"' in info

    # Kill after step 5 (mid-epoch 1, 4 steps per epoch): drop the later checkpoints, resume.
    resumed = workdir / "features" / "resumed"
    shutil.copytree(full, resumed)
    for path in (resumed / "checkpoints").iterdir():
        if int(path.name.split("_")[1]) > 5:
            shutil.rmtree(path)
    train(load_recipe(resumed / "recipe.yaml"), resume=str(resumed))
    again = _checkpoint(sorted((resumed / "checkpoints").glob("step_*_end"))[-1])
    assert again.keys() == last.keys()
    assert all(torch.equal(again[k], last[k]) for k in last)


def _epoch_of(info: str) -> int:
    import json

    return json.loads(info)["epoch"]


DDP_RECIPE = """
name: ema_mixup_ddp
seed: 0
model: {backbone: "timm:test_vit", kwargs: {img_size: 32}}
tasks: {digit: {kind: multiclass, label_smoothing: 0.1},
        parity: {kind: binary, class_weights: balanced}}
data: {source: manifest, path: data/digits/full_labels.csv, val_split: null, image_size: 32,
       augment: none, max_samples: 128, balanced_sampler: digit}
train: {epochs: 2, batch_size: 16, grad_accum: ACCUM, optimizer: sgd, lr: 0.05, momentum: 0.9,
        weight_decay: 0.0, scheduler: constant, ema: {decay: 0.9}, mixup: {prob: 1.0}}
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_match_one_with_ema_and_mixup(workdir, labelled):
    """2 gloo processes end with the weights and the EMA of 1 process that accumulates the same
    two micro-batches: mixup pairs rows within each micro-batch and draws by its position; the
    balanced sampler and class weights (balanced) ride along."""
    import os
    import subprocess
    import sys

    from conftest import free_port

    finals = {}
    for procs, accum in ((1, 2), (2, 1)):
        recipe = workdir / f"ema_mixup_{procs}.yaml"
        recipe.write_text(DDP_RECIPE.replace("ACCUM", str(accum)))
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}",
               "--master_port", str(free_port()), "-m", "transferkit.cli", "train", str(recipe),
               "--output", str(workdir / f"ema_mixup_{procs}")]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        result = subprocess.run(
            cmd, cwd=workdir, capture_output=True, text=True, timeout=600, env=env
        )
        assert result.returncode == 0, result.stderr[-3000:]
        finals[procs] = _checkpoint(
            sorted((workdir / f"ema_mixup_{procs}/checkpoints").glob("*_end"))[-1]
        )
    assert (
        records(workdir / "ema_mixup_1")[-1]["step"] == records(workdir / "ema_mixup_2")[-1]["step"]
    )
    assert any(k.startswith("custom_checkpoint_1/module.") for k in finals[1])  # the EMA
    assert finals[1].keys() == finals[2].keys()
    for key, value in finals[1].items():
        assert torch.allclose(value.float(), finals[2][key].float(), rtol=0, atol=1e-6), key


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_follows_its_decay_and_warmup_options(warmup):
    """train.ema's decay, warmup and warmup_power reach timm's average: after an update at
    step s the average moves by 1 - decay(s), where decay(s) = 1 - (1 + (s - 1))^-power
    (capped at `decay`) with warmup, and `decay` without."""
    from accelerate import Accelerator

    from transferkit.engine.ema import build_ema
    from transferkit.recipes.schema import EmaSection

    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    section = EmaSection(decay=0.9, warmup=warmup, warmup_power=0.5)
    ema = build_ema(section, model, Accelerator(cpu=True))
    expected = 0.0
    for step in (2, 5, 200):
        with torch.no_grad():
            model.weight.fill_(1.0)
        ema.update(model, step=step)
        decay = min(1 - step**-0.5, 0.9) if warmup else 0.9
        expected = decay * expected + (1 - decay)
        assert ema.module.weight.item() == pytest.approx(expected, rel=1e-6)
