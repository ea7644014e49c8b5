"""Rollout correction: a per-token weight on the policy term for the sampler-vs-trainer mismatch.

With vLLM rollouts the completions are sampled by the engine (pi_sampler), whose log-probs differ
from the trainer's own on the same weights (other kernels, precision, a bf16 engine). The
objectives keep the trainer's recomputed log-probs as pi_old (their PPO ratio is unchanged); this
piece multiplies each token's policy loss by an importance weight pi_old / pi_sampler, truncated or
masked, at the token or sequence level, as TRL, verl and OpenRLHF do. Formulas, names and
thresholds: docs/rollout-correction.md. Options are TRL's own: `vllm_importance_sampling_correction`,
`vllm_importance_sampling_mode`, `vllm_importance_sampling_clip_min` / `_clip_max`.

Where the inputs come from (TRL 1.16, `_generate_and_score_completions`): the engine's per-token
log-probs of the sampled tokens are `inputs["sampling_per_token_logps"]` (B, T), right-padded with
0, NaN where vLLM returned none; the trainer's pi_old is `inputs["old_per_token_logps"]`, absent
when TRL skipped that pass because every micro-batch of the rollout is trained on before the
weights change, and then equal to the current log-probs (`logp`), which are used instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tepo.run_folder import ROLLOUT_CORRECTION_KEYS as METRIC_NAMES  # the metrics.jsonl columns of this module

# vllm_importance_sampling_mode -> (level, kind). TRL's four, and the geometric-mean sequence mask.
MODES: dict[str, tuple[str, str]] = {
    "token_truncate": ("token", "truncate"),
    "sequence_truncate": ("sequence", "truncate"),
    "token_mask": ("token", "mask"),
    "sequence_mask": ("sequence", "mask"),
    "geometric_mask": ("geometric", "mask"),
}


def level_log_ratio(delta: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """log of the importance ratio at `level`, broadcast to every token (B, T).

    delta: (B, T) log pi_old - log pi_sampler, 0 where it is not defined; mask: (B, T) 0/1.
    token: delta; sequence: sum_t mask*delta per row; geometric: that sum / sum_t mask (0 for an
    empty row)."""
    if level == "token":
        return delta
    total = (delta * mask).sum(dim=-1, keepdim=True)
    if level == "sequence":
        return total.expand_as(delta)
    if level == "geometric":
        return (total / mask.sum(dim=-1, keepdim=True).clamp(min=1)).expand_as(delta)
    raise ValueError(f"level must be token, sequence or geometric, got {level!r}")


def correction_weight(
    delta: torch.Tensor, mask: torch.Tensor, *, level: str, kind: str,
    low: float | None, high: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight, ratio, outside), each (B, T).

    ratio = exp(level_log_ratio); outside: ratio < low or ratio > high (a None bound is no bound).
    truncate: weight = clamp(ratio, low, high); mask: weight = ratio where inside, 0 where outside.
    The weight is 0 on tokens outside `mask`."""
    ratio = level_log_ratio(delta, mask, level).exp()
    lo = -math.inf if low is None else low
    hi = math.inf if high is None else high
    outside = (ratio < lo) | (ratio > hi)
    if kind == "truncate":
        weight = ratio.clamp(min=low, max=high)
    elif kind == "mask":
        weight = ratio.masked_fill(outside, 0.0)
    else:
        raise ValueError(f"kind must be truncate or mask, got {kind!r}")
    return weight * mask, ratio, outside


@dataclass(frozen=True)
class RolloutCorrection:
    """The correction of one run. `mode` is a key of MODES; `low`/`high` the ratio bounds."""

    mode: str
    low: float | None
    high: float | None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"vllm_importance_sampling_mode={self.mode!r}: valid modes are {', '.join(MODES)}")
        for name, value in (("vllm_importance_sampling_clip_min", self.low), ("vllm_importance_sampling_clip_max", self.high)):
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}={value!r} must be a finite ratio >= 0 (or unset)")
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError(
                f"vllm_importance_sampling_clip_min={self.low} > vllm_importance_sampling_clip_max={self.high}"
            )
        if MODES[self.mode][1] == "truncate" and self.high is None:
            raise ValueError(f"vllm_importance_sampling_mode={self.mode!r} needs vllm_importance_sampling_clip_max")

    @classmethod
    def from_config(cls, args) -> "RolloutCorrection | None":
        """The correction `args` (a TEPOConfig) asks for, or None (no vLLM or the correction off)."""
        if not (args.use_vllm and args.vllm_importance_sampling_correction):
            return None
        return cls(args.vllm_importance_sampling_mode, args.vllm_importance_sampling_clip_min, args.vllm_importance_sampling_clip_max)

    def __call__(self, trainer, inputs, *, logp, entropy, mask) -> tuple[torch.Tensor | None, dict[str, float]]:
        sampler = inputs.get("sampling_per_token_logps")
        if sampler is None:  # generated by transformers, not vLLM: pi_sampler is the trainer's policy
            return None, {}
        old = inputs.get("old_per_token_logps")
        trainer_logp = logp if old is None else old
        mask = mask.to(logp.dtype)
        delta = torch.nan_to_num((trainer_logp - sampler) * mask, nan=0.0)
        level, kind = MODES[self.mode]
        weight, ratio, outside = correction_weight(delta, mask, level=level, kind=kind, low=self.low, high=self.high)
        return weight, self.metrics(delta, ratio, outside, mask, sampler)

    def metrics(self, delta, ratio, outside, mask, sampler) -> dict[str, float]:
        """Token means over the valid tokens (min / max for the _min / _max names)."""
        valid = mask.bool()
        gap = delta.abs()[valid & ~torch.isnan(sampler)]
        r = ratio[valid]
        n = max(int(valid.sum()), 1)
        if r.numel() == 0:
            return {name: float("nan") for name in METRIC_NAMES}
        outside_frac = (outside & valid).sum().item() / n
        kind = MODES[self.mode][1]
        return {
            "rollout_logp_gap": gap.mean().item() if gap.numel() else float("nan"),
            "rollout_logp_gap_max": gap.max().item() if gap.numel() else float("nan"),
            "rollout_is_ratio_mean": r.mean().item(),
            "rollout_is_ratio_min": r.min().item(),
            "rollout_is_ratio_max": r.max().item(),
            "rollout_is_masked_frac": outside_frac if kind == "mask" else 0.0,
            "rollout_is_truncated_frac": outside_frac if kind == "truncate" else 0.0,
        }


def install(trainer, args) -> list:
    """The pieces for `trainer.token_weights`: [the RolloutCorrection of `args`], or []."""
    # TRL would compute its own ratio too and multiply it into the loss in the _compute_loss that
    # TEPOTrainer replaces; this piece is the one applied and logged, so TRL's is switched off.
    trainer.vllm_importance_sampling_correction = False
    correction = RolloutCorrection.from_config(args)
    return [] if correction is None else [correction]
