"""Geometric-mean sequence objectives: LUSPO, GMPO (the contract: docs/objectives.md).

Both weight a response by one geometric-mean ratio, ``exp(mean_t of a token log-ratio)``:

    luspo  GSPO's PPO term with s_i (gradient through ls_i), each response's loss scaled by its
           length: agg seq-mean-token-sum (mean_i of L_i * l_i); clip 3e-4/4e-4 (GSPO's, choice)
    gmpo   l_i = -A * g_i, g_i = exp(min(mean_t c_it, 10)) with the sign-aware clip in log space
           c = min(d, log_clip_high) where A > 0, max(d, -log_clip_low) where A <= 0
           (d = clamp(logp - old_logp, -20, 20)); agg seq-mean-token-mean; log clip 0.4/0.4 (GMPO paper)
"""

from __future__ import annotations

import torch

from tepo.objectives._common import LOG_RATIO_CLAMP, ObjectiveTerms, PolicyBatch, sequence_ratio, token_ratio
from tepo.objectives._registry import register_objective
from tepo.objectives.sequence import gspo


@register_objective("luspo", clip_low=3e-4, clip_high=4e-4, agg="seq-mean-token-sum")
def luspo(batch: PolicyBatch, hp: dict) -> ObjectiveTerms:
    """LUSPO: GSPO's PPO term with s_i (B, 1), summed over the response's tokens (= L_i times GSPO's
    per-response loss), then averaged over responses; the length scaling is the aggregation."""
    return gspo(batch, hp)


@register_objective("gmpo", log_clip_low=0.4, log_clip_high=0.4, agg="seq-mean-token-mean")
def gmpo(batch: PolicyBatch, hp: dict) -> ObjectiveTerms:
    """GMPO: l[i,t] = -A[i,t] * g_i; (B, 1) for per-sequence advantages, (B, T) for token ones.

        d  = clamp(logp - old_logp, -20, 20)                        (B, T), 0 at padding
        c  = min(d, log_clip_high) where A > 0, max(d, -log_clip_low) where A <= 0
        g_i = exp(min(sum_t mask * c / L_i, 10))                    gradient through every c
    ratio (metrics) = exp(d); clipped: A < 0 and d < -log_clip_low, A > 0 and d > log_clip_high.
    """
    low, high = hp["log_clip_low"], hp["log_clip_high"]
    d = batch.log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    adv = batch.advantages
    positive = adv > 0
    clipped_log_ratio = torch.where(positive, d.clamp(max=high), d.clamp(min=-low))  # 0 at padding
    g = sequence_ratio(clipped_log_ratio.sum(-1) / batch.lengths).unsqueeze(-1)  # (B, 1)
    d_value = d.detach()
    clipped = ((adv < 0) & (d_value < -low), positive & (d_value > high))
    return ObjectiveTerms(per_token=-adv * g, ratio=token_ratio(d_value), clipped=clipped)
