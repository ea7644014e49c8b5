"""Soft-gated objectives: SAPO (the contract: docs/objectives.md).

SAPO replaces PPO's hard clip of the token ratio by a smooth sigmoid gate whose slope at r = 1 is 1
(on-policy it is the policy gradient) and decays as r leaves 1, faster for negative advantages:

    sapo  l = -f_tau(r) * A,  f_tau(r) = sigmoid(tau (r - 1)) * 4 / tau,
          tau = sapo_temperature_pos where A > 0, sapo_temperature_neg where A <= 0
          agg seq-mean-token-mean; tau 1.0 / 1.05 (SAPO paper; TRL's and verl's defaults)
"""

from __future__ import annotations

import torch

from tepo.objectives._common import ObjectiveTerms, PolicyBatch, masked_mean, token_ratio
from tepo.objectives._registry import register_objective


@register_objective(
    "sapo", agg="seq-mean-token-mean", sapo_temperature_pos=1.0, sapo_temperature_neg=1.05
)
def sapo(batch: PolicyBatch, hp: dict) -> ObjectiveTerms:
    """SAPO: l = -sigmoid(tau (r - 1)) * 4 / tau * A, (B, T); r = exp(clamp(d, -20, 20)).

    Nothing is clipped (clip_frac* = 0). Metric soft_gate_weight_mean: the mean over valid tokens
    of the gate's slope df/dr = 4 s (1 - s), s = sigmoid(tau (r - 1)): the factor (in (0, 1]) the
    gate puts on each token's policy gradient -A * dr.
    """
    ratio = token_ratio(batch.log_ratio)
    adv = batch.advantages
    tau = torch.where(adv > 0, ratio.new_tensor(hp["sapo_temperature_pos"]), ratio.new_tensor(hp["sapo_temperature_neg"]))
    s = torch.sigmoid(tau * (ratio - 1.0))
    per_token = -(s * 4.0 / tau) * adv
    slope = 4.0 * s.detach() * (1.0 - s.detach())
    return ObjectiveTerms(per_token=per_token, ratio=ratio, metrics={"soft_gate_weight_mean": masked_mean(slope, batch)})
