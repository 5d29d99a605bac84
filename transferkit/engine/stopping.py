"""Stopping a run cleanly on Ctrl-C or SIGTERM: the first signal asks it to stop at the next
step boundary (the loop saves a checkpoint there and raises `Interrupted`), a second exits at
once. Handlers are installed only while a run trains, and only from the main thread (the one
place Python delivers signals)."""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """`with StopRequest() as stop:` ... `stop.signum` is 0 until a signal asked to stop."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, object] = {}
        self._pid = os.getpid()

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:
            return  # a data-loader worker (forked with this handler): the run decides, not it
        if self.signum:  # the second: no more waiting
            os._exit(128 + signum)
        self.signum = signum
        print("stopping at the next step, with a checkpoint to resume from (press Ctrl-C "
              "again to stop at once)", file=sys.stderr, flush=True)  # fmt: skip
