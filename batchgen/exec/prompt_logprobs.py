"""prompt_logprobs: the logprob of every prompt token (and its top-k) from a prefill's hidden states.

Position p's logits predict token p + 1, so a chunk at positions [s, s + n) scores prompt tokens
s + 1 .. s + n (those inside the prompt; the next chunk's first token is read off the request's
token list). The LM head runs over the chunk in slices of SLICE positions, so memory is bounded by
[SLICE, vocab] fp32, not by the chunk, let alone the prompt. The first prompt token has no
logprob (None), as in vLLM. Values are the model's raw log-softmax (no temperature, no processors).
"""

from __future__ import annotations

import torch

from batchgen.sched.output import ScheduledRequest

SLICE = 256  # positions per LM-head call


def needs_prompt_logprobs(row: ScheduledRequest) -> bool:
    return row.params.prompt_logprobs is not None and row.all_token_ids is not None and \
        row.start_pos < len(row.all_token_ids) - row.num_output_tokens - 1


def chunk_prompt_logprobs(model, hidden: torch.Tensor, row: ScheduledRequest) -> tuple[int, list[dict[int, float]]]:
    """hidden: [chunk tokens, hidden] of the row's chunk. Returns (index of the first prompt token
    scored, [{token id: logprob} with the actual token and the top-k]) for the prompt tokens it scores."""
    prompt_len = len(row.all_token_ids) - row.num_output_tokens
    s = row.start_pos
    m = min(row.num_tokens, prompt_len - 1 - s)  # positions whose next token is a prompt token
    k = row.params.prompt_logprobs
    targets = torch.tensor(row.all_token_ids[s + 1:s + 1 + m], device=hidden.device)  # [m]
    entries: list[dict[int, float]] = []
    for a in range(0, m, SLICE):
        b = min(m, a + SLICE)
        logprobs = torch.log_softmax(model.compute_logits(hidden[a:b]).float(), dim=-1)  # [b - a, vocab]
        actual = logprobs.gather(1, targets[a:b].unsqueeze(1)).squeeze(1).tolist()
        if k:
            top = logprobs.topk(k, dim=-1)
            top_ids, top_values = top.indices.tolist(), top.values.tolist()
        for j, t in enumerate(targets[a:b].tolist()):
            entry = dict(zip(top_ids[j], top_values[j])) if k else {}
            entry[t] = actual[j]
            entries.append(entry)
    return s + 1, entries
