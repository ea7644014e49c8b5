"""Off-policy sequence masking (DeepSeek-V3.2, arXiv 2512.02556 eq. 9; TRL's `off_policy_mask_threshold`).

A sequence with negative advantage whose sampling policy has drifted far from the current one is
dropped from the policy gradient:

    D_i = sum_t mask[i,t] * (sampling_logp[i,t] - logp[i,t]) / max(1, sum_t mask[i,t])
    w[i,t] = 1[A[i,t] >= 0  or  D_i <= delta]                          (B, T), detached

sampling_logp is the sampler's log-probs where the batch has them (`sampling_per_token_logps`,
vLLM), otherwise pi_old's as the objective sees it (`TEPOTrainer.pi_old`: the current policy's on
the first step after a rollout, where D_i = 0; the recorded `old_per_token_logps` after it). Tokens without a sampler log-prob (NaN) count as 0 in the sum, as in TRL. A
`TEPOTrainer.token_weights` piece, so it works with every objective (docs/controls.md).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def off_policy_sequence_mask(
    advantages: Tensor, logp: Tensor, sampling_logp: Tensor, mask: Tensor, threshold: float
) -> Tensor:
    """(B, T) weight in logp's dtype: 1 keep, 0 drop. advantages (B,) or (B, T); the others (B, T)."""
    m = mask.to(logp.dtype)
    drift = torch.nan_to_num(sampling_logp.to(logp.dtype) - logp.detach(), nan=0.0)
    mean_drift = (drift * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)  # (B, 1)
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    keep = (adv >= 0) | (mean_drift <= threshold)
    return keep.expand_as(logp).to(logp.dtype)


class OffPolicySequenceMask:
    """Token-weight piece: DeepSeek-V3.2's off-policy sequence mask with threshold delta.

    Metric: off_policy_mask_frac, the fraction of the valid tokens dropped.
    """

    def __init__(self, threshold: float):
        if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold >= 0):
            raise ValueError(f"off_policy_mask_threshold={threshold!r} must be a finite number >= 0")
        self.threshold = float(threshold)

    def __call__(self, trainer, inputs, *, logp, entropy, mask):
        sampling = inputs.get("sampling_per_token_logps")
        if sampling is None:  # pi_old as the objective sees it (the trainer's rule: exactly pi_theta on-policy)
            pi_old = getattr(trainer, "pi_old", None)
            if pi_old is not None:
                sampling, _ = pi_old(inputs, logp, entropy)
            else:
                sampling = inputs.get("old_per_token_logps")
                sampling = logp if sampling is None else sampling
        weight = off_policy_sequence_mask(inputs["advantages"], logp, sampling, mask, self.threshold)
        valid = mask.bool()
        n_valid = int(valid.sum())
        dropped = float(((weight == 0) & valid).sum()) / n_valid if n_valid else float("nan")
        return weight, {"off_policy_mask_frac": dropped}
