"""Fine-tuning regularizers (recipe section `regularizers`): formulas, runs, balancers, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FULL_LABELS, epoch_end_weights, records

from transferkit.engine import build_run, make_accelerator, train
from transferkit.engine.regularizers import bss_penalty, delta_penalty, l2_sp_penalty
from transferkit.errors import UserError
from transferkit.recipes import parse_recipe


def test_l2_sp_against_a_hand_computation():
    w, w0 = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 0.0, 1.0])
    head = torch.tensor([[0.5, -1.0]])
    # alpha/2 * ((0)^2 + 2^2 + 2^2) + beta/2 * (0.25 + 1) = 0.1/2 * 8 + 0.2/2 * 1.25
    value = l2_sp_penalty([(w, w0), (head, None)], alpha=0.1, beta=0.2)
    assert value.item() == pytest.approx(0.4 + 0.125)


def test_bss_against_a_hand_computation():
    features = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # singular values 3 and 1
    assert bss_penalty(features, 1).item() == pytest.approx(1.0)
    assert bss_penalty(features, 2).item() == pytest.approx(10.0)
    rng = np.random.default_rng(0)
    matrix = rng.normal(size=(8, 5))
    smallest = np.sort(np.linalg.svd(matrix, compute_uv=False))[:2]
    assert bss_penalty(torch.tensor(matrix), 2).item() == pytest.approx((smallest**2).sum())


def test_delta_against_a_hand_computation():
    fm = torch.zeros(2, 1, 2, 2)
    fm0 = torch.zeros(2, 1, 2, 2)
    fm[0, 0, 0, 0], fm[1, 0, 1, 1] = 2.0, 4.0  # per image 1/2 * 4 and 1/2 * 16, mean 5
    tokens, tokens0 = torch.ones(2, 3, 4), torch.zeros(2, 3, 4)  # per image 1/2 * 12 = 6
    assert delta_penalty({"a": fm, "b": tokens}, {"a": fm0, "b": tokens0}).item() == 11.0


def _recipe(start, **sections) -> dict:
    recipe = {
        "name": "regularized",
        "seed": 2,
        "model": {"backbone": "timm:test_resnet", "weights": str(start)},
        "tasks": {"digit": {"kind": "multiclass"}},
        "data": {"source": "manifest", "path": FULL_LABELS, "val_split": None, "image_size": 32,
                 "augment": "none", "max_samples": 48},
        "schedule": {"phases": [{"from_epoch": 0, "freeze": "up_to:layer2"}]},
        "train": {"epochs": 2, "batch_size": 16, "optimizer": "sgd", "lr": 0.05,
                  "weight_decay": 0.01, "scheduler": "constant"},
    }  # fmt: skip
    for key, value in sections.items():
        recipe.setdefault(key, {}).update(value)
    return recipe


def test_a_regularizer_without_a_pretrained_start_is_one_recipe_error(workdir):
    recipe = _recipe("none", regularizers={"l2_sp": {"alpha": 0.1}})
    with pytest.raises(UserError, match="regularizers.l2_sp: .* model.weights is none"):
        parse_recipe(recipe)


def test_l2_sp_turns_weight_decay_off_and_holds_the_backbone_near_its_start(
    workdir, source_run, labelled, monkeypatch
):
    monkeypatch.chdir(workdir)
    recipe = parse_recipe(_recipe(source_run, regularizers={"l2_sp": {"alpha": 50.0}}))
    run = build_run(recipe, make_accelerator(recipe))
    assert {g["weight_decay"] for g in run.optimizer.param_groups} == {0.0}
    start = {k: v.clone() for k, v in run.model.backbone.model.state_dict().items()}
    distances = {}
    for alpha in (0.0, 50.0):
        sections = {"regularizers": {"l2_sp": {"alpha": alpha, "beta": 0.0}}}
        out = train(
            parse_recipe(_recipe(source_run, **sections)), str(workdir / "reg" / f"a{alpha}")
        )
        final = epoch_end_weights(out)
        distances[alpha] = sum(
            (final[f"backbone.model.{k}"] - v).pow(2).sum().item()
            for k, v in start.items()
            if k.startswith("layer4") and v.is_floating_point()
        )
        assert "reg/l2_sp" in records(out)[-1]
    assert 0 < distances[50.0] < 0.5 * distances[0.0]


def test_the_penalty_joins_a_gradient_balancer_unweighted(
    workdir, source_run, labelled, monkeypatch
):
    """With one task, UPGrad's direction is that task's gradient: a run with UPGrad and every
    regularizer must then end where the plain sum does, so the penalty's gradient was added
    once, outside the aggregation."""
    monkeypatch.chdir(workdir)
    regs = {"l2_sp": {"alpha": 0.5}, "bss": {"eta": 0.01}, "delta": {"beta": 0.01}}
    finals = {}
    for method in ("sum", "upgrad"):
        recipe = _recipe(source_run, regularizers=regs, multitask={"method": method})
        out = train(parse_recipe(recipe), output=str(workdir / "reg" / f"bal_{method}"))
        finals[method] = epoch_end_weights(out)
        last = records(out)[-1]
        assert {"reg/l2_sp", "reg/bss", "reg/delta"} <= last.keys() and last["reg/delta"] > 0
    for key, value in finals["sum"].items():
        assert torch.allclose(value, finals["upgrad"][key], atol=1e-5), key


@pytest.mark.slow
def test_resume_is_exact_with_an_adapter_regularizers_and_a_balancer(
    workdir, source_run, labelled, monkeypatch
):
    monkeypatch.chdir(workdir)
    recipe = _recipe(
        source_run,
        model={"adapter": {"method": "lora", "targets": ["layer3", "layer4"], "r": 2,
                           "dropout": 0.1, "train_rest": True}},
        tasks={"parity": {"kind": "binary", "classes": ["even", "odd"]}},
        regularizers={"l2_sp": {"alpha": 0.1}, "bss": {"eta": 0.01}, "delta": {"beta": 0.01}},
        multitask={"method": "uw"},
        schedule={"phases": [{"from_epoch": 0, "freeze": "all"},
                             {"from_epoch": 1, "freeze": "up_to:layer2"}],
                  "phase_warmup_epochs": 0},
        train={"epochs": 3, "optimizer": "adamw"},
    )  # fmt: skip
    straight = train(parse_recipe(recipe), output=str(workdir / "reg" / "straight"))
    resumed = workdir / "reg" / "resumed"
    short = {**recipe, "train": {**recipe["train"], "epochs": 2}}
    train(parse_recipe(short), output=str(resumed))  # into the adapter phase, then resumed
    train(parse_recipe(recipe), resume=str(resumed))
    a, b = epoch_end_weights(straight), epoch_end_weights(resumed)
    assert any("lora_" in k for k in a) and set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_match_one_with_an_adapter_regularizers_warmup_and_cosine(
    workdir, source_run, labelled
):
    """2 gloo processes end with the weights of 1 process that accumulates the same two
    micro-batches: a LoRA phase after a probe, L2-SP and DELTA (both per-row or per-parameter, so
    a sum over processes equals the sum over micro-batches; BSS depends on the whole batch's
    spectrum and is left out), a phase warmup and a cosine schedule."""
    import json
    import os
    import subprocess
    import sys

    from conftest import free_port

    finals = {}
    for procs, accum in ((1, 2), (2, 1)):
        recipe = _recipe(
            source_run,
            model={"adapter": {"method": "lora", "targets": ["layer3", "layer4"], "r": 2}},
            regularizers={"l2_sp": {"alpha": 0.1}, "delta": {"beta": 0.01}},
            schedule={"phases": [{"from_epoch": 0, "freeze": "all"},
                                 {"from_epoch": 1, "freeze": "up_to:layer2"}],
                      "phase_warmup_epochs": 1},
            train={"epochs": 3, "batch_size": 8, "grad_accum": accum, "optimizer": "adamw",
                   "lr": 0.01, "scheduler": "cosine", "warmup_epochs": 1},
        )  # fmt: skip
        path = workdir / f"adapter_ddp_{procs}.yaml"
        path.write_text(json.dumps(recipe))
        out = workdir / f"adapter_ddp_{procs}"
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}",
               "--master_port", str(free_port()), "-m", "transferkit.cli", "train", str(path),
               "--output", str(out)]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        result = subprocess.run(
            cmd, cwd=workdir, capture_output=True, text=True, timeout=600, env=env
        )
        assert result.returncode == 0, result.stderr[-3000:]
        finals[procs] = (epoch_end_weights(out), records(out))
    (one, one_records), (two, two_records) = finals[1], finals[2]
    assert [r["step"] for r in one_records] == [r["step"] for r in two_records]
    for a, b in zip(one_records, two_records, strict=True):
        assert a["lr"] == pytest.approx(b["lr"]), (a["epoch"], a["lr"], b["lr"])
    assert one_records[-1]["reg/delta"] > 0 and any("lora_" in k for k in one)
    assert one.keys() == two.keys()
    for key, value in one.items():
        assert torch.allclose(value, two[key], rtol=0, atol=1e-5), key
