"""What the benchmarks share: a run trained by the CLI in its own process (its peak memory and
its threads its own), so that one benchmark measures what a user's command does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def train_in_process(recipe: str | Path, out: Path, overrides: list[str] = (),
                     threads: str | None = None) -> str | None:  # fmt: skip
    """`transferkit train RECIPE --output OUT --overwrite --set ...`; None when it trained, else
    the last line it printed (the error). `threads`: OMP_NUM_THREADS unless already set."""
    args = [sys.executable, "-m", "transferkit.cli", "train", str(recipe), "--output", str(out),
            "--overwrite"]  # fmt: skip
    for override in overrides:
        args += ["--set", override]
    env = dict(os.environ)
    if threads is not None:
        env.setdefault("OMP_NUM_THREADS", threads)
    result = subprocess.run(args, capture_output=True, text=True, env=env)
    if result.returncode == 0:
        return None
    return (result.stderr or result.stdout).strip().splitlines()[-1][:300]
