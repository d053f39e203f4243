"""Preemption: SIGTERM (a scheduler's notice) or SIGINT (Ctrl-C) asks the run to stop at the end of
the step it is in, after writing a checkpoint; the loop then returns and the command exits 0 with a
line saying how to resume. A second signal stops at once (SIGINT: KeyboardInterrupt; SIGTERM:
SystemExit(143)), unwinding through the atomic writes, so no half-written file is left behind.

Under torchrun each process sees its own signal, maybe at different steps: the loop sums every
process's flag with the step's metrics, so all of them stop after the same step."""
from __future__ import annotations

import signal
import sys
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preemption:
    """A context manager that installs the handlers (main thread only; a no-op elsewhere)."""

    def __init__(self, announce: bool = True):
        self.signum: int | None = None
        self.announce = announce
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            self.restore()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.signum = signum
        if self.announce:
            print(f"\npeftkern: {signal.Signals(signum).name} received: stopping after this step with a checkpoint "
                  "(send it again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *exc) -> bool:
        self.restore()
        return False
