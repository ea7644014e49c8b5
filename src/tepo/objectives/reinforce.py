"""REINFORCE-form objectives: CISPO, VESPO, GPG (the contract: docs/objectives.md).

Each per-token loss is ``l = -w * A * logp`` with a detached weight w >= 0, so the gradient is
``-w * A * grad logp`` and nothing is dropped from it by a clip (the value, like TRL's and verl's
logged loss, depends on logp itself):

    cispo  w = sg(clip(r, 1-clip_low, 1+clip_high)), token ratio r      agg token-mean   clip 1.0/4.0 (choice)
    vespo  w = sg(phi(W_i)), phi(W) = W^k exp(lambda (1 - W)),          agg token-mean
           W_i the sequence likelihood ratio (the product, not the geometric mean)
    gpg    w = alpha = B_rows / B_informative (1 with gpg_alpha_rescale=False), no ratio at all;
           agg token-mean, advantages unscaled (scale="none", F_norm = 1)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tepo.objectives._common import LOG_RATIO_CLAMP, ObjectiveTerms, PolicyBatch, masked_mean, token_ratio
from tepo.objectives._registry import register_objective

# VESPO's sequence log-ratio is clamped to [log 1e-8, 20] before exp, as in its original code and TRL.
VESPO_LOG_W_MIN = math.log(1e-8)
VESPO_LOG_W_MAX = 20.0


def _by_sign(positive: Tensor, if_pos: float, if_neg: float, like: Tensor) -> Tensor:
    """Tensor of the shape of `positive` holding if_pos where it is True, if_neg elsewhere (dtype of `like`)."""
    return torch.where(positive, like.new_tensor(if_pos), like.new_tensor(if_neg))


@register_objective("cispo", clip_low=1.0, clip_high=4.0, agg="token-mean")
def cispo(batch: PolicyBatch, hp: dict) -> ObjectiveTerms:
    """CISPO (MiniMax-M1): l = -sg(clip(r, 1-clip_low, 1+clip_high)) * A * logp, (B, T).

    r = exp(clamp(d, -20, 20)) (B, T), detached. Clipped tokens (metrics): r < 1-clip_low or
    r > 1+clip_high whatever the sign of A (their weight is capped; none is dropped).
    """
    ratio = token_ratio(batch.log_ratio.detach())
    low, high = 1.0 - hp["clip_low"], 1.0 + hp["clip_high"]
    weight = ratio.clamp(low, high)
    per_token = -(weight * batch.advantages) * batch.logp
    return ObjectiveTerms(per_token=per_token, ratio=ratio, clipped=(ratio < low, ratio > high))


@register_objective(
    "vespo", agg="token-mean", vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0
)
def vespo(batch: PolicyBatch, hp: dict) -> ObjectiveTerms:
    """VESPO: l = -sg(phi_i) * A * logp, (B, T).

        log W_i = clamp( sum_t mask * clamp(d, -20, 20), log 1e-8, 20 )       (B, 1), detached
        (k, lam) = (vespo_k_pos, vespo_lambda_pos) where A >= 0, else the _neg pair
        phi      = exp(lam + k * log W_i - lam * W_i)  = W^k e^{lam (1 - W)}, phi(1) = 1
    phi has the shape of A: (B, 1), or (B, T) for token advantages. ratio (metrics) = W_i;
    metric phi_mean = mean of phi over the valid tokens.
    """
    d = batch.log_ratio.detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # 0 at padding
    log_w = d.sum(-1, keepdim=True).clamp(VESPO_LOG_W_MIN, VESPO_LOG_W_MAX)
    w = torch.exp(log_w)
    nonneg = batch.advantages >= 0
    k = _by_sign(nonneg, hp["vespo_k_pos"], hp["vespo_k_neg"], w)
    lam = _by_sign(nonneg, hp["vespo_lambda_pos"], hp["vespo_lambda_neg"], w)
    phi = torch.exp(lam + k * log_w - lam * w)
    per_token = -(phi * batch.advantages) * batch.logp
    return ObjectiveTerms(per_token=per_token, ratio=w, metrics={"phi_mean": masked_mean(phi, batch)})


@register_objective("gpg", advantage_scale="none", agg="token-mean", gpg_alpha_rescale=True)
def gpg(batch: PolicyBatch, hp: dict) -> ObjectiveTerms:
    """GPG: l = -alpha * A * logp, (B, T); no ratio, no clip.

    alpha = B_rows / max(1, B_informative) with gpg_alpha_rescale (the paper's B / (B - M)), else 1:
    B_rows = rows with a valid token, B_informative = those of them with A != 0 at a valid token,
    counted over the call. ratio (metrics) = r, the token ratio GPG ignores (how far off-policy the
    call is); metric gpg_alpha.
    """
    per_token = -batch.advantages * batch.logp
    alpha = batch.mask.new_ones(())
    if hp["gpg_alpha_rescale"]:
        rows = batch.counts > 0
        if batch.advantages.shape[-1] == 1:
            informative = rows & (batch.advantages.reshape(-1) != 0)
        else:
            informative = ((batch.advantages != 0) & batch.valid).any(-1)
        alpha = rows.sum().to(alpha.dtype) / informative.sum().clamp(min=1).to(alpha.dtype)
        per_token = per_token * alpha
    ratio = token_ratio(batch.log_ratio.detach())
    return ObjectiveTerms(per_token=per_token, ratio=ratio, metrics={"gpg_alpha": alpha})
