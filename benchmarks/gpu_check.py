"""`make gpu-check`: everything that needs a GPU, in one run that fits in ~8 minutes on an H100/H200.

    python -m benchmarks.gpu_check [--doc docs/PERFORMANCE.md]

Steps (each in its own process with a time limit, so one hang costs only its own budget):
  1. the CUDA-only tests (the kernel tests compile and run their CUDA parameters; CUDA-graph tests);
  2. greedy parity against HF transformers in bf16 on the GPU (embedded SmolLM2-135M);
  3. CUDA-graph capture and replay against eager decoding (same tokens, step times);
  4. each Triton kernel's achieved bandwidth against the device's measured copy bandwidth;
  5. decode at batch 1 (MBU: bytes a step must read / step time / HBM bandwidth) and at a full batch,
     on a random-weights ~0.6B Llama config and on the embedded model.
It writes the figures, with the device name, into the marked gpu-check section of docs/PERFORMANCE.md
(replacing the previous one). Without CUDA it prints what it would run and exits 0, claiming nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

BEGIN, END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"
ROOT = Path(__file__).resolve().parents[1]
# A ~0.6B Llama-shaped config (random weights): big enough that decode at batch 1 is HBM-bound.
BIG_CONFIG = dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=20, num_attention_heads=12,
                  num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False)

STEPS = [  # (name, seconds allowed, what it runs)
    ("cuda-tests", 180, "pytest -q tests/kernels tests/test_model_parity.py -k 'cuda or gpu or graph'"),
    ("hf-parity-bf16", 60, "embedded model, 8 chat prompts x 24 tokens, batchgen vs HF generate, bf16 on CUDA"),
    ("cuda-graphs", 60, "64 rows x 32 tokens with CUDA graphs vs enforce_eager: tokens equal, decode step ms"),
    ("kernel-bandwidth", 60, "paged_attention (decode, split-K), store_kv, rms_norm, rotary: GB/s vs copy GB/s"),
    ("decode-bench", 120, "decode at batch 1 (MBU) and at batch 256: ~0.6B random Llama and SmolLM2-135M"),
]


def plan() -> str:
    return "\n".join(f"  {i + 1}. {name} (<= {limit}s): {what}" for i, (name, limit, what) in enumerate(STEPS))


# ---- the steps (each runs in a child process: python -m benchmarks.gpu_check --step NAME) -----------------

def _copy_bandwidth() -> float:
    """Device-to-device copy bandwidth, bytes/s (read + write counted): the practical HBM peak."""
    import torch

    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 10 / (time.perf_counter() - t)


def _timed(fn, n: int = 20) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


def _free(llm) -> None:
    """Hand an engine's GPU memory back before the next one sizes its KV pool."""
    import gc

    import torch

    del llm.engine
    gc.collect()
    torch.cuda.empty_cache()


def step_hf_parity() -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from batchgen import LLM, SamplingParams
    from batchgen.models.loader import resolve_model

    model_dir = resolve_model("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(model_dir)
    questions = ["What is the capital of France?", "Name three primary colours.", "What is 12 times 7?",
                 "Who wrote Hamlet?", "Translate 'good morning' to Spanish.", "What is photosynthesis?",
                 "Give a synonym for happy.", "How many legs does a spider have?"]
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                  tokenize=False), add_special_tokens=False) for q in questions]
    llm = LLM(model_dir, dtype="bfloat16", device="cuda", kv_cache_memory=4)
    ours = [o.outputs[0].token_ids for o in llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    hf.generation_config.eos_token_id = None
    theirs = []
    for p in prompts:
        ids = torch.tensor([p], device="cuda")
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                              pad_token_id=0)
        theirs.append(out[0, len(p):].tolist())
    same = sum(a == b for a, b in zip(ours, theirs))
    first = [next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(ours, theirs)]
    return dict(rows_identical=same, rows=len(prompts),
                first_divergence=[k for k in first if k is not None],
                note="bf16 rounding may split near-ties late in a row; early divergence would be a bug")


def step_cuda_graphs() -> dict:
    from batchgen import LLM, SamplingParams
    from batchgen.models.loader import resolve_model
    from benchmarks.peers import _time_full_decode_steps

    model_dir = resolve_model("smollm2-135m")
    prompts = [[100 + (7 * i + j) % 3000 for j in range(40 + i % 8)] for i in range(64)]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    result = {}
    for name, eager in (("graphs", False), ("eager", True)):
        llm = LLM(model_dir, dtype="bfloat16", device="cuda", enforce_eager=eager, kv_cache_memory=4)
        times = _time_full_decode_steps(llm.engine.runner, len(prompts))
        tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        result[name] = dict(tokens=tokens, step_ms=1e3 * sorted(times)[len(times) // 2] if times else None,
                            captured=llm.engine.runner.graphs is not None)
        _free(llm)
    return dict(tokens_equal=result["graphs"]["tokens"] == result["eager"]["tokens"],
                graphs_captured=result["graphs"]["captured"],
                decode_step_ms_graphs=result["graphs"]["step_ms"], decode_step_ms_eager=result["eager"]["step_ms"])


def step_kernel_bandwidth() -> dict:
    import torch

    from batchgen.kernels.paged_attention import paged_attention
    from batchgen.kernels.rms_norm import rms_norm
    from batchgen.kernels.store_kv import store_kv

    peak = _copy_bandwidth()
    out = dict(copy_gb_s=peak / 1e9)
    dt = torch.bfloat16
    rows, ctx, kvh, heads, d, bs = 64, 2048, 8, 32, 128, 16
    nb = rows * ctx // bs
    kv = torch.randn(2, nb, bs, kvh, d, dtype=dt, device="cuda")
    tables = torch.arange(nb, dtype=torch.int32, device="cuda").view(rows, -1)
    q = torch.randn(rows, heads, d, dtype=dt, device="cuda")
    cu = torch.arange(rows + 1, dtype=torch.int32, device="cuda")
    lens = torch.full((rows,), ctx, dtype=torch.int32, device="cuda")
    t = _timed(lambda: paged_attention(q, kv, cu, lens, tables, 0.088, max_q_len=1, max_context_len=ctx))
    out["paged_attention_decode_gb_s"] = kv.numel() * 2 / t / 1e9
    tokens = 8192
    k = torch.randn(tokens, kvh, d, dtype=dt, device="cuda")
    slots = torch.randperm(nb * bs, device="cuda")[:tokens]
    t = _timed(lambda: store_kv(k, k, kv, slots))
    out["store_kv_gb_s"] = 4 * k.numel() * 2 / t / 1e9  # K and V, read and written
    x = torch.randn(tokens, 4096, dtype=dt, device="cuda")
    w = torch.ones(4096, dtype=dt, device="cuda")
    t = _timed(lambda: rms_norm(x, w, 1e-6))
    out["rms_norm_gb_s"] = 2 * x.numel() * 2 / t / 1e9
    from batchgen.kernels.rotary import rotary_embedding

    qr = torch.randn(tokens, heads, d, dtype=dt, device="cuda")
    kr = torch.randn(tokens, kvh, d, dtype=dt, device="cuda")
    pos = torch.arange(tokens, device="cuda")
    cos = torch.randn(tokens, d, dtype=dt, device="cuda")
    t = _timed(lambda: rotary_embedding(qr, kr, cos, cos, pos))
    out["rotary_gb_s"] = 2 * (qr.numel() + kr.numel()) * 2 / t / 1e9
    for key in [k for k in out if k.endswith("_gb_s") and k != "copy_gb_s" and isinstance(out[k], float)]:
        out[key.replace("_gb_s", "_of_copy")] = out[key] / out["copy_gb_s"]
    return out


def _decode(model_dir: str, batch: int, prompt_len: int = 128, new: int = 64) -> dict:
    from batchgen import LLM, SamplingParams
    from benchmarks.peers import _time_full_decode_steps

    llm = LLM(model_dir, dtype="bfloat16", device="cuda", max_num_seqs=max(batch, 1), kv_cache_memory=16)
    prompts = [[100 + (13 * i + j) % 20000 for j in range(prompt_len)] for i in range(batch)]
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    times = _time_full_decode_steps(llm.engine.runner, batch)
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=new, ignore_eos=True), use_tqdm=False)
    step = sorted(times)[len(times) // 2]
    model = llm.engine.model
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_bytes = sum(c.numel() * c.element_size() for c in llm.engine.kv_caches)
    per_token_kv = kv_bytes / max(1, llm.engine.kv_caches[0].shape[1] * llm.engine.kv_caches[0].shape[2])
    read = weight_bytes + batch * (prompt_len + new // 2) * per_token_kv  # bytes one decode step must read
    _free(llm)
    return dict(batch=batch, step_ms=step * 1e3, tok_s=batch / step, bytes_per_step=read)


def step_decode_bench() -> dict:
    import tempfile

    import torch
    import transformers

    from batchgen.models.loader import resolve_model

    peak = _copy_bandwidth()
    out = dict(copy_gb_s=peak / 1e9)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        config = transformers.LlamaConfig(**BIG_CONFIG)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(tmp)
        transformers.AutoTokenizer.from_pretrained(resolve_model("smollm2-135m")).save_pretrained(tmp)
        params = sum(p.numel() for p in model.parameters())
        del model
        for name, path in (("llama-%.2fB-random" % (params / 1e9), tmp), ("smollm2-135m", resolve_model("smollm2-135m"))):
            for batch in (1, 256):
                r = _decode(path, batch)
                r["mbu"] = r["bytes_per_step"] / (r["step_ms"] / 1e3) / peak
                out[f"{name} batch {batch}"] = r
    return out


STEP_FUNCTIONS = {"hf-parity-bf16": step_hf_parity, "cuda-graphs": step_cuda_graphs,
                  "kernel-bandwidth": step_kernel_bandwidth, "decode-bench": step_decode_bench}


# ---- the driver ----------------------------------------------------------------------------------

def _run_step(name: str, limit: int) -> dict:
    t = time.perf_counter()
    if name == "cuda-tests":
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels",
               "tests/test_model_parity.py", "-k", "cuda or gpu or graph"]
    else:
        cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--step", name]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return dict(ok=False, error=f"timed out after {limit}s")
    took = time.perf_counter() - t
    if name == "cuda-tests":
        tail = proc.stdout.strip().splitlines()[-1:] or [""]
        return dict(ok=proc.returncode == 0, summary=tail[0], seconds=took)
    if proc.returncode != 0:
        return dict(ok=False, error=proc.stderr.strip()[-600:], seconds=took)
    return dict(ok=True, seconds=took, **json.loads(proc.stdout.strip().splitlines()[-1]))


def _section(device: str, results: dict) -> str:
    lines = [BEGIN, "## GPU check (`make gpu-check`)", "",
             f"Device: {device}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Written by "
             "benchmarks/gpu_check.py (this section is replaced on every run).", ""]
    for name, r in results.items():
        lines.append(f"### {name}: {'ok' if r.get('ok') else 'FAILED'}")
        lines.append("")
        lines.append("```")
        lines.append(json.dumps({k: v for k, v in r.items() if k != "tokens"}, indent=1, default=str)[:4000])
        lines.append("```")
        lines.append("")
    lines.append(END)
    return "\n".join(lines) + "\n"


def write_section(doc: Path, section: str) -> None:
    text = doc.read_text() if doc.exists() else ""
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    doc.write_text(text)


def main(argv: list[str]) -> int:
    if "--step" in argv:
        print(json.dumps(STEP_FUNCTIONS[argv[argv.index("--step") + 1]](), default=str))
        return 0
    import torch

    doc = Path(argv[argv.index("--doc") + 1]) if "--doc" in argv else ROOT / "docs" / "PERFORMANCE.md"
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; nothing measured, no figure written. On a GPU it would run:")
        print(plan())
        return 0
    device = torch.cuda.get_device_name(0)
    print(f"gpu-check on {device}:\n{plan()}", flush=True)
    results = {}
    for name, limit, _ in STEPS:
        results[name] = _run_step(name, limit)
        print(f"{name}: {'ok' if results[name].get('ok') else 'FAILED'} "
              f"{json.dumps(results[name], default=str)[:300]}", flush=True)
    write_section(doc, _section(device, results))
    print(f"wrote the gpu-check section of {doc}")
    return 0 if all(r.get("ok") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
