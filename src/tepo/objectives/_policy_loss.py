"""`policy_loss`: the one entry point; everything an objective shares happens here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from tepo.objectives._common import aggregate, kl_estimate, masked_mean, prepare_batch, ratio_metrics
from tepo.objectives._registry import get_objective
from tepo.objectives.errors import MissingInputError, ShapeMismatchError


@dataclass
class PolicyLossOutput:
    """loss: 0-dim tensor (float32, or float64 for float64 inputs) that back-propagates into logp
    (and into entropy when entropy_coef != 0). metrics: floats over the valid tokens."""

    loss: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


def policy_loss(
    name: str,
    *,
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logp: Optional[Tensor] = None,
    entropy: Optional[Tensor] = None,
    old_entropy: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    token_weight: Optional[Tensor] = None,
    **hparams,
) -> PolicyLossOutput:
    """Policy loss of objective `name` on one mini-batch (the formulas: docs/objectives.md).

    Tensors: logp, old_logp, mask (B, T); advantages (B,) or (B, T); ref_logp, entropy,
    old_entropy (B, T) or None. bf16/fp16/fp32 inputs are computed in float32, float64 in float64.
    token_weight (B, T) or None: a detached, objective-independent weight w on the policy term
    (rollout correction, token selection, off-policy masking; 1 = no change, 0 = token dropped
    from the gradient but still counted by the aggregation's normaliser, as in TRL and verl).
    hparams: those of `default_hparams(name)`; None means the default.

        loss = agg( w * l + beta_kl * KL_est(ref_logp - logp) ) + extra - entropy_coef * agg(entropy)

    where l is the objective's per-token loss and extra its post-aggregation term (TEPO's KL mask).
    Metrics: clip_frac, clip_frac_low, clip_frac_high, ratio_mean, ratio_min, ratio_max,
    approx_kl; cov_selected (clip_cov, kl_cov); kl_mask_frac (tepo); entropy_mean (entropy given).
    """
    spec = get_objective(name)
    hp = spec.resolve(hparams)
    if hp["beta_kl"] > 0 and ref_logp is None:
        raise MissingInputError(
            f"beta_kl={hp['beta_kl']} needs ref_logp (B, T), the reference policy's log-probs; "
            "pass ref_logp or set beta_kl=0"
        )
    if hp["entropy_coef"] != 0 and entropy is None:
        raise MissingInputError(
            f"entropy_coef={hp['entropy_coef']} needs entropy (B, T); pass entropy or set entropy_coef=0"
        )
    batch = prepare_batch(
        logp=logp,
        old_logp=old_logp,
        advantages=advantages,
        mask=mask,
        ref_logp=ref_logp,
        entropy=entropy,
        old_entropy=old_entropy,
        generator=generator,
    )
    terms = spec.fn(batch, hp)

    per_token = terms.per_token
    if token_weight is not None:
        per_token = per_token * _checked_weight(token_weight, batch)
    if hp["beta_kl"] > 0:
        per_token = per_token + hp["beta_kl"] * kl_estimate(batch.ref_logp - batch.logp, hp["kl_estimator"])
    loss = aggregate(per_token, batch, hp["agg"], hp["max_len"])
    if terms.extra_loss is not None:
        loss = loss + terms.extra_loss
    if hp["entropy_coef"] != 0:
        loss = loss - hp["entropy_coef"] * aggregate(batch.entropy, batch, hp["agg"], hp["max_len"])

    metrics = ratio_metrics(batch, terms)
    metrics.update(terms.metrics)
    if batch.entropy is not None:
        metrics["entropy_mean"] = masked_mean(batch.entropy.detach(), batch)
    # one device-to-host transfer for all metrics
    names = [k for k, v in metrics.items() if isinstance(v, Tensor)]
    values = torch.stack([metrics[k].reshape(()).to(batch.mask.dtype) for k in names]).tolist() if names else []
    metrics.update(zip(names, values))
    return PolicyLossOutput(loss=loss, metrics={k: float(v) for k, v in metrics.items()})


def _checked_weight(token_weight: Tensor, batch) -> Tensor:
    """token_weight (B, T), detached, cast to the compute dtype, 0 at padding (garbage there is ignored)."""
    if not isinstance(token_weight, Tensor) or tuple(token_weight.shape) != batch.shape:
        shape = tuple(token_weight.shape) if isinstance(token_weight, Tensor) else type(token_weight).__name__
        raise ShapeMismatchError(f"token_weight must be a (B, T) = {batch.shape} tensor like logp, got {shape}")
    if token_weight.device != batch.mask.device:
        raise ShapeMismatchError(f"token_weight is on {token_weight.device} but logp is on {batch.mask.device}")
    return torch.where(batch.valid, token_weight.detach().to(batch.mask.dtype), 0.0)
