"""Micro-benchmark of the logits processors: apply() alone and the whole greedy sampler call, the
dense implementation of an older commit against the current one, in one process, alternating, a
decode step per call (every row gains one token), median after 2 warm-up steps.

    python -m benchmarks.penalties_micro [REV]   (REV: the dense commit, d8bbcbd by default)
"""

from __future__ import annotations

import importlib
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from batchgen.exec import penalties, sampler
from batchgen.sampling import SamplingParams
from batchgen.sched.output import ScheduledRequest

VOCAB = 49152
PARAMS = SamplingParams(temperature=0, repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.5)


def old_modules(rev: str):
    """The old penalties and sampler modules, from git, importing each other."""
    folder = Path(tempfile.mkdtemp())
    for name in ("penalties", "sampler"):
        code = subprocess.run(["git", "show", f"{rev}:batchgen/exec/{name}.py"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout
        code = code.replace("from batchgen.exec.penalties import", "from old_penalties import")
        (folder / f"old_{name}.py").write_text(code)
    sys.path.insert(0, str(folder))
    return importlib.import_module("old_penalties"), importlib.import_module("old_sampler")


def bench(rows: int, old_p, old_s, steps: int = 9) -> dict[str, float]:
    rng = random.Random(0)
    # ~300 tokens of history a row: 200 prompt tokens, 100 generated (few distinct: repeats)
    toks = [[rng.randrange(100, 40000) for _ in range(200)] + [rng.randrange(100, 2000) for _ in range(100)]
            for _ in range(rows)]
    cpu = torch.device("cpu")
    procs = {"apply old": old_p.LogitsProcessors(cpu), "apply new": penalties.LogitsProcessors(cpu)}
    samplers = {"sampler old": old_s.Sampler(0, cpu), "sampler new": sampler.Sampler(0, cpu)}
    times: dict[str, list[float]] = {k: [] for k in [*procs, *samplers]}
    for _ in range(steps):
        for t in toks:
            t.append(rng.randrange(100, 2000))
        batch = [ScheduledRequest(f"r{i}", t[-1:], len(t) - 1, [], True, PARAMS, None, len(t) - 200, all_token_ids=t)
                 for i, t in enumerate(toks)]
        logits = torch.randn(rows, VOCAB)  # [rows, vocab]
        outs = []
        for name, proc in procs.items():
            x = logits.clone()
            t0 = time.perf_counter()
            outs.append(proc.apply(x, batch))
            times[name].append(time.perf_counter() - t0)
        assert torch.equal(outs[0], outs[1])
        tokens = []
        for name, s in samplers.items():
            x = logits.bfloat16()
            t0 = time.perf_counter()
            tokens.append(s(x, batch)[0])
            times[name].append(time.perf_counter() - t0)
        assert tokens[0] == tokens[1]
    return {k: 1e3 * statistics.median(v[2:]) for k, v in times.items()}  # the first two: registration, warm-up


def main() -> None:
    old_p, old_s = old_modules(sys.argv[1] if len(sys.argv) > 1 else "d8bbcbd")
    for rows in (64, 256):
        ms = bench(rows, old_p, old_s)
        print(f"[{rows}, {VOCAB}], ~300 tokens of history: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()),
              flush=True)


if __name__ == "__main__":
    main()
