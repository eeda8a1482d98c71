"""A real Slurm array on a single-node cluster on localhost (Debian's slurm-wlm and munge).

The fixture installs slurm-wlm and munge when they are missing (root and apt-get needed; the test is
skipped, saying why, only where they cannot be installed), starts munged with a generated key and
slurmctld + slurmd in the foreground (no systemd) on free ports with everything under a temporary
directory, and stops all of it at the end, also on failure.

The test submits a 3-task array with `batchgen slurm --submit`, stops one task mid-run with SIGTERM
(as Slurm does on preemption or before a time limit), requeues it, waits for the array, and checks
that `batchgen merge` has every row exactly once and that the requeued task resumed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo", "squeue")
MARK = "BATCHGEN_SLURM_TEST"  # in the daemons' environment, so their leftovers can be found and stopped


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")


def _ensure_slurm() -> None:
    if all(_which(d) for d in DAEMONS):
        return
    if os.geteuid() != 0:
        pytest.skip("Slurm is not installed, and installing it (apt-get install slurm-wlm munge) needs root")
    if not shutil.which("apt-get"):
        pytest.skip("Slurm is not installed, and there is no apt-get to install slurm-wlm and munge with")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "slurm-wlm", "munge"]):
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, check=False)
        except subprocess.TimeoutExpired:
            pytest.skip(f"could not install Slurm: `{' '.join(cmd)}` timed out")
        if proc.returncode != 0:
            pytest.skip(f"could not install Slurm: `{' '.join(cmd)}` exited {proc.returncode}: "
                        f"{(proc.stderr or proc.stdout)[-400:]}")
    missing = [d for d in DAEMONS if not _which(d)]
    if missing:
        pytest.skip(f"slurm-wlm and munge installed, but {', '.join(missing)} not found")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mem_mb() -> int:
    with open("/proc/meminfo") as f:
        total_kb = int(next(line for line in f if line.startswith("MemTotal:")).split()[1])
    return max(1024, total_kb // 1024 - 512)


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf), MARK: str(root)}  # jobs inherit it (sbatch exports all)
        self.procs: list[subprocess.Popen] = []

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run([_which(cmd[0]) or cmd[0], *cmd[1:]], capture_output=True, text=True, env=self.env,
                              timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr}{proc.stdout}\n{self.logs()}")
        return proc

    def start(self) -> None:
        root = self.root
        keydir, rundir, state, spool, logs = (root / n for n in ("munge-key", "munge-run", "state", "spool", "log"))
        for d in (keydir, rundir, state, spool, logs):
            d.mkdir()
        keydir.chmod(0o700)
        key = keydir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        sock = rundir / "munge.socket"
        env = {**os.environ, MARK: str(root)}
        self._spawn(["munged", "-F", "-f", f"--key-file={key}", f"--socket={sock}", f"--pid-file={rundir}/munged.pid",
                     f"--log-file={logs}/munged.log", f"--seed-file={rundir}/munged.seed"], env, logs / "munged.out")
        _wait(lambda: sock.exists(), 15, f"munged did not create its socket\n{self.logs()}")
        self.conf.write_text("\n".join([
            "ClusterName=batchgentest",
            "SlurmctldHost=localhost",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={sock}",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            f"StateSaveLocation={state}",
            f"SlurmdSpoolDir={spool}",
            f"SlurmctldPidFile={root}/slurmctld.pid",
            f"SlurmdPidFile={root}/slurmd.pid",
            f"SlurmctldLogFile={logs}/slurmctld.log",
            f"SlurmdLogFile={logs}/slurmd.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "JobRequeue=1",
            "ReturnToService=2",
            "MpiDefault=none",
            "SchedulerType=sched/backfill",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "KillWait=10",
            "InactiveLimit=0",
            "MinJobAge=600",
            f"NodeName=localhost CPUs={os.cpu_count()} RealMemory={_mem_mb()} State=UNKNOWN",
            "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))
        self._spawn([_which("slurmctld"), "-D", "-i", "-f", str(self.conf)], env, logs / "slurmctld.out")
        self._spawn([_which("slurmd"), "-D", "-N", "localhost", "-f", str(self.conf)], env, logs / "slurmd.out")

        def idle() -> bool:
            proc = self.run("sinfo", "-h", "-N", "-o", "%T", check=False, timeout=10)
            return proc.returncode == 0 and proc.stdout.strip() == "idle"

        _wait(idle, 60, f"the node did not become idle\n{self.logs()}")

    def _spawn(self, cmd: list[str], env: dict, log: Path) -> None:
        cmd = [_which(cmd[0]) or cmd[0], *cmd[1:]]
        with open(log, "wb") as out:
            self.procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env))

    def stop(self) -> None:
        """Cancel the jobs, stop the daemons this fixture started, then whatever they left (by pid)."""
        if self.conf.exists() and self.procs:
            ids = self.run("squeue", "-h", "-o", "%i", check=False, timeout=10).stdout.split()
            if ids:
                self.run("scancel", *ids, check=False, timeout=10)
                _wait(lambda: not self.run("squeue", "-h", check=False, timeout=10).stdout.strip(), 30, None)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in _marked_pids(str(self.root)):  # slurmstepd and job processes spawned by our slurmd
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def logs(self) -> str:
        text = []
        for path in sorted((self.root / "log").glob("*")):
            text.append(f"--- {path.name}\n{path.read_text(errors='replace')[-2000:]}")
        return "\n".join(text)

    def job_state(self, job: str) -> str:
        proc = self.run("scontrol", "show", "job", job, check=False, timeout=10)
        m = re.search(r"JobState=(\w+)", proc.stdout)
        return m.group(1) if m else "UNKNOWN"


def _marked_pids(mark: str) -> list[int]:
    pids = []
    needle = f"{MARK}={mark}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def _wait(cond, timeout: float, message: str | None, interval: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    if message is not None:
        raise AssertionError(f"timed out after {timeout:.0f}s: {message}")
    return False


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    _ensure_slurm()
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def batchgen(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "batchgen", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO, check=False)


def test_array_job_with_a_task_stopped_and_requeued_merges_every_row_once(cluster, tmp_path):
    # 12 rows over 3 tasks: task i takes rows i, i+3, i+6, i+9. Task 1's rows are longer, so that it
    # is still generating when it is signalled after its first commit.
    rows = [{"id": f"r{i:02d}", "prompt": f"Write a short note number {i}:", "max_tokens": 24 if i % 3 == 1 else 6}
            for i in range(12)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "model": {"path": "smollm2-135m", "dtype": "float32"},
        "input": {"path": "rows.jsonl"},
        "output": {"path": "out", "commit_every_rows": 1},
        "sampling": {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True},
        "engine": {"max_model_len": 256, "max_num_seqs": 1, "num_kv_blocks": 64},
    }))
    out = tmp_path / "out"
    env = cluster.env

    submitted = batchgen("slurm", str(job), "--tasks", "3", "--gpus-per-task", "0", "--cpus-per-task", "1",
                         "--mem", "1500M", "--time", "15", "--grace", "30", "--submit", env=env)
    assert submitted.returncode == 0, submitted.stderr
    array = submitted.stdout.strip()
    assert re.fullmatch(r"\d+", array), submitted.stdout
    script = (out / "_batchgen" / "job.sbatch").read_text()
    assert "#SBATCH --array=0-2" in script and "#SBATCH --requeue" in script and "--signal=B:TERM@30" in script
    task1 = f"{array}_1"
    log1 = out / "_batchgen" / "logs" / "task-1.log"

    def committed(task: int) -> int:
        return len(list((out / f"task-{task:05d}" / "_batchgen" / "commits").glob("*.json")))

    def check_alive() -> None:
        for i in range(3):
            state = cluster.job_state(f"{array}_{i}")
            if state in ("FAILED", "CANCELLED", "NODE_FAIL", "OUT_OF_MEMORY", "TIMEOUT"):
                log = out / "_batchgen" / "logs" / f"task-{i}.log"
                raise AssertionError(f"task {i} {state}:\n{log.read_text() if log.exists() else '(no log)'}\n"
                                     f"{cluster.logs()}")

    def first_commit() -> bool:
        check_alive()
        return committed(1) >= 1

    _wait(first_commit, 240, f"task 1 committed nothing\n{log1.read_text() if log1.exists() else ''}", interval=0.1)
    # SIGTERM to the batch step, where `exec` made batchgen the process: it commits and exits 143.
    cluster.run("scancel", "--batch", "--signal=TERM", task1)
    _wait(lambda: cluster.job_state(task1) not in ("RUNNING", "COMPLETING"), 60, f"task 1 did not stop\n{log1.read_text()}")
    stopped = json.loads((out / "task-00001" / "_batchgen" / "stats.json").read_text())
    assert stopped["interrupted"] == "SIGTERM", log1.read_text()
    first_rows = stopped["job"]["rows_done"]
    assert 0 < first_rows < 4 and not stopped["job"]["complete"]

    refused = batchgen("merge", str(out), "--to", str(tmp_path / "early.parquet"), env=env)
    assert refused.returncode == 1 and f"task 1 ({first_rows}/4 rows)" in refused.stderr, refused.stderr

    # Requeue it (as after a preemption). A requeued job waits for its old credential to expire (~2
    # minutes) unless told to start now; "now" must be a second later than its end (credentials are
    # revoked up to the second the job ended), hence the pause.
    time.sleep(2)
    cluster.run("scontrol", "requeue", task1)
    _wait(lambda: cluster.job_state(task1) == "PENDING", 30, "task 1 was not requeued")
    cluster.run("scontrol", "update", f"JobId={task1}", "StartTime=now")

    def all_done() -> bool:
        states = [cluster.job_state(f"{array}_{i}") for i in range(3)]
        if any(s in ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY") for s in states):
            raise AssertionError(f"states {states}\n{log1.read_text()}\n{cluster.logs()}")
        return states == ["COMPLETED"] * 3

    _wait(all_done, 300, "the array did not finish", interval=0.5)

    status = batchgen("status", str(out), "--json", env=env)
    st = json.loads(status.stdout)
    assert st["complete"] and st["rows_done"] == 12 and [t["complete"] for t in st["tasks"]] == [True] * 3
    resumed = json.loads((out / "task-00001" / "_batchgen" / "stats.json").read_text())
    assert resumed["interrupted"] is None and resumed["run"]["rows"] == 4 - first_rows  # resumed, not redone
    log = log1.read_text()
    assert f"task 1 of 3 (job {task1}, restart 0)" in log and f"task 1 of 3 (job {task1}, restart 1)" in log
    assert "stopped by SIGTERM" in log and "resuming" in log

    merged = tmp_path / "merged.parquet"
    result = batchgen("merge", str(out), "--to", str(merged), env=env)
    assert result.returncode == 0, result.stderr
    table = pq.read_table(merged)
    assert table["id"].to_pylist() == [r["id"] for r in rows]  # every row exactly once, in input order
    assert table["error"].null_count == 12
    lengths = table["num_generated_tokens"].to_pylist()
    assert lengths == [r["max_tokens"] for r in rows]


def test_tensor_parallel_job_under_srun_two_tasks_matches_one_rank(cluster, tmp_path, smol_dir):
    """`srun --ntasks 2` launches both ranks of a TP=2 gloo engine (SLURM_PROCID / SLURM_NTASKS with
    MASTER_ADDR / MASTER_PORT, as the README says): rank 0 runs the job, rank 1 serves its engine, and the
    rows equal a one-rank run's."""
    from transformers import AutoTokenizer, LlamaConfig

    from tests.conftest import TINY, save_random_model

    model_dir = save_random_model(LlamaConfig(**{**TINY, "vocab_size": 49152, "tie_word_embeddings": True}),
                                  AutoTokenizer.from_pretrained(smol_dir), tmp_path / "model")
    rows = [{"id": f"r{i}", "prompt": f"Item {i}: the"} for i in range(6)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def job(name: str, tp: int) -> str:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "model": {"path": model_dir, "dtype": "float32"},
            "input": {"path": "rows.jsonl"},
            "output": {"path": name},
            "sampling": {"max_tokens": 6, "temperature": 0.0, "ignore_eos": True},
            "engine": {"device": "cpu", "max_model_len": 128, "num_kv_blocks": 32, "tensor_parallel_size": tp},
        }))
        return str(path)

    cluster.run("srun", "--ntasks=2", "--cpus-per-task=1", "--mem=4000M", "--time=10", f"--chdir={REPO}",
                f"--export=ALL,MASTER_ADDR=127.0.0.1,MASTER_PORT={_free_port()}",
                sys.executable, "-m", "batchgen", "run", "-q", job("tp2", 2), timeout=300)
    reference = batchgen("run", "-q", job("tp1", 1), env=cluster.env, timeout=300)
    assert reference.returncode == 0, reference.stderr

    def texts(out: str) -> list[tuple[str, str]]:
        import pyarrow.dataset as pads

        table = pads.dataset(str(tmp_path / out)).to_table()  # the committed part files (_batchgen/ is skipped)
        return sorted(zip(table["id"].to_pylist(), table["generated_text"].to_pylist()))

    got = texts("tp2")
    assert [i for i, _ in got] == [r["id"] for r in rows]  # every row once
    assert got == texts("tp1") and all(t for _, t in got)
