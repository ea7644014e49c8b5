"""Token-ratio PPO objectives: GRPO, DAPO, Dr. GRPO.

All three use the per-token loss ``l = max(-A*r, -A*clip(r, 1-clip_low, 1+clip_high))`` with the
token ratio ``r = exp(clamp(logp - old_logp, -20, 20))``; they differ only in their defaults
(clip range, aggregation), which is the whole point of keeping them side by side:

    grpo     clip 0.2/0.2   agg seq-mean-token-mean       (DeepSeekMath Eq. 3)
    dapo     clip 0.2/0.28  agg token-mean                (DAPO: clip-higher + token-level loss)
    dr_grpo  clip 0.2/0.2   agg seq-mean-token-sum-norm   (Dr. GRPO: sum / (B * max_len));
             pair it with group_advantages(..., scale="none")
"""

from __future__ import annotations

from tepo.objectives._common import ObjectiveTerms, PolicyBatch, ppo_term, token_ratio
from tepo.objectives._registry import register_objective


def token_ppo_terms(batch: PolicyBatch, hp: dict) -> ObjectiveTerms:
    """PPO clipped term with the token ratio r; (B, T)."""
    ratio = token_ratio(batch.log_ratio)
    clip = (hp["clip_low"], hp["clip_high"])
    return ObjectiveTerms(per_token=ppo_term(ratio, batch.advantages, *clip), ratio=ratio, clip=clip)


@register_objective("grpo", clip_low=0.2, clip_high=0.2, agg="seq-mean-token-mean")
def grpo(batch: PolicyBatch, hp: dict) -> ObjectiveTerms:
    """GRPO: PPO term with the token ratio, mean over each response's tokens, then over responses."""
    return token_ppo_terms(batch, hp)


@register_objective("dapo", clip_low=0.2, clip_high=0.28, agg="token-mean")
def dapo(batch: PolicyBatch, hp: dict) -> ObjectiveTerms:
    """DAPO: the GRPO term with a higher upper clip, averaged over all tokens of the mini-batch."""
    return token_ppo_terms(batch, hp)


@register_objective("dr_grpo", advantage_scale="none", clip_low=0.2, clip_high=0.2, agg="seq-mean-token-sum-norm")
def dr_grpo(batch: PolicyBatch, hp: dict) -> ObjectiveTerms:
    """Dr. GRPO: the GRPO term summed and divided by the constant B * max_len (no length bias)."""
    return token_ppo_terms(batch, hp)
