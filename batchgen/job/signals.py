"""SIGTERM/SIGINT: the first asks the run to stop at the next step, the second exits at once.

Slurm (`--signal=B:TERM@120`), Kubernetes and Ctrl-C all send one of these and wait a little.
The run then stops admitting rows, drops the ones in flight and commits what is finished. A
second signal means "now": os._exit without cleanup is safe because every commit is atomic and
anything uncommitted is simply generated again on resume.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """repeat_exits=False (data-parallel workers): later signals are ignored; the parent process,
    which may forward a signal its workers also got directly, decides when "now" is.
    on_exit: called before a second signal exits at once (the parent kills its workers)."""

    def __init__(self, repeat_exits: bool = True) -> None:
        self.received: int | None = None
        self.repeat_exits = repeat_exits
        self.on_exit = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:  # noqa: PYI034 - Self needs Python 3.11
        # Handlers can only be installed from the main thread; elsewhere (a notebook's worker
        # thread) the caller keeps its own handling.
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            if not self.repeat_exits:
                return
            if self.on_exit is not None:
                self.on_exit()
            os._exit(128 + signum)
        self.received = signum

    @property
    def exit_code(self) -> int:
        """The shell convention, 128 + signal: 143 for SIGTERM, 130 for SIGINT."""
        return 0 if self.received is None else 128 + self.received
