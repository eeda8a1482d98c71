"""End-to-end A/B of an older commit against this checkout: batchgen alone on one workload, the two
run in turn, each in its own process and kernel build directory.

    python -m benchmarks.ab REV WORKLOAD [REPS]   (e.g. `python -m benchmarks.ab HEAD~1 W3 3`)

REV is checked out into a worktree under the bench cache (kept for the next call: its kernels are
built once). Each round runs `python -m benchmarks.run --one batchgen WORKLOAD` there, then here,
and the medians' ratio is printed. This 2-core VM's speed drifts 10-35% between sittings (and the
bench's peers with it), so a change of a few percent shows only in runs taken in turn like these.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from batchgen.models.loader import cache_dir

HERE = Path(__file__).resolve().parent.parent  # this checkout


def worktree(rev: str) -> Path:
    """A worktree of `rev` under the bench cache (created once, kept)."""
    commit = subprocess.run(["git", "rev-parse", rev], cwd=HERE, capture_output=True, text=True,
                            check=True).stdout.strip()
    path = cache_dir() / "ab-worktrees" / commit[:12]
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "worktree", "add", "--detach", str(path), commit], cwd=HERE, check=True,
                       capture_output=True)
    return path


def wall(checkout: Path, workload: str, extensions: Path) -> float:
    """Seconds of batchgen's generate on `workload`, run from `checkout` (its batchgen and kernels)."""
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(extensions))
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--one", "batchgen", workload], cwd=checkout,
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"benchmarks.run failed in {checkout}:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["wall"]


def main(rev: str, workload: str, reps: int = 3) -> None:
    old_tree = worktree(rev)
    builds = cache_dir() / "ab-extensions"
    times: dict[str, list[float]] = {"old": [], "new": []}
    for i in range(reps):
        for who, tree in (("old", old_tree), ("new", HERE)):
            times[who].append(wall(tree, workload, builds / (old_tree.name if who == "old" else "current")))
            print(f"round {i + 1}: {who} {times[who][-1]:.2f} s", flush=True)
    old, new = statistics.median(times["old"]), statistics.median(times["new"])
    print(f"{workload}: old ({rev}) median {old:.2f} s, new median {new:.2f} s, old / new {old / new:.3f}x")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:4]))
