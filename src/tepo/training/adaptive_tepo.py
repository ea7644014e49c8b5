"""Adaptive TEPO: `tepo_kl_coef` (the strength of TEPO's KL mask) set from the measured token entropy.

TEPO's KL mask pulls back the positive-advantage tokens whose entropy fell since sampling. Here its
coefficient c is an integral controller on the step's token entropy H_k (`StepEntropyMeter`: every
valid token of the optimiser step, all micro-batches and processes), with target H*:

    H*      = adaptive_tepo_target, or adaptive_tepo_target_ratio * H_1 (fixed after the first step)
    c_0     = tepo_kl_coef (default 0)
    c_{k+1} = clip(c_k + adaptive_tepo_rate * (H* - H_k) / H*,  0,  adaptive_tepo_kl_max)

Step k+1's loss uses tepo_kl_coef = c_{k+1}. Below the target c grows with the relative deficit;
above it, it shrinks with the surplus down to exactly 0, where the mask term is 0: while entropy
stays healthy the mask does nothing. Full specification: docs/controls.md.
"""

from __future__ import annotations

import math

from tepo.training.entropy_control import EntropyCoefController


def adaptive_tepo_update(coef: float, entropy: float, *, target: float, rate: float, high: float) -> float:
    """c + rate * (target - H) / target, clipped to [0, high]."""
    return min(max(coef + rate * (target - entropy) / target, 0.0), high)


class AdaptiveTEPOKLCoef(EntropyCoefController):
    """The adaptive-TEPO controller (logs tepo_kl_coef, adaptive_tepo_target, adaptive_tepo_entropy)."""

    hparam = "tepo_kl_coef"
    state_keys = ("coef", "target", "last_entropy")

    def __init__(self, trainer, *, initial: float, target: float | None, target_ratio: float, rate: float,
                 high: float):
        self.coef = float(initial)
        self.target = math.nan if target is None else float(target)  # NaN: set from the first step
        self.target_ratio, self.rate, self.high = float(target_ratio), float(rate), float(high)
        self.last_entropy = math.nan
        super().__init__(trainer)

    def update(self, entropy: float) -> None:
        if not math.isfinite(self.target):
            self.target = self.target_ratio * entropy
        self.last_entropy = entropy
        if self.target > 0:
            self.coef = adaptive_tepo_update(self.coef, entropy, target=self.target, rate=self.rate, high=self.high)

    def applied(self) -> float:
        return self.coef

    def extra_metrics(self) -> dict[str, float]:
        return {"adaptive_tepo_target": self.target, "adaptive_tepo_entropy": self.last_entropy}
