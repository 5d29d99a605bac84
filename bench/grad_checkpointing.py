"""`make bench-checkpointing`: activation memory and step time with and without
`train.grad_checkpointing`, on a ViT and a CNN from timm's test models scaled up to a realistic
depth (ViT: 12 blocks of width 384, 6 heads, ViT-S/16's shape; CNN: test_resnet with ResNet-34's
3-4-6-3 blocks), every group training, batch 16 at 224 px.

Each measurement is its own process (a fresh allocator). On a GPU the activation memory is
`torch.cuda.max_memory_allocated` during one training step minus what was allocated before it
(weights, inputs); on a CPU it is the peak resident memory during the first step (sampled every
millisecond from /proc/self/statm) minus the resident memory just before it, which also counts
the gradients and the allocator's own growth: read the CPU ratio, not the absolute figure, as
the measure. The step time is the median of 5 steps after that one. Writes
`grad_checkpointing.json` and `.md` under `--out` (default bench/results).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = {
    "ViT (test_vit, 12 x 384)": ("timm:test_vit", {"depth": 12, "embed_dim": 384, "num_heads": 6}),
    "CNN (test_resnet, 3-4-6-3)": ("timm:test_resnet", {"layers": [3, 4, 6, 3]}),
}
FULL = {"batch": 16, "size": 224, "steps": 5}
QUICK = {"batch": 2, "size": 64, "steps": 1}


def _resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(
    spec: str, kwargs: dict, checkpointing: bool, batch: int, size: int, steps: int
) -> dict:
    """One configuration, in this process: activation bytes of a step and its median time."""
    import torch

    from transferkit.models import create_backbone

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone = create_backbone(spec, None, **kwargs).to(device)
    if checkpointing:
        backbone.set_grad_checkpointing()
    backbone.train()
    images = torch.randn(batch, 3, size, size, device=device)

    def step() -> None:
        backbone(images).float().square().mean().backward()
        backbone.zero_grad(set_to_none=True)

    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        activation = torch.cuda.max_memory_allocated() - before
    else:
        peak, done = [_resident_bytes()], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _resident_bytes())
                time.sleep(0.001)

        before = _resident_bytes()
        watcher = threading.Thread(target=sample)
        watcher.start()
        step()
        done.set()
        watcher.join()
        activation = max(peak[0], _resident_bytes()) - before
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"activation_mb": round(activation / 2**20, 1),
            "step_s": round(statistics.median(times), 4), "device": device}  # fmt: skip


def _in_process(name: str, checkpointing: bool, cfg: dict) -> dict:
    spec, kwargs = MODELS[name]
    code = ("import json, sys; from bench.grad_checkpointing import measure; "
            f"print(json.dumps(measure({spec!r}, {kwargs!r}, {checkpointing}, {cfg['batch']}, "
            f"{cfg['size']}, {cfg['steps']})))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=HERE.parent, check=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    rows = []
    for name in MODELS:
        off, on = _in_process(name, False, cfg), _in_process(name, True, cfg)
        rows.append({"model": name, "off": off, "on": on,
                     "memory_saved": round(1 - on["activation_mb"] / max(off["activation_mb"], 1e-9), 3),
                     "time_added": round(on["step_s"] / off["step_s"] - 1, 3)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    report = {"config": cfg, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grad_checkpointing.json").write_text(json.dumps(report, indent=1))
    lines = [f"Batch {cfg['batch']} at {cfg['size']} px, every group training, "
             f"device {rows[0]['off']['device']}.", "",
             "| model | activation MB off | on | saved | step s off | on | time added |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['model']} | {r['off']['activation_mb']} | {r['on']['activation_mb']} | "
                     f"{r['memory_saved']:.0%} | {r['off']['step_s']} | {r['on']['step_s']} | "
                     f"{r['time_added']:+.0%} |")  # fmt: skip
    (out / "grad_checkpointing.md").write_text("\n".join(lines) + "\n")
    return report


if __name__ == "__main__":
    main()
