"""One run per output directory: a live lease refuses a second run before its model loads, a stale
one (dead pid on this host, or an old heartbeat) is taken over, on local paths and on memory://."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import fsspec
import pytest

from batchgen.job.lease import LEASE_FILE, Lease, OutputBusy, is_stale
from batchgen.job.outdir import JobConflict, JobOutput
from batchgen.job.outputs import read_output
from batchgen.job.runner import run_job
from tests.job.conftest import REPO, SMALL_ENGINE, run_cli, write_job, write_jsonl


@pytest.fixture
def memory_dir():
    root = f"memory://lease-{uuid.uuid4().hex[:8]}"
    yield root
    with contextlib.suppress(FileNotFoundError):
        fsspec.filesystem("memory").rm(root.removeprefix("memory://"), recursive=True)


def put_lease(url: str, **fields) -> None:
    """Write a lease as another run would have left it."""
    fs, root = fsspec.core.url_to_fs(url)
    fs.makedirs(f"{root}/_batchgen", exist_ok=True)
    now = time.time()
    lease = {"version": 1, "host": socket.gethostname(), "pid": os.getpid(), "started": now, "heartbeat": now,
             "timeout_s": 120.0, "token": "other", **fields}
    fs.pipe(f"{root}/_batchgen/{LEASE_FILE}", json.dumps(lease).encode())


def lease_of(url: str) -> Lease:
    out = JobOutput(url).root
    return Lease(out.fs, out.meta, url)


def memory_job(root: str, model: str = "smollm2-135m") -> dict:
    fsspec.filesystem("memory").pipe(f"{root.removeprefix('memory://')}/in/rows.jsonl",
                                     b"".join(json.dumps({"id": f"r{i}", "prompt": f"Item {i}:"}).encode() + b"\n"
                                              for i in range(4)))
    return {"model": {"path": model, "dtype": "float32"}, "input": {"path": f"{root}/in/rows.jsonl"},
            "output": {"path": f"{root}/out"}, "sampling": {"max_tokens": 2, "temperature": 0.0},
            "engine": dict(SMALL_ENGINE)}


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---- the lease on its own -----------------------------------------------------------------------

@pytest.mark.parametrize("store,rounds", [("file", 30), ("memory", 2)])
def test_only_one_of_racing_runs_takes_a_lease(store, rounds, tmp_path, memory_dir):
    """8 runs race for one lease, `rounds` times (a lost race shows in a few rounds of 30: a lease
    created empty and then written was once read half-made, taken for stale and removed)."""
    for r in range(rounds):
        url = str(tmp_path / f"out{r}") if store == "file" else f"{memory_dir}/out{r}"
        leases = [lease_of(url) for _ in range(8)]
        barrier = threading.Barrier(len(leases))
        outcome: dict[int, str] = {}

        def take(i: int, leases=leases, barrier=barrier, outcome=outcome) -> None:
            barrier.wait()
            try:
                leases[i].acquire()
                outcome[i] = "won"
            except OutputBusy as e:
                outcome[i] = str(e)

        threads = [threading.Thread(target=take, args=(i,)) for i in range(len(leases))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [i for i, o in outcome.items() if o == "won"]
        assert len(winners) == 1, (r, outcome)
        assert all(f"pid {os.getpid()}" in o for i, o in outcome.items() if i != winners[0])
        leases[winners[0]].release()
        assert lease_of(url).holder() is None  # given back: the next run takes it at once
    lease_of(url).acquire()


def test_a_lease_is_stale_when_its_pid_is_dead_or_its_heartbeat_old():
    now = time.time()
    here = socket.gethostname()
    assert not is_stale({"host": here, "pid": os.getpid(), "heartbeat": now, "timeout_s": 60})
    assert is_stale({"host": here, "pid": dead_pid(), "heartbeat": now, "timeout_s": 60})
    # Another host's pid means nothing here: only its heartbeat tells.
    assert not is_stale({"host": "elsewhere", "pid": dead_pid(), "heartbeat": now - 30, "timeout_s": 60})
    assert is_stale({"host": "elsewhere", "pid": 1, "heartbeat": now - 61, "timeout_s": 60})
    assert is_stale({"host": here, "pid": os.getpid(), "heartbeat": now - 61, "timeout_s": 60})


def test_the_heartbeat_keeps_a_lease_fresh_and_a_holder_notices_a_takeover(memory_dir):
    url = f"{memory_dir}/out"
    holder = Lease(*_meta(url), url, timeout_s=2.0)  # beats every 0.5 s
    holder.acquire()
    first = holder.holder()["heartbeat"]
    deadline = time.monotonic() + 10
    while holder.holder()["heartbeat"] == first and time.monotonic() < deadline:
        time.sleep(0.05)
    assert holder.holder()["heartbeat"] > first
    put_lease(url, token="thief")  # another run took it over (as after a long suspension)
    while not holder.lost and time.monotonic() < deadline:
        time.sleep(0.05)
    assert holder.lost
    with pytest.raises(OutputBusy, match="lost its output lease"):
        holder.check()
    holder.release()
    assert lease_of(url).holder()["token"] == "thief"  # not removed by the run that lost it


def _meta(url: str):
    out = JobOutput(url).root
    return out.fs, out.meta


# ---- run_job in-process on memory:// --------------------------------------------------------------

def test_a_live_lease_refuses_a_run_before_its_model_loads_even_with_force(memory_dir):
    spec = memory_job(memory_dir, model="/nonexistent/model")  # loading it would fail: the lease is first
    put_lease(f"{memory_dir}/out", host="node-7", pid=4242)  # another host's run, heartbeat fresh
    for force in (False, True):
        with pytest.raises(JobConflict, match=r"in use by another batchgen run \(host node-7, pid 4242, started"):
            run_job(spec, quiet=True, force=force)
    assert lease_of(f"{memory_dir}/out").holder()["token"] == "other"  # --force did not break it


@pytest.mark.slow  # the embedded model
def test_a_stale_lease_on_memory_is_taken_over_and_given_back(memory_dir, engine):
    spec = memory_job(memory_dir)
    put_lease(f"{memory_dir}/out", host="node-7", pid=4242, heartbeat=time.time() - 600)  # a lost node
    result = run_job(spec, quiet=True, engine=engine)
    assert result.complete and result.stats["run"]["rows"] == 4
    assert lease_of(f"{memory_dir}/out").holder() is None
    assert sorted(read_output([f"{memory_dir}/out"])[0]["id"].to_pylist()) == [f"r{i}" for i in range(4)]


def test_an_array_task_leases_its_own_directory(memory_dir):
    spec = memory_job(memory_dir, model="/nonexistent/model")
    put_lease(f"{memory_dir}/out/task-00001", host="node-7")
    with pytest.raises(JobConflict, match="task-00001 is in use"):
        run_job(spec, quiet=True, task_index=1, num_tasks=2)
    # A single run over that OUT would have to clear the array's task directories: not while one is held.
    fsspec.filesystem("memory").pipe(f"{memory_dir.removeprefix('memory://')}/out/_batchgen/array.json",
                                     json.dumps({"version": 1, "num_tasks": 2, "fingerprint": {}}).encode())
    with pytest.raises(JobConflict, match="task-00001 is in use by another batchgen run"):
        run_job(spec, quiet=True, force=True)


# ---- the real CLI on a local path -----------------------------------------------------------------

@pytest.mark.slow  # a tiny model, four CLI runs
def test_second_cli_run_is_refused_and_a_killed_runs_lease_does_not_block_the_rerun(tiny_dir, tmp_path):
    write_jsonl(tmp_path / "rows.jsonl", [{"id": f"r{i}", "prompt": f"Item {i}:"} for i in range(40)])
    job = write_job(tmp_path / "job.yaml", model={"path": tiny_dir, "dtype": "float32"},
                    input={"path": "rows.jsonl"}, output={"path": "out", "commit_every_rows": 1},
                    sampling={"max_tokens": 4, "temperature": 0.0, "ignore_eos": True},
                    engine={"device": "cpu", "max_model_len": 128, "max_num_seqs": 1, "num_kv_blocks": 32})
    out = tmp_path / "out"
    lease_file = out / "_batchgen" / LEASE_FILE

    # The first run is frozen (SIGSTOP) once it has committed: alive, holding its lease.
    first = subprocess.Popen([sys.executable, "-m", "batchgen", "run", "-q", str(job)], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    commits = out / "_batchgen" / "commits"
    deadline = time.monotonic() + 240
    while not list(commits.glob("*.json")) and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.01)
    first.send_signal(signal.SIGSTOP)
    try:
        holder = json.loads(lease_file.read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()

        # While it lives, a second run is refused at once, naming it.
        busy = run_cli("run", "-q", str(job))
        assert busy.returncode == 1, busy.stderr
        assert f"in use by another batchgen run (host {socket.gethostname()}, pid {first.pid}" in busy.stderr
        status = run_cli("status", str(out))
        assert f"running now: host {socket.gethostname()}, pid {first.pid}" in status.stdout, status.stdout
    finally:
        first.kill()  # kill -9 of the holder: no cleanup, its lease stays behind
        first.communicate(timeout=60)
    assert first.returncode == -signal.SIGKILL
    assert json.loads(lease_file.read_text())["pid"] == first.pid
    assert 0 < sum(json.loads(p.read_text())["num_rows"] for p in commits.glob("*.json")) < 40

    # The rerun takes the dead run's lease over and finishes the job: every row exactly once.
    rerun = run_cli("run", "-q", str(job), timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    table, totals = read_output([str(out)])
    assert sorted(table["id"].to_pylist()) == sorted(f"r{i}" for i in range(40))
    assert totals["complete"] and totals["rows"] == 40
    assert not lease_file.exists()  # given back at the end
    assert "running now" not in run_cli("status", str(out)).stdout
