"""Shared pieces of every policy objective (the formulas of OBJECTIVES.md, each written once).

Notation (all tensors of one call, one mini-batch):
    B, T        batch size, padded completion length
    valid       (B, T) bool, the mask
    L_i         max(1, sum_t mask[i, t])               -> PolicyBatch.lengths, (B,)
    N           max(1, sum mask)                       -> PolicyBatch.n_tokens, python float
    d           logp - old_logp                        -> PolicyBatch.log_ratio, (B, T)

Masked positions are replaced by 0 with ``torch.where`` *before* any arithmetic, so whatever they
hold (NaN and inf included) changes no value and no gradient: a multiplication by the mask would
turn NaN into NaN and inf into NaN, and a where after exp/log would still back-propagate NaN.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Optional

import torch
from torch import Tensor

from tepo.objectives.errors import ShapeMismatchError

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
LOG_RATIO_CLAMP = 20.0  # token log-ratio clamped to [-20, 20] before exp
SEQ_LOG_RATIO_MAX = 10.0  # sequence log-ratio clamped to at most 10 before exp


# --------------------------------------------------------------------------------------------------
# The prepared batch


@dataclass
class PolicyBatch:
    """Inputs of one call, checked, cast to the compute dtype and zeroed at padding.

    Attributes (compute dtype = float64 if any input is float64, else float32):
        logp        (B, T) log pi_theta; carries the gradient; 0 at padding
        old_logp    (B, T) log pi_old, detached; 0 at padding
        log_ratio   (B, T) d = logp - old_logp; 0 at padding
        advantages  (B, 1) for per-sequence advantages (0 for empty rows) or (B, T) (0 at padding);
                    detached; broadcasts against (B, T)
        valid       (B, T) bool
        lengths     (B,) L_i = max(1, valid tokens of row i)
        n_tokens    N = max(1, number of valid tokens), python float
        n_valid     number of valid tokens, python int
        ref_logp, old_entropy   (B, T) detached, 0 at padding, or None
        entropy     (B, T) keeps its gradient (the entropy bonus back-propagates), 0 at padding, or None
        generator   torch.Generator or None (random token selection)
    """

    logp: Tensor
    old_logp: Tensor
    log_ratio: Tensor
    advantages: Tensor
    valid: Tensor
    lengths: Tensor
    n_tokens: float
    n_valid: int
    ref_logp: Optional[Tensor] = None
    entropy: Optional[Tensor] = None
    old_entropy: Optional[Tensor] = None
    generator: Optional[torch.Generator] = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.valid.shape)  # type: ignore[return-value]

    @cached_property
    def seq_log_ratio(self) -> Tensor:
        """(B,) ls_i = sum_t mask*d / L_i, the log of the geometric-mean ("Markov likelihood") ratio."""
        return self.log_ratio.sum(-1) / self.lengths

    @cached_property
    def token_advantages(self) -> Tensor:
        """(B, T) advantages broadcast over T (0 at padding), detached."""
        return torch.where(self.valid, self.advantages, 0.0)


def _describe(t: Tensor) -> str:
    return f"{tuple(t.shape)}"


def prepare_batch(
    *,
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logp: Optional[Tensor] = None,
    entropy: Optional[Tensor] = None,
    old_entropy: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> PolicyBatch:
    """Check shapes, devices and dtypes; cast; replace padding by 0. See `PolicyBatch`."""
    for name, t in (("logp", logp), ("old_logp", old_logp), ("advantages", advantages), ("mask", mask)):
        if not isinstance(t, Tensor):
            raise ShapeMismatchError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if logp.dim() != 2:
        raise ShapeMismatchError(f"logp must be (B, T), got shape {_describe(logp)}")
    B, T = logp.shape
    if B == 0 or T == 0:
        raise ShapeMismatchError(f"logp must have B >= 1 and T >= 1, got shape {_describe(logp)}")
    optional = {"ref_logp": ref_logp, "entropy": entropy, "old_entropy": old_entropy}
    for name, t in [("old_logp", old_logp), ("mask", mask), *optional.items()]:
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise ShapeMismatchError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if tuple(t.shape) != (B, T):
            raise ShapeMismatchError(
                f"{name} has shape {_describe(t)} but logp has shape {(B, T)}; {name} must be (B, T) like logp"
            )
    if tuple(advantages.shape) not in ((B,), (B, T)):
        raise ShapeMismatchError(
            f"advantages has shape {_describe(advantages)} but logp has shape {(B, T)}; "
            f"advantages must be (B,) = {(B,)} or (B, T) = {(B, T)}"
        )
    floats = [("logp", logp), ("old_logp", old_logp)] + [(n, t) for n, t in optional.items() if t is not None]
    for name, t in floats:
        if not t.is_floating_point():
            raise ShapeMismatchError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if advantages.is_complex() or mask.is_complex():
        raise ShapeMismatchError("advantages and mask must be real tensors")
    for name, t in [("old_logp", old_logp), ("advantages", advantages), ("mask", mask), *optional.items()]:
        if t is not None and t.device != logp.device:
            raise ShapeMismatchError(f"{name} is on {t.device} but logp is on {logp.device}; move them to one device")

    if mask.dtype == torch.bool:
        valid = mask
    else:
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ShapeMismatchError("mask must hold only 0 and 1 (or be a bool tensor)")
        valid = mask != 0

    dtype = torch.float64 if any(t.dtype == torch.float64 for _, t in floats) else torch.float32
    counts = valid.sum(-1)  # (B,) int64
    n_valid = int(counts.sum())

    def clean(t: Optional[Tensor], keep_grad: bool = False) -> Optional[Tensor]:
        if t is None:
            return None
        t = t.to(dtype) if keep_grad else t.detach().to(dtype)
        return torch.where(valid, t, 0.0)

    lp = clean(logp, keep_grad=True)
    old = clean(old_logp)
    if advantages.dim() == 1:
        adv = torch.where(counts > 0, advantages.detach().to(dtype), 0.0).unsqueeze(-1)
    else:
        adv = clean(advantages)
    return PolicyBatch(
        logp=lp,
        old_logp=old,
        log_ratio=lp - old,
        advantages=adv,
        valid=valid,
        lengths=counts.clamp(min=1).to(dtype),
        n_tokens=float(max(1, n_valid)),
        n_valid=n_valid,
        ref_logp=clean(ref_logp),
        entropy=clean(entropy, keep_grad=True),
        old_entropy=clean(old_entropy),
        generator=generator,
    )


# --------------------------------------------------------------------------------------------------
# Ratios


def token_ratio(log_ratio: Tensor) -> Tensor:
    """(B, T) r = exp(clamp(d, -20, 20))."""
    return torch.exp(torch.clamp(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


def sequence_ratio(seq_log_ratio: Tensor) -> Tensor:
    """(B,) s_i = exp(min(ls_i, 10)); the gradient flows through ls_i (GSPO)."""
    return torch.exp(torch.clamp(seq_log_ratio, max=SEQ_LOG_RATIO_MAX))


def sequence_token_ratio(logp: Tensor, seq_log_ratio: Tensor) -> Tensor:
    """(B, T) s_it = exp(min(logp - sg(logp) + sg(ls_i), 10)) (GSPO-token, TEPO).

    Its value is s_i at every token of row i; d s_it / d logp_it = s_it (0 when ls_i > 10), and no
    gradient flows through ls_i, so token t's gradient comes from token t's own loss only.
    """
    return torch.exp(torch.clamp(logp - logp.detach() + seq_log_ratio.detach().unsqueeze(-1), max=SEQ_LOG_RATIO_MAX))


# --------------------------------------------------------------------------------------------------
# The PPO clipped term


def ppo_term(ratio: Tensor, advantages: Tensor, clip_low: float, clip_high: float) -> tuple[Tensor, Tensor, Tensor]:
    """PPO clipped per-token loss ``l = max(-A*x, -A*clip(x, 1-clip_low, 1+clip_high))``.

    ratio: (B, T) or (B, 1); advantages: (B, 1) or (B, T). Returns (l, clipped_low, clipped_high),
    broadcast to a common shape. A token is clipped low when A < 0 and x < 1-clip_low, high when
    A > 0 and x > 1+clip_high; there l = -A*bound with zero gradient, elsewhere l = -A*x (the max
    of the two branches is the unclipped one in every other case, so this equals the max form in
    value and gradient).
    """
    lo, hi = 1.0 - clip_low, 1.0 + clip_high
    clipped_high = (advantages > 0) & (ratio > hi)
    clipped_low = (advantages < 0) & (ratio < lo)
    bounded = torch.where(clipped_high, hi, torch.where(clipped_low, lo, ratio))
    return -advantages * bounded, clipped_low, clipped_high


# --------------------------------------------------------------------------------------------------
# Aggregation and KL estimators


def aggregate(values: Tensor, batch: PolicyBatch, agg: str, max_len: Optional[int] = None) -> Tensor:
    """Reduce a per-token matrix (B, T) (or broadcastable) over the valid tokens to a 0-dim tensor.

    token-mean               sum(mask*l) / N
    seq-mean-token-mean      mean_i( sum_t mask*l / L_i )
    seq-mean-token-sum       mean_i( sum_t mask*l )
    seq-mean-token-sum-norm  sum(mask*l) / (B * max_len), max_len = T when None
    """
    masked = torch.where(batch.valid, values, 0.0)
    B, T = batch.shape
    if agg == "token-mean":
        return masked.sum() / batch.n_tokens
    if agg == "seq-mean-token-mean":
        return (masked.sum(-1) / batch.lengths).mean()
    if agg == "seq-mean-token-sum":
        return masked.sum(-1).mean()
    if agg == "seq-mean-token-sum-norm":
        return masked.sum() / (B * (T if max_len is None else max_len))
    raise ValueError(f"agg={agg!r} is not one of {', '.join(AGG_MODES)}")


def kl_estimate(u: Tensor, estimator: str) -> Tensor:
    """Per-token KL estimate from u = log q - log p at tokens sampled from p (Schulman's k1/k2/k3).

    k1 = -u,  k2 = u^2 / 2,  k3 = exp(u) - u - 1.
    KL(pi_theta || pi_ref): u = ref_logp - logp.  approx_kl and the TEPO mask term: u = old_logp - logp = -d.
    """
    if estimator == "k1":
        return -u
    if estimator == "k2":
        return 0.5 * u * u
    if estimator == "k3":
        return torch.exp(u) - u - 1.0
    raise ValueError(f"kl_estimator={estimator!r} is not one of {', '.join(KL_ESTIMATORS)}")


# --------------------------------------------------------------------------------------------------
# What an objective hands back, and the metrics every call returns


@dataclass
class ObjectiveTerms:
    """What an objective function returns to `policy_loss`.

    per_token     (B, T) or broadcastable: l[i, t] before aggregation (padding values are ignored)
    ratio         (B, T) or (B, 1): the ratio the objective clips, for metrics
    clipped_low   bool, broadcastable to (B, T), or None (no clipping)
    clipped_high  bool, broadcastable to (B, T), or None
    extra_loss    0-dim tensor added after aggregation (TEPO's KL mask term), or None
    metrics       extra metrics (0-dim tensors or floats)
    """

    per_token: Tensor
    ratio: Tensor
    clipped_low: Optional[Tensor] = None
    clipped_high: Optional[Tensor] = None
    extra_loss: Optional[Tensor] = None
    metrics: dict = field(default_factory=dict)


def masked_mean(values: Tensor, batch: PolicyBatch) -> Tensor:
    """0-dim mean of `values` over the valid tokens (0 when there are none)."""
    return torch.where(batch.valid, values, 0.0).sum() / batch.n_tokens


def masked_count(flags: Tensor, batch: PolicyBatch) -> Tensor:
    """0-dim number of valid tokens where the bool `flags` holds (compute dtype)."""
    return (flags & batch.valid).sum().to(batch.logp.dtype)


def ratio_metrics(batch: PolicyBatch, terms: ObjectiveTerms) -> dict[str, Tensor]:
    """clip_frac(_low/_high), ratio_mean/min/max, approx_kl over the valid tokens (0 when none)."""
    valid, N = batch.valid, batch.n_tokens
    ratio = terms.ratio.detach()
    zero = batch.logp.new_zeros(())
    out: dict[str, Tensor] = {}
    low = masked_count(terms.clipped_low, batch) / N if terms.clipped_low is not None else zero
    high = masked_count(terms.clipped_high, batch) / N if terms.clipped_high is not None else zero
    out["clip_frac"] = low + high  # disjoint: low needs A < 0, high A > 0
    out["clip_frac_low"] = low
    out["clip_frac_high"] = high
    out["ratio_mean"] = masked_mean(ratio, batch)
    if batch.n_valid:
        out["ratio_min"] = torch.where(valid, ratio, float("inf")).amin()
        out["ratio_max"] = torch.where(valid, ratio, float("-inf")).amax()
    else:
        out["ratio_min"] = out["ratio_max"] = zero
    # d is 0 at padding, where exp(0) + 0 - 1 = 0
    out["approx_kl"] = kl_estimate(-batch.log_ratio.detach(), "k3").sum() / N
    return out
