"""Evaluation estimators: pass@k, avg@n, maj@k, and a bootstrap confidence interval.

Pure Python and numpy; one problem at a time for pass@k and maj@k (average over problems yourself,
or use `avg_at_n`), so each function is the textbook definition and nothing more.
"""

from __future__ import annotations

import numbers
from collections import Counter
from typing import Optional, Sequence, Union

import numpy as np


def _count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021) of one problem with n samples, c of them correct.

    pass@k = 1 - C(n-c, k) / C(n, k) = 1 - prod_{j=n-c+1..n} (1 - k/j), and 1 when n - c < k.
    The product form never forms the (huge) binomials. Needs 1 <= k <= n and 0 <= c <= n.
    """
    n, c, k = _count("n", n), _count("c", c), _count("k", k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > n:
        raise ValueError(f"pass@k needs k <= n, got k={k} > n={n}")
    if c > n:
        raise ValueError(f"c (correct samples) must be <= n, got c={c} > n={n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for j in range(n - c + 1, n + 1):
        prod *= 1.0 - k / j
    return 1.0 - prod


def avg_at_n(correct_counts: Sequence[int], n: Union[int, Sequence[int]]) -> float:
    """avg@n: mean over problems of c/n. `n` is one sample count for all, or one per problem."""
    counts = [_count("correct_counts[i]", c) for c in correct_counts]
    if not counts:
        raise ValueError("avg_at_n needs at least one problem")
    ns = [n] * len(counts) if isinstance(n, numbers.Integral) and not isinstance(n, bool) else list(n)
    if len(ns) != len(counts):
        raise ValueError(f"n has {len(ns)} entries but correct_counts has {len(counts)}")
    total = 0.0
    for i, (c, m) in enumerate(zip(counts, ns)):
        m = _count("n", m)
        if m < 1:
            raise ValueError(f"n must be >= 1 (problem {i})")
        if c > m:
            raise ValueError(f"correct_counts[{i}]={c} exceeds n={m}")
        total += c / m
    return total / len(counts)


def maj_at_k(answers: Sequence[Optional[str]], correct: Sequence[bool], k: int) -> float:
    """maj@k of one problem: 1.0 if the majority answer of the first k samples is correct, else 0.0.

    answers: canonical answer per sample, None for "no answer"; correct: the grade of each sample.
    The most frequent non-None answer among the first k samples is graded (with the grade of its
    first occurrence; equal canonical answers have equal grades); a tie goes to the answer that
    appears first; when all k are None the result is 0.0 (wrong).
    """
    if len(answers) != len(correct):
        raise ValueError(f"answers has {len(answers)} entries but correct has {len(correct)}")
    k = _count("k", k)
    if not 1 <= k <= len(answers):
        raise ValueError(f"maj@k needs 1 <= k <= number of samples ({len(answers)}), got k={k}")
    votes: Counter = Counter()
    first: dict[str, int] = {}
    for i, answer in enumerate(answers[:k]):
        if answer is None:
            continue
        votes[answer] += 1
        first.setdefault(answer, i)
    if not votes:
        return 0.0
    # highest count, then earliest first occurrence
    winner = min(votes, key=lambda a: (-votes[a], first[a]))
    return 1.0 if correct[first[winner]] else 0.0


def bootstrap_ci(
    values: Sequence[float], n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap (lo, hi) of the mean of per-problem `values`, resampling problems.

    Deterministic given `seed`. A (1 - alpha) interval: the alpha/2 and 1 - alpha/2 quantiles of
    the means of `n_boot` resamples (with replacement) of the problems.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"values must be a non-empty 1-D sequence, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("values must be finite")
    n_boot = _count("n_boot", n_boot)
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)
