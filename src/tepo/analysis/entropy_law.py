"""The entropy-performance law of Cui et al. (arXiv 2505.22617, Eq. 6): R = -a * exp(H) + b.

R is performance (validation accuracy in the paper), H the mean token entropy of the policy (nats).
Given x = exp(H) the law is linear in (a, b), so ordinary least squares fits it exactly. At H = 0
(entropy exhausted) it predicts the ceiling R = b - a.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class EntropyLawFit:
    """Fitted R = -a * exp(H) + b over `n` points; `r2` is the coefficient of determination."""

    a: float
    b: float
    r2: float
    rmse: float
    n: int

    @property
    def ceiling(self) -> float:
        """Predicted performance when entropy reaches 0: R(H=0) = b - a."""
        return self.b - self.a

    def predict(self, entropy: float | Sequence[float] | np.ndarray) -> float | np.ndarray:
        """R at entropy H (scalar in, scalar out; array in, array out)."""
        h = np.asarray(entropy, dtype=np.float64)
        r = -self.a * np.exp(h) + self.b
        return float(r) if r.ndim == 0 else r

    def to_dict(self) -> dict[str, float | int]:
        return {"a": self.a, "b": self.b, "ceiling": self.ceiling, "r2": self.r2, "rmse": self.rmse, "n": self.n}


def fit_entropy_law(entropy: Sequence[float] | np.ndarray, performance: Sequence[float] | np.ndarray) -> EntropyLawFit:
    """Least-squares fit of R = -a * exp(H) + b.

    Args:
        entropy: (n,) mean token entropy H per point (nats).
        performance: (n,) performance R per point (accuracy or reward).
    Pairs where either value is NaN/inf are dropped. Needs at least 2 points with distinct entropy.
    `r2` is NaN when all R are equal (nothing to explain).
    """
    h = np.asarray(entropy, dtype=np.float64).reshape(-1)
    r = np.asarray(performance, dtype=np.float64).reshape(-1)
    if h.shape != r.shape:
        raise ValueError(f"fit_entropy_law: entropy has {h.size} values but performance has {r.size}")
    keep = np.isfinite(h) & np.isfinite(r)
    h, r = h[keep], r[keep]
    if h.size < 2 or np.ptp(h) == 0.0:
        raise ValueError(
            f"fit_entropy_law: need at least 2 finite points with different entropy, got {h.size} "
            f"(distinct entropies: {np.unique(h).size})"
        )
    x = np.exp(h)
    design = np.stack([-x, np.ones_like(x)], axis=1)  # (n, 2): columns multiply a and b
    (a, b), *_ = np.linalg.lstsq(design, r, rcond=None)
    residual = r - design @ np.array([a, b])
    ss_res = float(residual @ residual)
    ss_tot = float(((r - r.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else math.nan
    return EntropyLawFit(a=float(a), b=float(b), r2=r2, rmse=math.sqrt(ss_res / r.size), n=int(r.size))
