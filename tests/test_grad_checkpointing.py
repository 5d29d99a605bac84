"""`train.grad_checkpointing`: the same gradients with and without it on every kind of backbone,
frozen groups on the input side never recomputed, groups unfrozen by a phase recomputed from then
on, and whole runs (a phase change, a gradient-based balancer) that train as they would without
it."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ROOT, records

from transferkit.engine import train
from transferkit.errors import UserError
from transferkit.models import create_backbone
from transferkit.recipes import load_recipe

RECIPE = str(ROOT / "recipes/digits_transfer.yaml")
BACKBONES = ["timm:test_vit", "timm:test_efficientnet", "timm:test_resnet",
             "torchvision:resnet18", "torchvision:mobilenet_v3_small"]  # fmt: skip


def _grads(backbone, images) -> dict[str, torch.Tensor]:
    backbone.zero_grad(set_to_none=True)
    backbone(images).square().mean().backward()
    return {n: p.grad.clone() for n, p in backbone.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("spec", BACKBONES)
def test_the_gradients_are_the_same_with_and_without_it(spec):
    torch.manual_seed(0)
    plain = create_backbone(spec, None)
    plain.freeze("up_to:0")  # a frozen group on the input side, the rest training
    plain.eval()  # dropout and batch-norm statistics aside: the same function twice
    checkpointed = copy.deepcopy(plain)
    how = checkpointed.set_grad_checkpointing()
    assert ("timm's" in how) == spec.startswith("timm:")
    last = dict(checkpointed.model.named_modules())[checkpointed.groups[-1].output_module]
    calls = []  # a layer inside the last group: its recomputation calls it again
    next(last.children()).register_forward_pre_hook(lambda *_: calls.append(1))
    images = torch.randn(2, 3, 64, 64)
    expected, got = _grads(plain, images), _grads(checkpointed, images)
    if not spec.startswith("timm:"):  # the wrapped group ran again in the backward pass
        assert len(calls) == 2
    assert expected.keys() == got.keys() and expected
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_frozen_groups_are_not_recomputed_and_unfrozen_ones_are():
    """Forward calls of two blocks during one step: a frozen block on the input side runs once,
    a training block twice (forward, then its recomputation); unfreezing the first block (a new
    phase) makes it recomputed too."""
    torch.manual_seed(0)
    backbone = create_backbone("timm:test_efficientnet", None)
    backbone.set_grad_checkpointing()
    backbone.train()
    modules = dict(backbone.model.named_modules())
    calls = {"blocks.0.0": 0, "blocks.2.0": 0}  # the first block of two stages (timm hooks blocks)
    for name in calls:
        # A pre-hook: torch stops a recomputation early once it has what the backward needs,
        # which can be before a block's forward hooks would run.
        modules[name].register_forward_pre_hook(
            lambda *_, key=name: calls.__setitem__(key, calls[key] + 1)
        )
    images = torch.randn(2, 3, 64, 64)

    backbone.freeze("up_to:blocks.0")
    backbone(images).sum().backward()
    assert calls == {"blocks.0.0": 1, "blocks.2.0": 2}
    backbone.freeze("none")
    calls.update({"blocks.0.0": 0, "blocks.2.0": 0})
    backbone(images).sum().backward()
    assert calls == {"blocks.0.0": 2, "blocks.2.0": 2}
    with torch.no_grad():  # evaluation keeps nothing to recompute
        calls.update({"blocks.0.0": 0, "blocks.2.0": 0})
        backbone.eval()
        backbone(images)
    assert calls == {"blocks.0.0": 1, "blocks.2.0": 1}


@pytest.mark.parametrize("method", ["sum", "upgrad"])
def test_a_run_through_a_phase_change_trains_as_without_it(workdir, tmp_path, monkeypatch,
                                                           method, capsys):  # fmt: skip
    """LP-FT (a probe, then every group) with the plain sum and with UPGrad (a Jacobian of
    every task's loss, several backward passes through the checkpointed groups)."""
    monkeypatch.chdir(workdir)
    sets = ["model.weights=none", "data.max_samples=32", "train.epochs=2", "train.batch_size=16",
            "data.num_workers=0", "schedule.phases.1.from_epoch=1", "schedule.norm_stats=frozen",
            "train.feature_cache=forbid", f"multitask.method={method}",
            *(["tasks.ink.weight=1.0"] if method != "sum" else [])]  # fmt: skip
    plain = train(load_recipe(RECIPE, sets), output=str(tmp_path / "a"))
    capsys.readouterr()
    checked = train(load_recipe(RECIPE,
                                [*sets, "train.grad_checkpointing=true"]), output=str(tmp_path / "b"))  # fmt: skip
    assert "gradient checkpointing: timm's set_grad_checkpointing" in capsys.readouterr().out
    for a, b in zip(records(plain), records(checked), strict=True):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-4)
        assert b["val/digit/accuracy"] == pytest.approx(a["val/digit/accuracy"], abs=1e-6)


def test_it_is_refused_with_auxiliary_heads(workdir, monkeypatch, tmp_path):
    monkeypatch.chdir(workdir)
    recipe = load_recipe(RECIPE, [
        "model.weights=none", "train.grad_checkpointing=true",
        "model.aux_heads=[{task: digit, group: layer3}]"])  # fmt: skip
    with pytest.raises(UserError, match="train.grad_checkpointing with model.aux_heads"):
        train(recipe, output=str(tmp_path / "aux"))


@pytest.mark.parametrize("setting", ["lora", "bf16"])
def test_it_composes_with_lora_adapters_and_bf16_autocast(setting):
    """A LoRA adapter's weights get the same gradients through recomputed blocks; under bf16
    autocast (as `train.mixed_precision: bf16` runs the forward) the recomputation sees the same
    precision, so the gradients still match."""
    from transferkit.models import AdapterSpec, attach_adapter

    torch.manual_seed(0)
    plain = create_backbone("timm:test_vit", None)
    if setting == "lora":
        attach_adapter(plain, AdapterSpec("lora", ("regex:qkv",), r=2))
    plain.freeze("none")  # with an adapter: only the adapter trains
    plain.eval()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing()
    images = torch.randn(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=setting == "bf16"):
        expected, got = _grads(plain, images), _grads(checkpointed, images)
    if setting == "lora":
        assert expected and all("lora_" in name for name in expected)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, atol=1e-5, rtol=1e-5, msg=name)
