"""Fast paths: feature caching, the frozen prefix without a graph, compile across an unfreeze,
channels_last, automatic batch size."""

from __future__ import annotations

import pytest
import torch
from conftest import QUICK, ROOT, epoch_end_weights, records

from transferkit.engine import train
from transferkit.errors import UserError
from transferkit.models import create_backbone
from transferkit.recipes import load_recipe

TRANSFER = ROOT / "recipes/digits_transfer.yaml"


def transfer(workdir, source_run, name, *overrides):
    base = [*QUICK, f"model.weights={source_run}", "train.epochs=3", "data.max_samples=96"]
    return train(load_recipe(TRANSFER, [*base, *overrides]), output=str(workdir / "perf" / name))


def heads(state):
    return {k: v for k, v in state.items() if k.startswith("heads.")}


def test_cached_and_uncached_linear_probe_train_the_same_heads(
    workdir, source_run, monkeypatch, capsys
):
    monkeypatch.chdir(workdir)
    probe = ["schedule.phases.1.from_epoch=10", "tasks.ink.hidden=8", "tasks.ink.dropout=0.3"]
    cached = transfer(workdir, source_run, "cached", *probe, "train.feature_cache=auto")
    assert "features: cached once" in capsys.readouterr().out
    plain = transfer(workdir, source_run, "plain", *probe, "train.feature_cache=forbid")
    assert "features: computed every step (train.feature_cache: forbid)" in capsys.readouterr().out
    a, b = heads(epoch_end_weights(cached)), heads(epoch_end_weights(plain))
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key
    assert all(
        not torch.equal(a[k], heads(epoch_end_weights(cached, 0))[k]) for k in a
    )  # they trained
    assert records(cached)[-1]["val/digit/count"] == records(plain)[-1]["val/digit/count"]
    for metric in ("val/digit/accuracy", "val/ink/mae"):
        assert records(cached)[-1][metric] == pytest.approx(records(plain)[-1][metric], abs=1e-4)


def test_cache_is_used_only_where_valid(workdir, source_run, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    transfer(workdir, source_run, "lpft")  # phase 0 frozen, phase 1 fine-tunes
    out = capsys.readouterr().out
    assert (
        "features: cached once" in out
        and "features: computed every step (backbone parameters train" in out
    )
    transfer(workdir, source_run, "augmented", "data.augment=light")
    assert "train augmentation is random" in capsys.readouterr().out
    with pytest.raises(UserError, match="train.feature_cache: force, but phase 0"):
        transfer(workdir, source_run, "forced", "data.augment=light", "train.feature_cache=force")


def test_cache_on_disk_gives_the_same_heads(workdir, source_run, monkeypatch):
    monkeypatch.chdir(workdir)
    probe = ["schedule.phases.1.from_epoch=10"]
    probe.append("train.feature_cache_shared=false")  # the cache inside the run
    memory = transfer(workdir, source_run, "memory", *probe)
    disk = transfer(workdir, source_run, "disk", *probe, "train.feature_cache_max_gb=0")
    assert (disk / "feature_cache" / "train" / "features.arrow").is_file()
    a, b = heads(epoch_end_weights(memory)), heads(epoch_end_weights(disk))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_frozen_prefix_builds_no_autograd_graph():
    backbone = create_backbone("timm:test_resnet")
    backbone.freeze("up_to:layer2")
    _, maps = backbone.forward_with_maps(torch.randn(2, 3, 32, 32), ["layer2", "layer3"])
    assert maps["layer2"].grad_fn is None and not maps["layer2"].requires_grad  # nothing stored
    assert maps["layer3"].grad_fn is not None


def test_compiled_model_trains_a_group_unfrozen_mid_run(workdir, source_run, monkeypatch):
    monkeypatch.chdir(workdir)
    run_dir = transfer(workdir, source_run, "compiled", "train.compile=true", "train.compile_backend=aot_eager",
                       "train.epochs=2", "train.feature_cache=forbid")  # fmt: skip
    before, after = epoch_end_weights(run_dir, 0), epoch_end_weights(run_dir, 1)
    layer4 = [k for k in after if k.startswith("backbone.model.layer4") and k.endswith("weight")]
    assert layer4 and all(not torch.equal(before[k], after[k]) for k in layer4)


def test_channels_last_trains(workdir, source_run, monkeypatch):
    monkeypatch.chdir(workdir)
    plain = records(
        transfer(workdir, source_run, "contiguous", "train.epochs=2", "train.feature_cache=forbid")
    )
    channels_last = records(
        transfer(
            workdir,
            source_run,
            "channels_last",
            "train.epochs=2",
            "train.channels_last=true",
            "train.feature_cache=forbid",
        )
    )
    assert channels_last[-1]["train/loss"] == pytest.approx(plain[-1]["train/loss"], rel=1e-3)


def test_auto_batch_size_backs_off_on_out_of_memory(workdir, source_run, monkeypatch, capsys):
    from transferkit.models.backbone import Backbone

    original = Backbone.forward

    def small_memory(self, images):
        if images.shape[0] > 8:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, images)

    monkeypatch.setattr(Backbone, "forward", small_memory)
    monkeypatch.chdir(workdir)
    run_dir = transfer(
        workdir,
        source_run,
        "auto_bs",
        "train.auto_batch_size=true",
        "train.batch_size=32",
        "train.epochs=1",
        "train.feature_cache=forbid",
    )
    assert "auto batch size: 8 per device, 4 accumulation steps" in capsys.readouterr().out
    assert records(run_dir)[-1]["step"] == 3  # 96 training images: 12 batches of 8, 4 per step
