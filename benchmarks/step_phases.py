"""Where a step's time goes, by phase: the runner's input preparation, the model's forward, the LM
head, the sampler, and the engine around them; decode-only and prefill steps apart. batchgen alone,
on one workload of benchmarks/workloads.py, after a warm-up generate.

    python -m benchmarks.step_phases [W1|W2|W3|W3s] [--layers]

`--layers` runs decode steps layer by layer in Python even where the C++ decode stack would take
them (kernels/cpu_decoder.py), to see what the stack saves.
"""

from __future__ import annotations

import collections
import sys
import time

from batchgen import LLM, SamplingParams
from batchgen.models.loader import resolve_model
from benchmarks import workloads

WORKLOADS = {"W1": lambda: workloads.w1_fixed(64), "W2": lambda: workloads.w2_variable(64),
             "W3": lambda: workloads.w3_shared_prefix(64), "W3s": lambda: workloads.w3s_short_outputs(192)}


def main(name: str, layers: bool) -> None:
    wl = WORKLOADS[name]()
    llm = LLM(resolve_model("smollm2-135m"), dtype="bfloat16", **wl.engine)
    runner, model = llm.engine.runner, llm.engine.runner.model
    if layers:
        model.cpu_decoder = None
    seconds: dict[tuple[str, str], float] = collections.defaultdict(float)
    steps: collections.Counter = collections.Counter()
    kind = [None]  # "decode" / "prefill" while a step runs

    def timed(obj, attr: str, label: str) -> None:
        inner = getattr(obj, attr)

        def wrapper(*args, **kwargs):
            if kind[0] is None:
                return inner(*args, **kwargs)
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            seconds[(kind[0], label)] += time.perf_counter() - start
            return out

        setattr(obj, attr, wrapper)

    timed(runner, "prepare", "prepare")
    timed(model, "forward", "forward")
    timed(model, "compute_logits", "LM head")
    timed(type(runner.sampler), "__call__", "sampler")
    execute, step = runner.execute, llm.engine.step

    def timed_execute(sched):
        kind[0] = "decode" if all(r.num_tokens == 1 for r in sched.scheduled) else "prefill"
        start = time.perf_counter()
        try:
            return execute(sched)
        finally:
            seconds[(kind[0], "runner")] += time.perf_counter() - start
            steps[kind[0]] += 1
            kind[0] = None

    def timed_step(*args, **kwargs):
        start = time.perf_counter()
        try:
            return step(*args, **kwargs)
        finally:
            seconds[("all", "engine step")] += time.perf_counter() - start

    runner.execute, llm.engine.step = timed_execute, timed_step
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in wl.max_tokens]
    llm.generate([[7] * 40], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)  # warm-up
    seconds.clear()
    steps.clear()
    start = time.perf_counter()
    llm.generate(wl.prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    print(f"{name}{' (layer by layer)' if layers else ''}: {wall:.2f} s, {wl.output_tokens / wall:.1f} out tok/s; "
          f"engine steps {seconds[('all', 'engine step')]:.2f} s")
    for k in ("decode", "prefill"):
        if not steps[k]:
            continue
        print(f"{k} steps: {steps[k]}")
        for label in ("runner", "prepare", "forward", "LM head", "sampler"):
            total = seconds[(k, label)]
            print(f"  {label:8s} {total:7.3f} s  {1e3 * total / steps[k]:7.2f} ms a step")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    main(args[0] if args else "W3", "--layers" in sys.argv)
