"""Micro-benchmark of the logits processors: apply() alone and the whole greedy sampler call, the
dense implementation of an older commit against the current one, in one process, alternating, a
decode step per call (every row gains one token), median after 2 warm-up steps.

    python -m benchmarks.penalties_micro [REV]   (REV: the dense commit, d8bbcbd by default)
"""
import random, statistics, subprocess, sys, tempfile, time
from pathlib import Path

import torch

REV = sys.argv[1] if len(sys.argv) > 1 else "d8bbcbd"
old_dir = Path(tempfile.mkdtemp())
for name in ("penalties", "sampler"):
    code = subprocess.run(["git", "show", f"{REV}:batchgen/exec/{name}.py"], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).parent).stdout
    (old_dir / f"old_{name}.py").write_text(code.replace("from batchgen.exec.penalties import", "from old_penalties import"))
sys.path.insert(0, str(old_dir))
import old_penalties, old_sampler  # noqa: E402
from batchgen.exec import penalties, sampler  # noqa: E402
from batchgen.sampling import SamplingParams  # noqa: E402
from batchgen.sched.output import ScheduledRequest  # noqa: E402

V = 49152
P = SamplingParams(temperature=0, repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.5)
for R in (64, 256):
    rng = random.Random(0)
    toks = [[rng.randrange(100, 40000) for _ in range(200)] + [rng.randrange(100, 2000) for _ in range(100)] for _ in range(R)]
    def rows():
        return [ScheduledRequest(f"r{i}", t[-1:], len(t) - 1, [], True, P, None, len(t) - 200, all_token_ids=t)
                for i, t in enumerate(toks)]
    old_p, new_p = old_penalties.LogitsProcessors(torch.device("cpu")), penalties.LogitsProcessors(torch.device("cpu"))
    old_s, new_s = old_sampler.Sampler(0, torch.device("cpu")), sampler.Sampler(0, torch.device("cpu"))
    t = {k: [] for k in ("apply old", "apply new", "sampler old", "sampler new")}
    for it in range(9):
        for x in toks:
            x.append(rng.randrange(100, 2000))
        rs = rows()
        lf = torch.randn(R, V)
        lb = lf.bfloat16()
        for name, fn in (("apply old", lambda a: old_p.apply(a, rs)), ("apply new", lambda a: new_p.apply(a, rs))):
            a = lf.clone(); t0 = time.perf_counter(); out = fn(a); t[name].append(time.perf_counter() - t0)
            if name == "apply old": ref = out.clone()
            else: assert torch.equal(out, ref)
        for name, s in (("sampler old", old_s), ("sampler new", new_s)):
            a = lb.clone(); t0 = time.perf_counter(); tok, _ = s(a, rs); t[name].append(time.perf_counter() - t0)
            if name == "sampler old": ref_tok = tok
            else: assert tok == ref_tok
    med = {k: statistics.median(v[2:]) * 1e3 for k, v in t.items()}  # the first two: registration, warm-up
    print(f"[{R}, {V}], ~{len(toks[0])} tokens of history: " + ", ".join(f"{k} {v:.2f} ms" for k, v in med.items()), flush=True)
