"""Verification of proposed tokens by the target model.

Greedy rows accept the longest prefix of proposals equal to the target's argmax, then take the
target's next token. Sampled rows use rejection sampling (Leviathan et al. 2023, Chen et al. 2023):
proposal x drawn from q is accepted with probability min(1, p(x) / q(x)); on rejection the token is
drawn from normalize(max(0, p - q)); when all are accepted a bonus token is drawn from p. The result
is distributed exactly as sampling from the target p, whatever q is.
"""

from __future__ import annotations

import torch


def verify_greedy(logits: torch.Tensor, proposals: list[int]) -> tuple[list[int], int]:
    """logits: [len(proposals) + 1, vocab]. Returns (accepted proposals, next token)."""
    target = logits.argmax(dim=-1).tolist()
    accepted = []
    for x, t in zip(proposals, target):
        if x != t:
            break
        accepted.append(x)
    return accepted, target[len(accepted)]


def _draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return int((probs / noise).argmax())


def verify_sampled(probs: torch.Tensor, proposals: list[int], draft_probs: torch.Tensor | None,
                   generator: torch.Generator) -> tuple[list[int], int]:
    """probs: the target's filtered distributions [len(proposals) + 1, vocab]; draft_probs: the
    proposer's [len(proposals), vocab], or None for one-hot proposals (n-gram)."""
    accepted = []
    for j, x in enumerate(proposals):
        p = probs[j]
        if draft_probs is None:
            q = torch.zeros_like(p)
            q[x] = 1.0
        else:
            q = draft_probs[j]
        u = torch.rand((), generator=generator, device=p.device)
        if float(u) * float(q[x]) < float(p[x]):  # u < p(x) / q(x), without dividing by zero
            accepted.append(x)
            continue
        residual = (p - q).clamp_(min=0)
        total = residual.sum()
        return accepted, _draw(residual / total if total > 0 else p, generator)
    return accepted, _draw(probs[len(proposals)], generator)
