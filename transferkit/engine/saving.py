"""What a run saves besides its checkpoints: the model with its model.json (and a peft
adapter's own files), the model card, and what each epoch's record says about its footprint."""

from __future__ import annotations

import errno
import shutil

import torch
from accelerate.utils import DistributedType

from transferkit.data import TaskImageDataset
from transferkit.engine.build import RunSetup
from transferkit.engine.ema import monitored
from transferkit.errors import UserError
from transferkit.models import adapter_state
from transferkit.rundir import ModelInfo, RunDir, render_card

# How a full disk shows itself: OSError's errno, safetensors' message (os error 28), torch.save's
# ("PytorchStreamWriter failed writing file ...: file write failed").
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_WORDS = ("No space left on device", "Disk quota exceeded", "os error 28",
                    "file write failed")  # fmt: skip


def is_disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno in _DISK_FULL_ERRNOS:
        return True
    return any(words in str(err) for words in _DISK_FULL_WORDS)


def disk_full_error(run_dir: RunDir) -> UserError:
    """One line: the folder, about how much a checkpoint takes, and that the last one is kept."""
    checkpoints = run_dir.checkpoints()
    if checkpoints:
        size = sum(f.stat().st_size for f in checkpoints[-1].rglob("*") if f.is_file())
        need, kept = f"about {size / 2**20:.0f} MB a checkpoint", f"({checkpoints[-1].name}) "
    else:
        need, kept = "room for the first checkpoint", ""
    return UserError(
        f"no space left on the device of {run_dir.path} ({need}, "
        f"{shutil.disk_usage(run_dir.path).free / 2**20:.0f} MB free); the last complete "
        f"checkpoint {kept}is kept: free some space, then continue with --resume {run_dir.path}"
    )


def save_model(run: RunSetup, run_dir: RunDir, epoch: int) -> None:
    """model.safetensors and model.json, written by the main process. Under FSDP each process
    holds only a shard of the weights: every process takes part in gathering the full state
    dict onto the main one (`get_state_dict`, a collective), which writes it."""
    acc = run.accelerator
    if acc.distributed_type == DistributedType.FSDP:
        weights = acc.get_state_dict(run.model)
        if acc.is_main_process:
            # FSDP2 on a CPU returns views into its all-gather buffer, which safetensors
            # refuses to save (shared storage): copy those.
            weights = {k: v if v.untyped_storage().nbytes() == v.nbytes else v.clone()
                       for k, v in weights.items()}  # fmt: skip
            run_dir.save_model(_GatheredWeights(weights), _model_info(run, epoch))
    elif acc.is_main_process:
        final = run.ema.module if run.ema is not None and run.cfg.ema.final_model else None
        model = final or acc.unwrap_model(run.model)
        run_dir.save_model(model, _model_info(run, epoch))
        if model.backbone.adapter is not None:  # also peft's own files, to share the adapter
            run_dir.save_adapter(*adapter_state(model.backbone))


class _GatheredWeights(torch.nn.Module):
    """Stands in for the model when saving: its state dict is the one gathered under FSDP."""

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.weights = weights

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return self.weights


def _model_info(run: RunSetup, epoch: int) -> ModelInfo:
    """model.json: what `transferkit.load` needs to rebuild the model, and its epoch."""
    model = run.accelerator.unwrap_model(run.model)
    recipe = run.recipe
    return ModelInfo(
        backbone=recipe.model.backbone,
        model_kwargs=recipe.model.kwargs,
        tasks=list(model.tasks.values()),
        aux_heads=list(model.aux_specs),
        data_config=model.backbone.data_config,
        image_size=recipe.data.image_size,
        epoch=epoch,
        monitor=monitored(run.monitor, run.cfg.ema),
        adapter=model.backbone.adapter.spec.to_dict() if model.backbone.adapter else None,
        ema=bool(run.cfg.ema and run.cfg.ema.final_model),  # these weights are the average
        # Test-time augmentation: the views eval and predict use, and whether flips are allowed.
        tta=list(recipe.data.tta),
        horizontal_flip=recipe.data.horizontal_flip,
    )


def card_facts(run: RunSetup) -> dict:
    """What only training knows, for the model card: split sizes, label coverage, hardware."""
    data = {
        split: {"images": len(ds), "labelled": {t: int(m.sum()) for t, m in ds.masks.items()}}
        if isinstance(ds, TaskImageDataset)
        else {"streamed": ds.stream.describe()}  # its size and label counts are not known
        for split, ds in (("train", run.train_set), ("validation", run.val_set))
    }
    acc = run.accelerator
    device = acc.device.type
    if device == "cuda":
        device = torch.cuda.get_device_name(acc.device)
    report = run.backbone.load_report
    return {
        "data": data,
        "hardware": f"{acc.num_processes} x {device}, mixed precision {acc.mixed_precision}, "
        f"torch {torch.__version__}",
        "weights_report": str(report) if report else None,
    }


def write_card(run_dir: RunDir, summary: dict) -> None:
    """README.md before complete.json; a card that cannot be written must not fail a trained run."""
    try:
        run_dir.write_card(render_card(run_dir, summary))
    except Exception as err:  # documentation only: say so and finish the run
        print(f"warning: model card {run_dir.card_path} not written: {type(err).__name__}: {err}")


def footprint(run: RunSetup) -> dict:
    """What this phase trains and the peak memory so far (CUDA allocator, else process RSS)."""
    import resource

    if torch.cuda.is_available():
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    acc = run.accelerator
    counts = torch.tensor(
        [g["trainable_params"] for g in run.backbone.group_summary()]
        + [sum(p.numel() for p in run.model.parameters() if p.requires_grad)],
        device=acc.device,
    )
    if acc.distributed_type == DistributedType.FSDP and not acc.is_fsdp2:
        # FSDP1's parameters are views of this process's shard: add up the shards' counts.
        counts = acc.reduce(counts, reduction="sum")
    return {
        "trainable_groups": int((counts[:-1] > 0).sum()),
        "trainable_params": int(counts[-1]),
        "peak_memory_mb": round(peak_mb, 1),
    }
