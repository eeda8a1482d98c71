"""Named crash points, so tests can kill -9 the process at an exact step of a commit.

BATCHGEN_FAILPOINTS="part_written=2,engine_step=5" sends SIGKILL to this process the 2nd time it
reaches `part_written` and the 5th time it reaches `engine_step`. Unset (always, in real runs), a
failpoint is one dict lookup. SIGKILL rather than an exception: nothing may clean up, exactly as
when the OOM killer or a preempting scheduler strikes.

BATCHGEN_FAILPOINTS_ONCE=PATH makes the kill happen in one process only, once: the first process
to create PATH (exclusively) is killed, every other one (a restarted data-parallel worker, its
siblings) passes.
"""

from __future__ import annotations

import os
import signal

_ENV = "BATCHGEN_FAILPOINTS"
_ONCE_ENV = "BATCHGEN_FAILPOINTS_ONCE"
_hits: dict[str, int] = {}


def _parse(text: str) -> dict[str, int]:
    points = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, count = item.partition("=")
        points[name] = int(count or 1)
    return points


_armed = _parse(os.environ.get(_ENV, ""))


def failpoint(name: str) -> None:
    if name not in _armed:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == _armed[name] and _claim():
        os.kill(os.getpid(), signal.SIGKILL)


def _claim() -> bool:
    marker = os.environ.get(_ONCE_ENV)
    if not marker:
        return True
    try:
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    return True
