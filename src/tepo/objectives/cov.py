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

Metric cov_selected: the number of selected tokens (a count, not a fraction). Equal cov values
at the kl_cov cut-off are broken by torch.topk (implementation-defined; with two valid tokens the
two covariances are always equal).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from tepo.objectives._common import ObjectiveTerms, PolicyBatch, clip_flags, token_ratio
from tepo.objectives._registry import register_objective
from tepo.objectives.ppo import token_ppo_terms


def token_covariance(batch: PolicyBatch) -> Tensor:
    """(B, T) detached cov = (A - mean A) * (logp - mean logp), means over valid tokens.

    Values at padding are meaningless; callers restrict to `batch.valid`.
    """
    adv = batch.advantages  # (B, 1) or (B, T), 0 at padding / empty rows
    logp = batch.logp.detach()
    # mean(A) summed over (B, T) for either shape of A, so (B,) and its broadcast (B, T) give
    # bit-identical cov and hence the same selection even among (near-)ties
    mean_adv = (adv * batch.mask).sum() / batch.n_tokens
    return (logp - logp.sum() / batch.n_tokens).mul_(adv - mean_adv)


def selection_size(cov_ratio: float, batch: PolicyBatch) -> int:
    """k = max(1, int(cov_ratio * N))."""
    return max(1, int(cov_ratio * batch.n_tokens))


def random_subset(candidates: Tensor, k: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Flat indices of min(k, #candidates) True entries of `candidates`, drawn uniformly without
    replacement (deterministic given `generator`; the global RNG without one)."""
    index = candidates.flatten().nonzero().squeeze(-1)
    if index.numel() > k:
        device = generator.device if generator is not None else index.device
        pick = torch.randperm(index.numel(), generator=generator, device=device)[:k]
        index = index[pick.to(index.device)]
    return index


def top_k_tokens(scores: Tensor, batch: PolicyBatch, k: int) -> Tensor:
    """Flat indices of the min(k, #valid) valid tokens with the largest `scores` (B, T)."""
    k = min(k, batch.n_valid)
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    return (scores - batch.pad_inf).flatten().topk(k).indices  # padding -> -inf


@register_objective(
    "clip_cov", clip_low=0.2, clip_high=0.2, agg="token-mean", cov_ratio=2e-4, cov_lb=1.0, cov_ub=5.0
)
def clip_cov(batch: PolicyBatch, hp: dict) -> ObjectiveTerms:
    """Clip-Cov: the PPO term with r, zeroed (value and gradient) on a random high-cov subset."""
    terms = token_ppo_terms(batch, hp)
    low, high = terms.clipped = clip_flags(terms.ratio, batch.advantages, *terms.clip)
    cov = token_covariance(batch)
    candidates = cov > hp["cov_lb"]
    candidates &= cov < hp["cov_ub"]
    candidates &= batch.valid
    candidates &= ~(low | high)
    index = random_subset(candidates, selection_size(hp["cov_ratio"], batch), batch.generator)
    flat = terms.per_token.reshape(-1)
    terms.per_token = flat.index_put((index,), flat.new_zeros(())).view_as(terms.per_token)
    terms.metrics["cov_selected"] = float(index.numel())
    return terms


@register_objective("kl_cov", agg="token-mean", cov_ratio=2e-3, kl_cov_coef=1.0)
def kl_cov(batch: PolicyBatch, hp: dict) -> ObjectiveTerms:
    """KL-Cov: -A*r (no clip) on all tokens, + kl_cov_coef*|d| on the top-cov tokens."""
    ratio = token_ratio(batch.log_ratio)
    index = top_k_tokens(token_covariance(batch), batch, selection_size(hp["cov_ratio"], batch))
    per_token = (-batch.advantages * ratio).reshape(-1)
    penalty = hp["kl_cov_coef"] * batch.log_ratio.reshape(-1)[index].abs()
    return ObjectiveTerms(
        per_token=per_token.index_add(0, index, penalty).view(batch.shape),
        ratio=ratio,
        metrics={"cov_selected": float(index.numel())},
    )
