"""One run per output directory: a lease file that names its holder and carries a heartbeat.

    OUT/_batchgen/lease.json   {"host", "pid", "started", "heartbeat", "timeout_s", "token"}

A run takes the lease of the directory it commits into (OUT, or OUT/task-<i>/ in an array) before
it loads the model, and gives it back when it ends. A second run finds the lease held and is
refused at once, naming the holder. A holder that was killed (kill -9, the OOM killer, a lost
node) cannot give it back, so a lease is stale, and taken over, when

  - its host is this host and its pid is not alive, or
  - its heartbeat is older than its timeout_s (another host, a shared filesystem, an object store).

Taking it is race-safe where the store allows. On a local disk the file is written aside and
hard-linked into place (one creator wins, and nobody reads it half-written), and a stale lease is
removed under an flock, after checking that it is still the stale one. On an object store, where
there is no exclusive create, the run writes its own lease and reads it back: of two runs that
raced, the one whose token is not read back gives up.
A holder whose lease was taken over (it stopped heartbeating for longer than the timeout, e.g. a
suspended process) notices at its next heartbeat and commits nothing more.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from typing import Any

import fsspec

from batchgen.job import store

LEASE_FILE = "lease.json"
# Seconds without a heartbeat after which a lease is stale; the holder beats 4 times per timeout.
DEFAULT_TIMEOUT_S = float(os.environ.get("BATCHGEN_LEASE_TIMEOUT_S", "120"))
_READ_BACK_DELAY_S = 0.2  # object stores: let a racing writer's put land before reading back


class OutputBusy(RuntimeError):
    """Another live run holds the lease of this output directory."""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def is_stale(holder: dict[str, Any], now: float | None = None) -> bool:
    """Whether the run that wrote `holder` is gone (see the module docstring)."""
    now = time.time() if now is None else now
    if holder.get("host") == socket.gethostname() and not pid_alive(int(holder.get("pid", -1))):
        return True
    return now - float(holder.get("heartbeat", 0)) > float(holder.get("timeout_s", DEFAULT_TIMEOUT_S))


def describe(holder: dict[str, Any]) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(holder.get("started", 0))))
    beat = time.time() - float(holder.get("heartbeat", 0))
    return (f"host {holder.get('host')}, pid {holder.get('pid')}, started {started}, "
            f"last heartbeat {beat:.0f}s ago")


class Lease:
    """The lease of one output directory's metadata folder `meta`."""

    def __init__(self, fs: fsspec.AbstractFileSystem, meta: str, url: str, timeout_s: float | None = None):
        self.fs = fs
        self.url = url  # for messages
        self.meta = meta
        self.path = store.join(meta, LEASE_FILE)
        self.timeout_s = DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
        self.token = uuid.uuid4().hex
        self.held = False
        self.lost = False  # taken over by another run while this one still ran
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- reading ------------------------------------------------------------------------------

    def holder(self) -> dict[str, Any] | None:
        try:
            with self.fs.open(self.path, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except ValueError:
            # Half a file cannot happen (writes are atomic); an unreadable one is treated as stale.
            return {"host": "?", "pid": -1, "heartbeat": 0, "token": None}

    def live_holder(self) -> dict[str, Any] | None:
        """The holder when one is alive, else None."""
        holder = self.holder()
        return holder if holder is not None and not is_stale(holder) else None

    # ---- taking and giving back ---------------------------------------------------------------

    def acquire(self) -> None:
        """Take the lease or raise OutputBusy naming the live holder; starts the heartbeat."""
        self.fs.makedirs(self.meta, exist_ok=True)
        take = self._acquire_local if store.is_local(self.fs) else self._acquire_object_store
        for _ in range(5):  # a lost race with a stale lease's removal is retried
            outcome = take()
            if outcome is True:
                self.held = True
                self._thread = threading.Thread(target=self._beat, name="batchgen-lease", daemon=True)
                self._thread.start()
                return
            if outcome is not None:
                raise OutputBusy(self._busy_message(outcome))
        raise OutputBusy(f"{self.url}: could not take the output lease ({self.path}): it changed hands repeatedly")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.held and not self.lost:
            holder = self.holder()
            if holder is not None and holder.get("token") == self.token:
                store.remove(self.fs, self.path)
        self.held = False

    def __enter__(self) -> Lease:  # noqa: PYI034 - Self needs Python 3.11
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def check(self) -> None:
        """Raise OutputBusy when another run took this lease over (so nothing more is committed)."""
        if self.lost:
            holder = self.holder() or {}
            raise OutputBusy(f"{self.url}: this run lost its output lease to another run ({describe(holder)}): "
                             "it stopped heartbeating for longer than its timeout; nothing more is committed")

    def _content(self, started: float | None = None) -> bytes:
        now = time.time()
        return json.dumps({"version": 1, "host": socket.gethostname(), "pid": os.getpid(),
                           "started": started or now, "heartbeat": now, "timeout_s": self.timeout_s,
                           "token": self.token}).encode()

    def _acquire_local(self) -> bool | dict[str, Any] | None:
        """True when taken; the holder's record when it is live; None to retry."""
        # The lease appears whole or not at all: written to a file of our own, then hard-linked into
        # place (exclusive, as O_EXCL). Created in place with O_EXCL, a racer could read it still
        # empty, take it for a stale unreadable lease and remove it (two winners).
        tmp = f"{self.path}.{self.token}.tmp"
        with open(tmp, "wb") as f:
            f.write(self._content())
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            holder = self.holder()
            if holder is None:
                return None  # given back meanwhile
            if not is_stale(holder):
                return holder
            self._remove_stale_local(holder)
            return None
        finally:
            os.unlink(tmp)
        return True

    def _remove_stale_local(self, seen: dict[str, Any]) -> None:
        """Remove the stale lease `seen`, unless another run replaced it since (checked under an flock)."""
        import fcntl

        with open(store.join(self.meta, ".lease.lock"), "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                now = self.holder()
                if now is not None and now.get("token") == seen.get("token") and is_stale(now):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.path)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _acquire_object_store(self) -> bool | dict[str, Any] | None:
        holder = self.holder()
        if holder is not None and not is_stale(holder):
            return holder
        store.write_atomic(self.fs, self.path, self._content())
        time.sleep(_READ_BACK_DELAY_S)
        back = self.holder()
        if back is not None and back.get("token") == self.token:
            return True
        return back  # another run's lease was written after ours: it won

    # ---- heartbeat ----------------------------------------------------------------------------

    def _beat(self) -> None:
        started = time.time()
        while not self._stop.wait(self.timeout_s / 4):
            try:
                holder = self.holder()
                if holder is None or holder.get("token") != self.token:
                    self.lost = True
                    return
                started = holder.get("started", started)
                store.write_atomic(self.fs, self.path, self._content(started))
            except OSError:  # a store hiccup: try again at the next beat
                continue

    def _busy_message(self, holder: dict[str, Any]) -> str:
        return (f"{self.url} is in use by another batchgen run ({describe(holder)}); two runs on one output "
                "would generate the same rows twice. Wait for it to end or stop it; a run that was killed "
                f"leaves a lease that is taken over once its pid is gone (same host) or its heartbeat is older "
                f"than {float(holder.get('timeout_s', self.timeout_s)):.0f}s. Lease: {self.path}")
