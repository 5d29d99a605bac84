"""Shared helpers for the tests: tiny models, tiny images, one optimizer step."""

from __future__ import annotations

import atexit
import csv
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

# Nothing is downloaded in tests: hub libraries must fail fast instead of trying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The shared feature cache of runs in tests (and their subprocesses) goes to a folder of this
# session's own, never ~/.cache; tests of the cache itself give theirs explicitly.
if "TRANSFERKIT_CACHE" not in os.environ:
    os.environ["TRANSFERKIT_CACHE"] = tempfile.mkdtemp(prefix="transferkit_test_cache_")
    atexit.register(shutil.rmtree, os.environ["TRANSFERKIT_CACHE"], ignore_errors=True)
torch.set_num_threads(1)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter and buffer (keeping the version metadata that some
    models, such as torchvision's MNASNet, need to load it back)."""
    state = module.state_dict()
    copy = type(state)((k, v.detach().clone()) for k, v in state.items())
    copy._metadata = getattr(state, "_metadata", None)
    return copy


def one_step(model: torch.nn.Module, size: int, batch: int = 2, lr: float = 0.1) -> None:
    """One SGD step with weight decay on every parameter, on random images in train mode.

    Weight decay would move a frozen parameter that wrongly received a gradient, and the
    optimizer holds all parameters, as the training engine's does.
    """
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=0.1)
    images = torch.randn(batch, 3, size, size)
    outputs = model(images)
    loss = sum(out.float().pow(2).mean() for out in outputs.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


ROOT = Path(__file__).resolve().parents[1]
QUICK = ["train.epochs=2", "data.max_samples=48", "train.batch_size=16"]  # a run of a few seconds


def records(run_dir: Path) -> list[dict]:
    """The per-epoch records of a run's metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def epoch_end_weights(run_dir: Path, index: int = -1) -> dict[str, torch.Tensor]:
    """Model weights of an epoch-end checkpoint (-1: the newest kept one)."""
    from safetensors.torch import load_file

    ends = sorted((Path(run_dir) / "checkpoints").glob("step_*_end"))
    return load_file(str(ends[index] / "model.safetensors"))


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    """A folder with the digits data, as `make demo` writes it; engine tests run inside it."""
    from transferkit.demo.digits import write_digits, write_few_labels

    path = tmp_path_factory.mktemp("engine")
    write_digits(path / "data" / "digits")
    write_few_labels(path / "data" / "digits")
    return path


@pytest.fixture(scope="session")
def source_run(workdir):
    """A short run of recipes/digits_source.yaml: the backbone the transfer tests start from."""
    from transferkit.engine import train
    from transferkit.recipes import load_recipe

    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        recipe = load_recipe(ROOT / "recipes/digits_source.yaml", QUICK)
        return train(recipe, output=str(workdir / "runs" / "digits_source")).resolve()
    finally:
        os.chdir(cwd)


# Two fully labelled tasks (labels derived from the digit), so that the mean loss of one
# process over 32 rows equals the mean of two processes' means over 16 rows each.
FULL_LABELS = "data/digits/full_labels.csv"


@pytest.fixture(scope="session")
def labelled(workdir) -> Path:
    """`FULL_LABELS` in `workdir`: the transfer digits with a digit and a parity label each."""
    source = workdir / "data/digits/transfer/manifest.csv"
    target = workdir / FULL_LABELS
    with source.open() as handle:
        rows = list(csv.DictReader(handle))
    with target.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "digit", "parity"])
        writer.writeheader()
        for row in rows:
            parity = "even" if int(row["digit"]) % 2 == 0 else "odd"
            writer.writerow({"image": "transfer/" + row["image"], "digit": row["digit"],
                             "parity": parity})  # fmt: skip
    return target


def advance_balancer(balancer, i: int, device=None) -> torch.Tensor:
    """Step `i` of a balancer on a fixed case (on `device`): aggregate, or combine with the
    epoch ends, FAMO's losses after the update and a step on learned weights, as a run does."""
    k = len(balancer.objectives)
    generator = torch.Generator().manual_seed(40 + i)
    jacobian = torch.randn(k, 40, generator=generator, dtype=torch.float64).float().to(device)
    losses = (torch.rand(k, generator=generator) + 0.2).to(device)
    on = torch.ones(k, dtype=torch.bool, device=device)
    if balancer.kind == "gradient":
        return balancer.aggregate(jacobian, losses, on, 0, i)
    vector = losses.clone().requires_grad_(True) * 1.0
    value = balancer.combine(vector, on, i // 2, i % 2)
    if i % 2:
        balancer.end_epoch()
    if balancer.needs_losses_after_step:
        balancer.after_step(losses * 0.9, on)
    if balancer.learnable:  # take an optimizer step on the learned weights
        for p in balancer.learnable_parameters():
            (g,) = torch.autograd.grad(value, p, retain_graph=True)
            p.data -= 0.1 * g
    return value


def balancer_tensors(balancer) -> dict[str, torch.Tensor]:
    """Every tensor of a balancer's state, module and extra (torchjd's attributes, internal
    optimizers), by path; `state_dict` holds the live tensors or copies on the same device.
    NumPy arrays (Nash-MTL's warm start) are host memory and are left out."""
    found: dict[str, torch.Tensor] = {}

    def walk(value, path: str) -> None:
        if isinstance(value, torch.Tensor):
            found[path] = value
        elif isinstance(value, dict) and "__numpy__" not in value:
            for key, item in value.items():
                walk(item, f"{path}.{key}")
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                walk(item, f"{path}[{index}]")

    walk(balancer.state_dict(), "")
    return found


def free_port() -> int:
    """A TCP port free on loopback now, for a torchrun rendezvous: fixed ports collide when
    tests run in parallel (pytest-xdist) or a previous run's socket lingers."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def multitask_run(workdir, source_run):
    """A short run of recipes/digits_transfer.yaml: three tasks (multiclass, binary with missing
    labels, regression) on the source backbone; its folder is a finished run with a model card."""
    from transferkit.engine import train
    from transferkit.recipes import load_recipe

    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        recipe = load_recipe(
            ROOT / "recipes/digits_transfer.yaml", [*QUICK, f"model.weights={source_run}"]
        )
        return train(recipe, output=str(workdir / "runs" / "multitask")).resolve()
    finally:
        os.chdir(cwd)


def write_digit_shards(folder: Path, shards: int, per_shard: int, start: int = 0,
                       split: str = "train") -> list[int]:  # fmt: skip
    """WebDataset tar shards `folder/SPLIT-000000.tar ...` of scikit-learn's digits as 32 px
    PNGs: `KEY.png`, `KEY.cls` (the digit) and `KEY.json` ({"id": row, "odd": bool}). Returns
    the rows written, from `start`."""
    import io

    import numpy as np
    import webdataset
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder.mkdir(parents=True, exist_ok=True)
    rows = list(range(start, start + shards * per_shard))
    for shard in range(shards):
        with webdataset.TarWriter(str(folder / f"{split}-{shard:06d}.tar")) as tar:
            for row in rows[shard * per_shard : (shard + 1) * per_shard]:
                pixels = (digits.images[row] * 255 / 16).astype(np.uint8)
                png = io.BytesIO()
                Image.fromarray(pixels).convert("RGB").resize((32, 32)).save(png, format="PNG")
                digit = int(digits.target[row])
                tar.write({"__key__": f"d{row:05d}", "png": png.getvalue(),
                           "cls": str(digit).encode(),
                           "json": json.dumps({"id": row, "odd": bool(digit % 2)}).encode()})  # fmt: skip
    return rows
