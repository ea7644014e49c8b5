"""Covariance-based entropy control: Clip-Cov and KL-Cov (Cui et al., arXiv 2505.22617).

Both rank the valid tokens of the call by the detached covariance
    cov[i,t] = (A[i,t] - mean(A)) * (logp[i,t] - mean(logp))       (means over valid tokens)
and treat a few of them, ``k = max(1, int(cov_ratio * N))``, differently:

    clip_cov  PPO term with r (clip 0.2/0.2, token-mean); k tokens drawn uniformly without
              replacement from the valid, not PPO-clipped tokens with cov_lb < cov < cov_ub
              (all of them when fewer) get loss 0, value and gradient.
    kl_cov    unclipped -A*r on every token (token-mean); the k valid tokens with the largest cov
              get + kl_cov_coef * |d|. kl_cov has no clip range, so it accepts no clip_low/clip_high
              and reports clip_frac* = 0.

Metric cov_selected: the number of selected tokens (a count, not a fraction).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from tepo.objectives._common import ObjectiveTerms, PolicyBatch, token_ratio
from tepo.objectives._registry import register_objective
from tepo.objectives.ppo import token_ppo_terms


def token_covariance(batch: PolicyBatch) -> Tensor:
    """(B, T) detached cov = (A - mean A) * (logp - mean logp), means over valid tokens.

    Values at padding are meaningless; callers restrict to `batch.valid`.
    """
    adv = batch.token_advantages
    logp = batch.logp.detach()
    return (adv - adv.sum() / batch.n_tokens) * (logp - logp.sum() / batch.n_tokens)


def selection_size(cov_ratio: float, batch: PolicyBatch) -> int:
    """k = max(1, int(cov_ratio * N))."""
    return max(1, int(cov_ratio * batch.n_tokens))


def random_subset(candidates: Tensor, k: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Bool mask like `candidates` with min(k, #candidates) of its True entries, drawn uniformly
    without replacement (deterministic given `generator`; the global RNG without one)."""
    flat = candidates.flatten()
    index = flat.nonzero().squeeze(-1)
    if index.numel() > k:
        device = generator.device if generator is not None else index.device
        pick = torch.randperm(index.numel(), generator=generator, device=device)[:k]
        index = index[pick.to(index.device)]
    selected = torch.zeros_like(flat)
    selected[index] = True
    return selected.view_as(candidates)


def top_k_tokens(scores: Tensor, valid: Tensor, k: int) -> Tensor:
    """Bool mask (B, T) of the min(k, #valid) valid tokens with the largest `scores`."""
    k = min(k, int(valid.sum()))
    selected = torch.zeros(valid.numel(), dtype=torch.bool, device=valid.device)
    if k > 0:
        index = torch.where(valid, scores, float("-inf")).flatten().topk(k).indices
        selected[index] = True
    return selected.view_as(valid)


@register_objective(
    "clip_cov", clip_low=0.2, clip_high=0.2, agg="token-mean", cov_ratio=2e-4, cov_lb=1.0, cov_ub=5.0
)
def clip_cov(batch: PolicyBatch, hp: dict) -> ObjectiveTerms:
    """Clip-Cov: the PPO term with r, zeroed (value and gradient) on a random high-cov subset."""
    terms = token_ppo_terms(batch, hp)
    cov = token_covariance(batch)
    clipped = terms.clipped_low | terms.clipped_high
    candidates = batch.valid & ~clipped & (cov > hp["cov_lb"]) & (cov < hp["cov_ub"])
    selected = random_subset(candidates, selection_size(hp["cov_ratio"], batch), batch.generator)
    terms.per_token = torch.where(selected, 0.0, terms.per_token)
    terms.metrics["cov_selected"] = selected.sum().to(batch.logp.dtype)
    return terms


@register_objective("kl_cov", agg="token-mean", cov_ratio=2e-3, kl_cov_coef=1.0)
def kl_cov(batch: PolicyBatch, hp: dict) -> ObjectiveTerms:
    """KL-Cov: -A*r (no clip) on all tokens, + kl_cov_coef*|d| on the top-cov tokens."""
    ratio = token_ratio(batch.log_ratio)
    selected = top_k_tokens(token_covariance(batch), batch.valid, selection_size(hp["cov_ratio"], batch))
    penalty = torch.where(selected, hp["kl_cov_coef"] * batch.log_ratio.abs(), 0.0)
    return ObjectiveTerms(
        per_token=-batch.advantages * ratio + penalty,
        ratio=ratio,
        metrics={"cov_selected": selected.sum().to(batch.logp.dtype)},
    )
