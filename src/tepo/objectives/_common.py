"""Shared pieces of every policy objective (the formulas of docs/objectives.md, each written once).

Notation (all tensors of one call, one mini-batch):
    B, T        batch size, padded completion length
    valid       (B, T) bool, the mask
    L_i         max(1, sum_t mask[i, t])               -> PolicyBatch.lengths, (B,)
    N           max(1, sum mask)                       -> PolicyBatch.n_tokens, python float
    d           logp - old_logp                        -> PolicyBatch.log_ratio, (B, T)

Padding: every input tensor is passed through ``torch.where(valid, x, 0)`` once, in
`prepare_batch`, before any arithmetic; that is the only place where padding can hold garbage
(NaN, inf), and a where is the only exclusion that keeps NaN out of both value and gradient. Every
later per-token value is a finite function of those zeros (exp(0) = 1, clamp, products with finite
advantages), so reductions exclude padding by a multiplication with the 0/1 float mask, which is
then exact and on CPU several times cheaper than another where.
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

    Compute dtype: float64 if any input is float64, else float32 (bf16/fp16 are upcast).
        log_ratio   (B, T) d = logp - old_logp; carries the gradient into logp; 0 at padding
        advantages  (B, 1) for per-sequence advantages (0 for empty rows) or (B, T) (0 at
                    padding); detached; broadcasts against (B, T)
        valid       (B, T) bool
        mask        (B, T) the same as 0./1. in the compute dtype
        counts      (B,) valid tokens per row (compute dtype)
        lengths     (B,) L_i = max(1, counts_i)
        n_tokens    N = max(1, number of valid tokens), python float
        n_valid     number of valid tokens, python int
        ref_logp, old_entropy   (B, T) detached, 0 at padding, or None
        entropy     (B, T) keeps its gradient (the entropy bonus back-propagates), 0 at padding, or None
        generator   torch.Generator or None (random token selection)
    Lazily: logp (B, T) with gradient, 0 at padding; seq_log_ratio (B,); pad_inf (B, T).
    """

    log_ratio: Tensor
    advantages: Tensor
    valid: Tensor
    mask: Tensor
    counts: Tensor
    lengths: Tensor
    n_tokens: float
    n_valid: int
    raw_logp: Tensor  # logp as given, cast; may hold garbage at padding -- use `logp`
    ref_logp: Optional[Tensor] = None
    entropy: Optional[Tensor] = None
    old_entropy: Optional[Tensor] = None
    generator: Optional[torch.Generator] = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.valid.shape)  # type: ignore[return-value]

    @cached_property
    def logp(self) -> Tensor:
        """(B, T) log pi_theta with its gradient, 0 at padding."""
        return torch.where(self.valid, self.raw_logp, 0.0)

    @cached_property
    def seq_log_ratio(self) -> Tensor:
        """(B,) ls_i = sum_t mask*d / L_i, the log of the geometric-mean ("Markov likelihood") ratio."""
        return self.log_ratio.sum(-1) / self.lengths

    @cached_property
    def pad_inf(self) -> Tensor:
        """(B, T) 0 at valid tokens, +inf at padding (for masked min/max of finite values)."""
        return torch.where(self.valid, 0.0, float("inf")).to(self.mask.dtype)


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
        raise ShapeMismatchError(f"logp must be (B, T), got shape {tuple(logp.shape)}")
    B, T = logp.shape
    if B == 0 or T == 0:
        raise ShapeMismatchError(f"logp must have B >= 1 and T >= 1, got shape {tuple(logp.shape)}")
    optional = {"ref_logp": ref_logp, "entropy": entropy, "old_entropy": old_entropy}
    for name, t in [("old_logp", old_logp), ("mask", mask), *optional.items()]:
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise ShapeMismatchError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if tuple(t.shape) != (B, T):
            raise ShapeMismatchError(
                f"{name} has shape {tuple(t.shape)} but logp has shape {(B, T)}; {name} must be (B, T) like logp"
            )
    if tuple(advantages.shape) not in ((B,), (B, T)):
        raise ShapeMismatchError(
            f"advantages has shape {tuple(advantages.shape)} but logp has shape {(B, T)}; "
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

    dtype = torch.float64 if any(t.dtype == torch.float64 for _, t in floats) else torch.float32
    if mask.dtype == torch.bool:
        valid, maskf = mask, mask.view(torch.uint8).to(dtype)  # via uint8: several times faster on CPU
    else:
        maskf = mask.detach().to(dtype)
        if not torch.equal(maskf * maskf, maskf):  # x*x == x only for 0 and 1 (NaN fails too)
            raise ShapeMismatchError("mask must hold only 0 and 1 (or be a bool tensor)")
        valid = maskf != 0
    counts = maskf.sum(-1)  # exact: integers below 2**24 per row
    n_valid = int(counts.sum(dtype=torch.float64))

    def clean(t: Optional[Tensor], keep_grad: bool = False) -> Optional[Tensor]:
        if t is None:
            return None
        return torch.where(valid, t.to(dtype) if keep_grad else t.detach().to(dtype), 0.0)

    raw_logp = logp.to(dtype)
    if advantages.dim() == 1:
        adv = torch.where(counts > 0, advantages.detach().to(dtype), 0.0).unsqueeze(-1)
    else:
        adv = clean(advantages)
    return PolicyBatch(
        log_ratio=torch.where(valid, raw_logp - old_logp.detach().to(dtype), 0.0),
        advantages=adv,
        valid=valid,
        mask=maskf,
        counts=counts,
        lengths=counts.clamp(min=1.0),
        n_tokens=float(max(1, n_valid)),
        n_valid=n_valid,
        raw_logp=raw_logp,
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


def sequence_token_ratio(log_ratio: Tensor, seq_log_ratio: Tensor) -> Tensor:
    """(B, T) s_it = exp(min(logp - sg(logp) + sg(ls_i), 10)) (GSPO-token, TEPO).

    Value s_i at every token of row i; gradient d s_it / d logp_it = s_it (0 where ls_i > 10),
    through token t only (nothing flows through ls_i). Built as the first-order form of that
    definition, ``s_i + s_i * 1[ls_i <= 10] * (d - sg(d))``: the same value (d - sg(d) is exactly 0)
    and the same gradient (logp - sg(logp) and d - sg(d) have the same gradient, old_logp being
    constant), in three cheap passes instead of an exp over (B, T).
    """
    ls = seq_log_ratio.detach()
    s = sequence_ratio(ls)
    slope = s * (ls <= SEQ_LOG_RATIO_MAX)  # clamp(max=10) passes the gradient up to and at 10
    return s.unsqueeze(-1) + slope.unsqueeze(-1) * (log_ratio - log_ratio.detach())


# --------------------------------------------------------------------------------------------------
# The PPO clipped term


def ppo_term(ratio: Tensor, advantages: Tensor, clip_low: float, clip_high: float) -> Tensor:
    """PPO clipped per-token loss ``l = max(-A*x, -A*clip(x, 1-clip_low, 1+clip_high))``.

    ratio x: (B, T) or (B, 1); advantages A: (B, 1) or (B, T); returns their broadcast shape.
    Computed as ``A- * max(x, 1-clip_low) - A+ * min(x, 1+clip_high)`` with A+ = max(A, 0) and
    A- = max(-A, 0), which is the same function: for A > 0 the max form is -A*min(x, 1+clip_high),
    for A < 0 it is -A*max(x, 1-clip_low), for A = 0 it is 0. The gradient is -A where x is not
    clipped and 0 where it is (see `clip_flags`; at the bound itself it is not clipped).
    """
    pos = advantages.clamp(min=0.0)
    neg = (-advantages).clamp(min=0.0)
    return neg * ratio.clamp(min=1.0 - clip_low) - pos * ratio.clamp(max=1.0 + clip_high)


def clip_flags(ratio: Tensor, advantages: Tensor, clip_low: float, clip_high: float) -> tuple[Tensor, Tensor]:
    """(clipped_low, clipped_high) bool: A < 0 and x < 1-clip_low; A > 0 and x > 1+clip_high.

    Compared against per-advantage thresholds (-inf/+inf where the sign does not allow clipping):
    one comparison per flag over (B, T) instead of a comparison and a broadcast and.
    """
    ratio = ratio.detach()
    lower = torch.where(advantages < 0, 1.0 - clip_low, float("-inf")).to(ratio.dtype)
    upper = torch.where(advantages > 0, 1.0 + clip_high, float("inf")).to(ratio.dtype)
    return ratio < lower, ratio > upper


# --------------------------------------------------------------------------------------------------
# Aggregation and KL estimators


def aggregate(values: Tensor, batch: PolicyBatch, agg: str, max_len: Optional[int] = None) -> Tensor:
    """Reduce a per-token matrix over the valid tokens to a 0-dim tensor.

    values: (B, T), or (B, 1) for a value constant along each row. Padding entries must be finite
    (they are for anything computed from a PolicyBatch).
        token-mean               sum(mask*l) / N
        seq-mean-token-mean      mean_i( sum_t mask*l / L_i )
        seq-mean-token-sum       mean_i( sum_t mask*l )
        seq-mean-token-sum-norm  sum(mask*l) / (B * max_len), max_len = T when None
    """
    B, T = batch.shape
    if values.shape[-1] == 1:
        row_sums = values.reshape(B) * batch.counts  # sum_t mask*l of a row-constant l
    else:
        row_sums = (values * batch.mask).sum(-1)
    if agg == "token-mean":
        return row_sums.sum() / batch.n_tokens
    if agg == "seq-mean-token-mean":
        return (row_sums / batch.lengths).mean()
    if agg == "seq-mean-token-sum":
        return row_sums.mean()
    if agg == "seq-mean-token-sum-norm":
        return row_sums.sum() / (B * (T if max_len is None else max_len))
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

    per_token   (B, T), or (B, 1) when constant along rows: l[i, t] before aggregation; finite at
                padding (true of anything computed from the PolicyBatch tensors)
    ratio       (B, T) or (B, 1): the value of the ratio the objective clips, for metrics
    clip        (clip_low, clip_high) used, or None when nothing is clipped (clip_frac* = 0)
    clipped     precomputed `clip_flags` (low, high), or None to compute them from ratio and clip
    extra_loss  0-dim tensor added after aggregation (TEPO's KL mask term), or None
    metrics     extra metrics (0-dim tensors or floats)
    """

    per_token: Tensor
    ratio: Tensor
    clip: Optional[tuple[float, float]] = None
    clipped: Optional[tuple[Tensor, Tensor]] = None
    extra_loss: Optional[Tensor] = None
    metrics: dict = field(default_factory=dict)


def masked_mean(values: Tensor, batch: PolicyBatch) -> Tensor:
    """0-dim mean over the valid tokens of finite `values` (B, T) or (B, 1) (0 when none)."""
    if values.shape[-1] == 1:
        return (values.reshape(-1) * batch.counts).sum() / batch.n_tokens
    return (values * batch.mask).sum() / batch.n_tokens


def masked_count(flags: Tensor, batch: PolicyBatch) -> Tensor:
    """0-dim number of valid tokens where the bool `flags` (B, T) or (B, 1) holds (compute dtype)."""
    if flags.shape[-1] == 1:
        return (flags.reshape(-1) * batch.counts).sum()
    return torch.count_nonzero(flags & batch.valid).to(batch.mask.dtype)


def ratio_metrics(batch: PolicyBatch, terms: ObjectiveTerms) -> dict[str, Tensor]:
    """clip_frac(_low/_high), ratio_mean/min/max, approx_kl over the valid tokens (0 when none)."""
    N = batch.n_tokens
    ratio = terms.ratio.detach()
    zero = batch.mask.new_zeros(())
    out: dict[str, Tensor] = {}
    flags = terms.clipped
    if flags is None and terms.clip is not None:
        flags = clip_flags(ratio, batch.advantages, *terms.clip)
    low = masked_count(flags[0], batch) / N if flags is not None else zero
    high = masked_count(flags[1], batch) / N if flags is not None else zero
    out["clip_frac"] = low + high  # disjoint: low needs A < 0, high A > 0
    out["clip_frac_low"] = low
    out["clip_frac_high"] = high
    out["ratio_mean"] = masked_mean(ratio, batch)
    if batch.n_valid == 0:
        out["ratio_min"] = out["ratio_max"] = zero
    elif ratio.shape[-1] == 1:
        row_pad = torch.where(batch.counts > 0, 0.0, float("inf")).to(ratio.dtype)
        out["ratio_min"] = (ratio.reshape(-1) + row_pad).amin()
        out["ratio_max"] = (ratio.reshape(-1) - row_pad).amax()
    else:
        out["ratio_min"] = (ratio + batch.pad_inf).amin()
        out["ratio_max"] = (ratio - batch.pad_inf).amax()
    # d is 0 at padding, where exp(0) + 0 - 1 = 0
    out["approx_kl"] = kl_estimate(-batch.log_ratio.detach(), "k3").sum() / N
    return out
