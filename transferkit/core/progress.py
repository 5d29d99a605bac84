"""Progress of long work, wherever the output goes: a bar on a terminal (tqdm); in a log (CI,
nohup, a file) a plain line at most every `every_s` seconds with how far it is, how fast it
goes and how long is left, since a bar there prints a line per update or nothing at all."""

from __future__ import annotations

import sys
import time
from typing import TextIO

EVERY_S = 30.0


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class Progress:
    """`update(n, **shown)` after each piece of work (`total` pieces of `unit`); `close()`."""

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "img",
        enabled: bool = True,
        every_s: float | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.every_s = EVERY_S if every_s is None else every_s
        self.stream = stream or sys.stderr
        self.enabled, self.done, self.start = enabled, 0, time.perf_counter()
        self.last = self.start
        self.bar = None
        if enabled and self.stream.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, file=self.stream)

    def update(self, n: int = 1, **shown: str) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            if shown:
                self.bar.set_postfix(shown, refresh=False)
            return
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            print(self.line(now, shown), file=self.stream, flush=True)

    def line(self, now: float, shown: dict[str, str]) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        parts = [f"{self.desc}: {self.done}" + (f"/{self.total}" if self.total else "") + f" {self.unit}",
                 f"{rate:.1f} {self.unit}/s"]  # fmt: skip
        if self.total and rate > 0:
            parts.append(f"ETA {_clock((self.total - self.done) / rate)}")
        parts += [f"{k} {v}" for k, v in shown.items()]
        return ", ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
