"""Several machines, simulated on this one over loopback: two torchrun launchers, one per
"node", rendezvous at 127.0.0.1 exactly as two machines would at the main one's address
(docs/distributed.md). Each node runs in its own folder, as each machine has its own disk."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import epoch_end_weights, free_port, records

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# max_steps stops the run 2 steps into epoch 1, after the phase change unfroze blocks 3-5.
RECIPE = """
name: two_nodes
seed: 0
model: {backbone: "timm:test_vit", kwargs: {img_size: 32}}
tasks: {digit: {kind: multiclass}}
data: {source: manifest, path: data/digits/source/manifest.csv, val_split: null, image_size: 32,
       augment: none, max_samples: 128, num_workers: 0}
schedule:
  phases:
    - {from_epoch: 0, freeze: "up_to:blocks.4"}
    - {from_epoch: 1, freeze: "up_to:blocks.2"}
train: {epochs: 3, batch_size: BATCH, optimizer: sgd, lr: 0.05, momentum: 0.9, weight_decay: 0.0,
        scheduler: constant, max_steps: 6}
"""


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_two_nodes_rendezvous_and_match_one_process(workdir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    recipe = workdir / "two_nodes.yaml"
    recipe.write_text(RECIPE.replace("BATCH", "16"))
    nodes = [workdir / "node0", workdir / "node1"]
    port = free_port()  # one rendezvous for both launchers
    launchers = []
    for rank, node in enumerate(nodes):
        node.mkdir()
        (node / "data").symlink_to(workdir / "data")  # every machine has the data
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc_per_node", "1", "--node_rank", str(rank), "--master_addr", "127.0.0.1",
               "--master_port", str(port), "-m", "transferkit.cli", "train", str(recipe),
               "--output", "run"]  # fmt: skip
        # Output to files: a full pipe would block one launcher while the test waits on the other.
        out, err = (open(node / "stdout.txt", "w"), open(node / "stderr.txt", "w"))  # noqa: SIM115
        launchers.append(
            (subprocess.Popen(cmd, cwd=node, env=env, stdout=out, stderr=err), out, err)
        )
    for process, out, err in launchers:
        process.wait(timeout=600)
        out.close()
        err.close()
    for (process, _, _), node in zip(launchers, nodes):
        assert process.returncode == 0, (node / "stderr.txt").read_text()[-3000:]

    main, other = (node / "run" for node in nodes)
    assert (main / "complete.json").is_file() and (main / "model.safetensors").is_file()
    assert [r["epoch"] for r in records(main)] == [0, 1]
    assert records(main)[-1]["step"] == 6
    # Only rank 0 writes the run folder. Accelerate's save_state has every process write its
    # own random state into the checkpoint folder; without a shared disk, node 1's land on
    # its own and node 0's checkpoints lack them (so --resume needs a shared filesystem).
    ends = sorted(p.name for p in (main / "checkpoints").iterdir())
    assert ends == ["step_00000004_end", "step_00000006_end"]
    assert _files(other) == {f"checkpoints/.tmp_{name}/random_states_1.pkl" for name in ends}
    assert "epoch 0 |" in (nodes[0] / "stdout.txt").read_text()
    assert "epoch 0 |" not in (nodes[1] / "stdout.txt").read_text()

    # One process at the same global batch (2 nodes x 1 process x 16 = 32) ends with the same
    # weights: SGD, float summation order only (measured: 6e-8).
    recipe.write_text(RECIPE.replace("BATCH", "32"))
    one = workdir / "one_node"
    cmd = [sys.executable, "-m", "transferkit.cli", "train", str(recipe), "--output", str(one)]
    result = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    two_nodes, reference = epoch_end_weights(main), epoch_end_weights(one)
    assert set(two_nodes) == set(reference)
    for key, value in reference.items():
        assert torch.allclose(two_nodes[key], value, rtol=0, atol=1e-6), key
    moved = [k for k in reference if k.startswith("backbone.model.blocks.3.")]
    first = epoch_end_weights(main, 0)
    assert moved and all(not torch.equal(first[k], two_nodes[k]) for k in moved)
