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
    def __init__(self) -> None:
        self.received: int | None = None
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
            os._exit(128 + signum)
        self.received = signum

    @property
    def exit_code(self) -> int:
        """The shell convention, 128 + signal: 143 for SIGTERM, 130 for SIGINT."""
        return 0 if self.received is None else 128 + self.received
