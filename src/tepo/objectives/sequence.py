"""Sequence-likelihood ratio objectives: GSPO, GSPO-token, TEPO.

All three use the geometric-mean ("Markov likelihood") ratio of a response,
``s_i = exp(min(ls_i, 10))`` with ``ls_i = sum_t mask*(logp - old_logp) / L_i``, in the PPO term.

    gspo        ratio s_i, gradient through ls_i             agg seq-mean-token-mean   clip 3e-4/4e-4
    gspo_token  ratio s_it (value s_i, gradient per token)   agg seq-mean-token-mean   clip 3e-4/4e-4
    tepo        ratio s_it, agg token-mean, clip 3e-4/4e-4 (choice), plus the token-level KL mask

With per-sequence advantages gspo and gspo_token agree in value and gradient; TEPO is gspo_token
with DAPO's token-level aggregation, so a response's update grows with its length while its
importance weight is one low-variance sequence-level number.
"""

from __future__ import annotations

import torch

from tepo.objectives._common import (
    ObjectiveTerms,
    PolicyBatch,
    kl_estimate,
    masked_count,
    ppo_term,
    sequence_ratio,
    sequence_token_ratio,
)
from tepo.objectives._registry import register_objective
from tepo.objectives.errors import MissingInputError


def sequence_token_ppo_terms(batch: PolicyBatch, hp: dict) -> ObjectiveTerms:
    """PPO clipped term with s_it (B, T); its value s_i (B, 1) serves the clip metrics."""
    clip = (hp["clip_low"], hp["clip_high"])
    ratio = sequence_token_ratio(batch.log_ratio, batch.seq_log_ratio)
    value = sequence_ratio(batch.seq_log_ratio.detach()).unsqueeze(-1)
    return ObjectiveTerms(per_token=ppo_term(ratio, batch.advantages, *clip), ratio=value, clip=clip)


@register_objective("gspo", clip_low=3e-4, clip_high=4e-4, agg="seq-mean-token-mean")
def gspo(batch: PolicyBatch, hp: dict) -> ObjectiveTerms:
    """GSPO: PPO term with s_i (B, 1) broadcast over the response; gradient flows through ls_i."""
    clip = (hp["clip_low"], hp["clip_high"])
    ratio = sequence_ratio(batch.seq_log_ratio).unsqueeze(-1)  # (B, 1)
    return ObjectiveTerms(per_token=ppo_term(ratio, batch.advantages, *clip), ratio=ratio, clip=clip)


@register_objective("gspo_token", clip_low=3e-4, clip_high=4e-4, agg="seq-mean-token-mean")
def gspo_token(batch: PolicyBatch, hp: dict) -> ObjectiveTerms:
    """GSPO-token: PPO term with s_it (B, T): value s_i, gradient through token t only."""
    return sequence_token_ppo_terms(batch, hp)


@register_objective("tepo", clip_low=3e-4, clip_high=4e-4, agg="token-mean", tepo_kl_coef=0.0)
def tepo(batch: PolicyBatch, hp: dict) -> ObjectiveTerms:
    """TEPO: GSPO-token's PPO term with token-level aggregation, plus the token-level KL mask.

    KL mask (extended version; off at the default tepo_kl_coef = 0):
        m[i,t] = 1[A[i,t] > 0] * 1[entropy[i,t] < old_entropy[i,t]]           (B, T), detached
        k[i,t] = exp(-d) + d - 1          (k3 from pi_theta to pi_old, gradient through d)
        loss  += tepo_kl_coef * sum(mask * m * k) / N       (always / N, whatever `agg` is)
    Metric kl_mask_frac = sum(mask * m) / N (0 when entropies are not given). The comparison is strict,
    as specified, so when entropy and old_entropy come from passes that round differently (a compiled
    training pass against the eager scoring pass, say) it selects tokens on-policy too; their k is ~0.
    """
    coef = hp["tepo_kl_coef"]
    if coef > 0:
        missing = [n for n in ("entropy", "old_entropy") if getattr(batch, n) is None]
        if missing:
            raise MissingInputError(
                f"tepo with tepo_kl_coef={coef} needs entropy and old_entropy, (B, T) each; "
                f"missing: {', '.join(missing)} (or set tepo_kl_coef=0)"
            )
    terms = sequence_token_ppo_terms(batch, hp)
    kl_mask_frac = batch.mask.new_zeros(())
    if batch.entropy is not None and batch.old_entropy is not None:
        kl_mask = (batch.advantages > 0) & (batch.entropy.detach() < batch.old_entropy) & batch.valid
        kl_mask_frac = masked_count(kl_mask, batch) / batch.n_tokens
        if coef > 0:
            k = kl_estimate(-batch.log_ratio, "k3")
            terms.extra_loss = coef * torch.where(kl_mask, k, 0.0).sum() / batch.n_tokens
    terms.metrics["kl_mask_frac"] = kl_mask_frac
    return terms
