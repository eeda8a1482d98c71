"""The tensor-parallel process group: its one owner in a process.

`join_or_start(config, device)` gives the engine its `TPGroup`, in one of three ways:
- this process is a rank the engine spawned (worker_main set the group up before building the engine);
- this process is one of an externally launched group (torchrun: RANK / WORLD_SIZE / LOCAL_RANK /
  MASTER_ADDR / MASTER_PORT; srun: SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID with MASTER_ADDR /
  MASTER_PORT set) whose size is tensor_parallel_size;
- otherwise this process is rank 0 and starts ranks 1..N-1 (`python -m batchgen.distributed.worker`).

Everything goes through torch.distributed: NCCL (CUDA) or gloo (CPU) for the model's collectives, and a
second, gloo group for control (rank 0's step messages, as pickled objects), so that control traffic
never interleaves with a forward's collectives. Both groups have a timeout (BATCHGEN_TP_TIMEOUT seconds,
default 300): a rank that hangs makes its peers fail instead of waiting forever. Rank 0 watches the ranks
it spawned and names a dead one in the error; while rank 0 is idle (between generate calls) a heartbeat
thread keeps the waiting ranks inside their timeout.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger("batchgen")

_CURRENT: TPGroup | None = None  # the process's group; one at a time


class TensorParallelError(RuntimeError):
    """A tensor-parallel rank died, hung past the timeout, or the group could not form."""


def timeout_seconds() -> float:
    value = os.environ.get("BATCHGEN_TP_TIMEOUT", "300")
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"BATCHGEN_TP_TIMEOUT={value!r} is invalid: a number of seconds > 0") from None
    if seconds <= 0:
        raise ValueError(f"BATCHGEN_TP_TIMEOUT={value!r} is invalid: a number of seconds > 0")
    return seconds


@dataclass
class TPGroup:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    external: bool  # launched by torchrun / srun (True) or spawned by rank 0's engine (False)
    timeout: float
    control: object = None  # the gloo group for step messages
    children: dict[int, object] = field(default_factory=dict)  # rank -> process (rank 0 of a spawned group)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _last_send: float = 0.0
    _closed: bool = False
    _failure: BaseException | None = None

    # ---- collectives of the model (default group) -------------------------------------------------

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place; returns x."""
        try:
            dist.all_reduce(x)
        except Exception as e:  # noqa: BLE001 - any backend error means a peer is gone or late
            raise self.failure(e) from e
        return x

    def all_gather_cat(self, x: torch.Tensor) -> torch.Tensor:
        """x [rows, n] on every rank -> [rows, world * n], rank order along dim 1."""
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        try:
            dist.all_gather(parts, x.contiguous())
        except Exception as e:  # noqa: BLE001
            raise self.failure(e) from e
        return torch.cat(parts, dim=1)

    def min_int(self, value: int) -> int:
        """The smallest of every rank's value (e.g. KV blocks that fit): all ranks get the same answer."""
        t = torch.tensor([value], dtype=torch.int64)
        try:
            with self._lock:
                dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        except Exception as e:  # noqa: BLE001
            raise self.failure(e) from e
        return int(t.item())

    # ---- control (gloo group) ---------------------------------------------------------------------

    def send(self, message) -> None:
        """Rank 0: broadcast a plain-data message to every other rank."""
        self.check_children()
        with self._lock:
            if self._failure is not None:
                raise self._failure
            try:
                dist.broadcast_object_list([message], src=0, group=self.control)
            except Exception as e:  # noqa: BLE001
                raise self.failure(e) from e
            self._last_send = time.monotonic()

    def receive(self):
        """Ranks > 0: the next message from rank 0 (pings are skipped)."""
        while True:
            box = [None]
            try:
                dist.broadcast_object_list(box, src=0, group=self.control)
            except Exception as e:  # noqa: BLE001
                raise TensorParallelError(f"tensor-parallel rank {self.rank}: lost rank 0 ({_first_line(e)})") from e
            if box[0] != ("ping",):
                return box[0]

    def _heartbeat(self) -> None:
        """Rank 0: keep the waiting ranks inside their timeout while the engine is idle."""
        period = max(0.5, self.timeout / 4)
        while not self._closed:
            time.sleep(min(period, 1.0))
            if self._closed or time.monotonic() - self._last_send < period:
                continue
            try:
                self.send(("ping",))
            except BaseException:  # noqa: BLE001 - recorded in _failure; the next step raises it
                return

    def start_heartbeat(self) -> None:
        """Rank 0, once the engine is built (before, the ranks run set-up collectives on the control group)."""
        if self.rank == 0 and self.world_size > 1:
            self._last_send = time.monotonic()
            threading.Thread(target=self._heartbeat, name="batchgen-tp-heartbeat", daemon=True).start()

    # ---- failures ---------------------------------------------------------------------------------

    def check_children(self) -> None:
        for rank, proc in self.children.items():
            if proc.poll() is not None:
                raise TensorParallelError(f"tensor-parallel rank {rank} exited (exit code {proc.returncode}); "
                                          "the engine cannot continue")

    def failure(self, error: BaseException) -> TensorParallelError:
        """An error naming the rank(s) at fault, for a collective that failed with `error` (the group is
        unusable from here on: shutdown() kills the spawned ranks rather than asking them to stop)."""
        err = self._diagnose(error)
        self._failure = self._failure or err
        return err

    def _diagnose(self, error: BaseException) -> TensorParallelError:
        if self.children:
            deadline = time.monotonic() + 5  # a killed child is reaped within moments
            while time.monotonic() < deadline:
                dead = {r: p.returncode for r, p in self.children.items() if p.poll() is not None}
                if dead:
                    names = ", ".join(f"rank {r} (exit code {c})" for r, c in sorted(dead.items()))
                    return TensorParallelError(f"tensor-parallel {names} died; the engine cannot continue "
                                               f"({_first_line(error)})")
                time.sleep(0.05)
        others = [r for r in range(self.world_size) if r != self.rank]
        return TensorParallelError(
            f"tensor-parallel rank {self.rank}: a collective with rank(s) {others} failed or passed the "
            f"{self.timeout:.0f}s timeout (BATCHGEN_TP_TIMEOUT): {_first_line(error)}")

    # ---- the end ----------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Rank 0: tell the other ranks to stop, reap the spawned ones, and tear the groups down."""
        global _CURRENT
        if self._closed:
            return
        self._closed = True
        if self.rank == 0 and self._failure is None:
            try:
                with self._lock:
                    dist.broadcast_object_list([("stop",)], src=0, group=self.control)
            except Exception:  # noqa: BLE001 - a dead peer: nothing to stop
                pass
        for proc in self.children.values():
            if self._failure is not None:
                proc.kill()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass
        if _CURRENT is self:
            _CURRENT = None


def current() -> TPGroup | None:
    return _CURRENT


def join_or_start(tensor_parallel_size: int, config, device: torch.device) -> TPGroup:
    """The group for an engine of `tensor_parallel_size` ranks (see the module docstring)."""
    global _CURRENT
    n = tensor_parallel_size
    if _CURRENT is not None:
        if _CURRENT.rank > 0 or _CURRENT.external:  # the group this process was started for
            if _CURRENT.world_size != n:
                raise ValueError(f"tensor_parallel_size={n}, but this process's group has {_CURRENT.world_size} ranks")
            return _CURRENT
        raise RuntimeError("a tensor-parallel engine is already running in this process: call its "
                           "shutdown() before building another")
    env = _external_env(n)
    if env is not None:
        rank, local_rank, addr, port = env
        _CURRENT = _init(rank, n, local_rank, addr, port, device, external=True)
        if rank == 0:
            atexit.register(_CURRENT.shutdown)
        return _CURRENT
    return _spawn(n, config, device)


def is_external_worker(tensor_parallel_size: int) -> bool:
    """True in a rank > 0 of an externally launched group: its engine only serves rank 0's steps."""
    env = _external_env(tensor_parallel_size) if tensor_parallel_size > 1 else None
    return env is not None and env[0] > 0


def _external_env(n: int) -> tuple[int, int, str, int] | None:
    """(rank, local rank, master address, port) of a torchrun / srun launch of n ranks, or None."""
    e = os.environ
    if "RANK" in e and "WORLD_SIZE" in e and "MASTER_ADDR" in e:
        rank, world, local = int(e["RANK"]), int(e["WORLD_SIZE"]), int(e.get("LOCAL_RANK", e["RANK"]))
    elif "SLURM_PROCID" in e and "MASTER_ADDR" in e and int(e.get("SLURM_NTASKS", "1")) > 1:
        rank, world, local = int(e["SLURM_PROCID"]), int(e["SLURM_NTASKS"]), int(e.get("SLURM_LOCALID", "0"))
    else:
        return None
    if world != n:
        raise ValueError(f"tensor_parallel_size={n}, but the launcher started {world} processes "
                         "(WORLD_SIZE / SLURM_NTASKS): one process per tensor-parallel rank")
    return rank, local, e["MASTER_ADDR"], int(e.get("MASTER_PORT", "29500"))


def _init(rank: int, world: int, local_rank: int, addr: str, port: int, device: torch.device,
          external: bool, store=None) -> TPGroup:
    timeout = timeout_seconds()
    if device.type == "cuda":
        device = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    else:  # the cores are shared by the ranks
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        where = dict(store=store) if store is not None else dict(init_method=f"tcp://{addr}:{port}")
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout), **where)
        control = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
    except Exception as e:  # noqa: BLE001
        raise TensorParallelError(f"tensor-parallel rank {rank} of {world}: the process group at {addr}:{port} "
                                  f"did not form within {timeout:.0f}s: {_first_line(e)}") from e
    return TPGroup(rank, world, local_rank, device, external, timeout, control)


def _spawn(n: int, config, device: torch.device) -> TPGroup:
    """Start ranks 1..n-1 as `python -m batchgen.distributed.worker` (a fresh interpreter: the caller's
    script is not re-imported, so it needs no `if __name__ == "__main__"` guard) and form the group."""
    global _CURRENT
    timeout = timeout_seconds()
    with socket.socket() as s:  # a free port for this engine's group (several engines per node: data parallel)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, n, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=timeout))
    children: dict[int, subprocess.Popen] = {}
    try:
        for rank in range(1, n):
            # The parent's import path, so the rank imports the same batchgen however the parent found it.
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
            proc = subprocess.Popen([sys.executable, "-m", "batchgen.distributed.worker"], stdin=subprocess.PIPE,
                                    env=env)
            pickle.dump(dict(rank=rank, world=n, port=port, config=config, device=device.type, parent=os.getpid()),
                        proc.stdin)
            proc.stdin.close()
            children[rank] = proc
        deadline = time.monotonic() + timeout
        while not all(store.check([f"joined/{r}"]) for r in children):  # watch them while they start
            for rank, proc in children.items():
                if proc.poll() is not None:
                    raise TensorParallelError(f"tensor-parallel rank {rank} exited with code {proc.returncode} "
                                              "before the group formed (its error is above)")
            if time.monotonic() > deadline:
                raise TensorParallelError(f"tensor-parallel ranks did not start within {timeout:.0f}s "
                                          "(BATCHGEN_TP_TIMEOUT)")
            time.sleep(0.05)
        group = _init(0, n, 0, "127.0.0.1", port, device, external=False, store=store)
    except BaseException:
        for proc in children.values():
            proc.kill()
            proc.wait()
        raise
    group.children = children
    atexit.register(group.shutdown)
    _CURRENT = group
    logger.info("tensor parallel: %d ranks (%s), spawned ranks 1..%d", n, dist.get_backend(), n - 1)
    return group


def worker_group(rank: int, world: int, port: int, device_type: str, parent: int) -> TPGroup:
    """In a spawned rank: die with the parent, leave signals to it, and join its group."""
    global _CURRENT
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 decides when to stop (and says so)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timedelta(seconds=timeout_seconds()))
    store.set(f"joined/{rank}", "1")
    _CURRENT = _init(rank, world, rank, "127.0.0.1", port, torch.device(device_type), external=False, store=store)
    return _CURRENT


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
