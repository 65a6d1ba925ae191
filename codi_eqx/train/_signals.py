"""SIGINT / SIGTERM during training: a flag the loop reads after each step, so that an
interrupted run writes a checkpoint and stops cleanly."""

from __future__ import annotations

import signal
import threading


class StopOnSignal:
    """Within `with StopOnSignal() as stop:`, SIGINT and SIGTERM set `stop.signum` instead of
    stopping the process; a second signal of the same kind acts as it would without the
    handler. Outside the main thread (where handlers cannot be set) it does nothing."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def __enter__(self) -> StopOnSignal:  # noqa: PYI034 - a final class
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        signal.signal(signum, self._old.get(signum, signal.SIG_DFL))

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
