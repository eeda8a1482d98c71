"""Runs in vLLM's own venv (benchmarks/vllm_peer.py starts it): imports nothing from batchgen.

    python vllm_worker.py spec.json result.json   # spec: {"model", "dtype", "prompts", "max_tokens", "max_num_seqs"}
Writes result.json: wall seconds of LLM.generate and the tokens generated (vLLM logs to stdout).
"""

import json
import sys
import time

from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt


def main(path: str, result: str) -> None:
    spec = json.loads(open(path).read())
    longest = max(len(p) + m for p, m in zip(spec["prompts"], spec["max_tokens"]))
    llm = LLM(model=spec["model"], dtype=spec["dtype"], enable_prefix_caching=True, seed=0,
              max_model_len=max(512, longest), max_num_seqs=spec.get("max_num_seqs", 256))
    warmup = [TokensPrompt(prompt_token_ids=[7] * 40), TokensPrompt(prompt_token_ids=[9] * 24)]
    llm.generate(warmup, SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in spec["max_tokens"]]
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t
    with open(result, "w") as f:
        json.dump(dict(wall=wall, generated_tokens=sum(len(o.outputs[0].token_ids) for o in outs)), f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
