"""The statistics of every comparison: t-intervals over seeds and bootstrap intervals.

**t-intervals** (SciPy's `scipy.stats.t`): `mean_std_ci` gives the mean of one number per seed with
its Student-t interval (df = seeds - 1); `seed_matched_t` gives, for each pair of arms, the t-interval
of the per-seed differences on the seeds both arms have (each difference measured on the same
problems), df = common seeds - 1. The seed-matched t-interval is the PRIMARY interval of a pair: the
seed is the unit that was replicated, and with few seeds the t distribution's heavy tails hold the
spread between seeds that a percentile bootstrap over 4 seeds understates.

**Bootstrap** (ours, not `scipy.stats.bootstrap`: that resamples the observations of each sample,
but not two axes at once with one axis shared across samples, which the pairing by problem needs).
The data of one arm is a verdict matrix V (seeds x problems, 1 = correct), every arm evaluated on
the same problems in the same order. One bootstrap replicate:

1. draws P problem indices with replacement, ONCE, shared by every arm (the pairing: a hard
   problem drawn twice counts twice for every arm, so problem difficulty cancels in differences);
2. draws, for each arm separately, S_arm seed indices with replacement (the study's written plan:
   seeds as independent training runs, although seed s of two arms shares one thing, the order of
   the training problems, which the seed sets for every arm alike; see `seed_matched_bootstrap`);
3. takes each arm's mean verdict over the drawn seeds and problems (with multiplicity).

The arm's interval is the (alpha/2, 1 - alpha/2) percentile interval of its replicates; the
difference A - B of two arms takes the same percentiles of the replicate differences. Quantities
measured once per run (steps-to-target, end-of-run entropy) have no problem axis:
`seed_bootstrap` resamples only the seeds within each arm (step 2); with one seed there is nothing
to resample, so an arm of one seed, and each pair with it, has no interval (low = high = None).

`seed_matched_bootstrap` is the secondary analysis of a pair that takes the shared training
order into account: only the seeds both arms have, drawn jointly for both (as the problems are).

Resampling is by multinomial counts (the same as drawing indices), so a replicate is
`u_b @ V @ w_b / (S P)` with u_b, w_b the seed and problem counts of replicate b.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from typing import Mapping

import numpy as np
from scipy import stats as _scipy_stats

DEFAULT_REPLICATES = 10_000
DEFAULT_SEED = 0


@dataclass
class Interval:
    estimate: float
    low: float | None  # None: no interval (one seed, where only seeds are resampled)
    high: float | None
    n: int  # seeds (arm) or the smaller arm's seeds (difference)

    def to_dict(self) -> dict[str, float]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "n": self.n}


@dataclass
class BootstrapResult:
    arms: dict[str, Interval]
    pairs: dict[tuple[str, str], Interval]  # (a, b) -> a minus b, for every ordered pair a before b
    replicates: dict[str, np.ndarray]  # arm -> (B,) replicate means
    confidence: float
    n_replicates: int
    seed: int

    def to_dict(self) -> dict:
        return {
            "confidence": self.confidence, "replicates": self.n_replicates, "seed": self.seed,
            "arms": {a: i.to_dict() for a, i in self.arms.items()},
            "pairs": [{"a": a, "b": b, **i.to_dict()} for (a, b), i in self.pairs.items()],
        }


def _counts(rng: np.random.Generator, n: int, replicates: int) -> np.ndarray:
    """(B, n) counts of a with-replacement draw of n out of n (divided by n later, so that 0/1
    data give exact replicate means)."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=replicates).astype(np.float64)


def _percentiles(values: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 1.0 - confidence
    low, high = np.quantile(values, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def _check(confidence: float, replicates: int) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if replicates < 100:
        raise ValueError(f"need at least 100 bootstrap replicates, got {replicates}")


def _summarise(observed: Mapping[str, float], reps: dict[str, np.ndarray], sizes: Mapping[str, int],
               confidence: float, replicates: int, seed: int) -> BootstrapResult:
    arms = {a: Interval(float(observed[a]), *_percentiles(reps[a], confidence), sizes[a]) for a in reps}
    pairs = {}
    for a, b in combinations(list(reps), 2):
        low, high = _percentiles(reps[a] - reps[b], confidence)
        pairs[(a, b)] = Interval(float(observed[a] - observed[b]), low, high, min(sizes[a], sizes[b]))
    return BootstrapResult(arms, pairs, reps, confidence, replicates, seed)


def paired_bootstrap(verdicts: Mapping[str, np.ndarray], *, confidence: float = 0.95,
                     replicates: int = DEFAULT_REPLICATES, seed: int = DEFAULT_SEED) -> BootstrapResult:
    """Per-arm mean accuracy and pairwise differences, resampling seeds within arms and problems
    jointly across arms (see the module doc).

    verdicts: arm -> (seeds, problems) array of 0/1 (or any numbers), the same problems (columns)
    for every arm. The estimate is the mean over seeds and problems of the observed matrix.
    """
    _check(confidence, replicates)
    if not verdicts:
        raise ValueError("paired_bootstrap: no arms")
    mats = {a: np.asarray(v, dtype=np.float64) for a, v in verdicts.items()}
    shapes = {a: m.shape for a, m in mats.items()}
    bad = [a for a, m in mats.items() if m.ndim != 2 or m.shape[0] < 1 or m.shape[1] < 1]
    if bad:
        raise ValueError(f"paired_bootstrap: arm(s) {bad} need a (seeds, problems) matrix, got shapes {[shapes[a] for a in bad]}")
    problems = {m.shape[1] for m in mats.values()}
    if len(problems) != 1:
        raise ValueError(f"paired_bootstrap: arms are evaluated on different numbers of problems: {shapes}")
    n_problems = problems.pop()
    rng = np.random.default_rng(seed)
    w = _counts(rng, n_problems, replicates)  # shared by every arm: the pairing
    reps = {}
    for arm, m in mats.items():  # arm order fixes the random stream, so a result is reproducible
        u = _counts(rng, m.shape[0], replicates)
        reps[arm] = np.einsum("bs,sp,bp->b", u, m, w) / (m.shape[0] * n_problems)
    observed = {a: float(m.mean()) for a, m in mats.items()}
    return _summarise(observed, reps, {a: m.shape[0] for a, m in mats.items()}, confidence, replicates, seed)


def seed_bootstrap(values: Mapping[str, np.ndarray], *, confidence: float = 0.95,
                   replicates: int = DEFAULT_REPLICATES, seed: int = DEFAULT_SEED) -> BootstrapResult:
    """The same for one number per run (arm -> (seeds,)): resample seeds within each arm. Arms
    with no finite value are left out. An arm with one value, and each pair with it, gets no
    interval (None): resampling one seed gives it back every time, an interval of zero width that
    would claim a precision one run does not have."""
    _check(confidence, replicates)
    vecs = {a: np.asarray([x for x in v if x is not None and math.isfinite(x)], dtype=np.float64) for a, v in values.items()}
    vecs = {a: v for a, v in vecs.items() if v.size}
    rng = np.random.default_rng(seed)
    reps = {a: _counts(rng, v.size, replicates) @ v / v.size for a, v in vecs.items()}
    observed = {a: float(v.mean()) for a, v in vecs.items()}
    result = _summarise(observed, reps, {a: int(v.size) for a, v in vecs.items()}, confidence, replicates, seed)
    for interval in [*result.arms.values(), *result.pairs.values()]:
        if interval.n < 2:
            interval.low = interval.high = None
    return result


def seed_matched_bootstrap(verdicts: Mapping[str, Mapping[int, np.ndarray]], *, confidence: float = 0.95,
                           replicates: int = DEFAULT_REPLICATES, seed: int = DEFAULT_SEED) -> dict[tuple[str, str], Interval]:
    """Pairwise differences on the seeds both arms have, resampling seeds AND problems jointly.

    verdicts: arm -> {seed: (problems,) 0/1}, the same problems for every run. For the pair (a, b)
    with common seeds C: the estimate is the mean over C and the problems of V_a - V_b, and one
    replicate draws P problem indices (shared by every pair) and |C| indices into C (shared by a
    and b), so a seed that is good or bad for both arms alike cancels in the difference, as a hard
    problem does. Pairs with no common seed are left out; with one, the interval holds problem
    noise only (n = 1, as in `paired_bootstrap`). Interval.n is |C|.
    """
    _check(confidence, replicates)
    runs = {a: {int(s): np.asarray(v, dtype=np.float64) for s, v in by_seed.items()} for a, by_seed in verdicts.items()}
    lengths = {(a, s): v.shape for a, by_seed in runs.items() for s, v in by_seed.items()}
    if len({shape for shape in lengths.values()}) > 1 or any(len(shape) != 1 or shape[0] < 1 for shape in lengths.values()):
        raise ValueError(f"seed_matched_bootstrap: every run needs a (problems,) vector of one length, got {lengths}")
    if not lengths:
        raise ValueError("seed_matched_bootstrap: no runs")
    n_problems = next(iter(lengths.values()))[0]
    rng = np.random.default_rng(seed)
    w = _counts(rng, n_problems, replicates)
    pairs = {}
    for a, b in combinations(list(runs), 2):  # pair order fixes the random stream: reproducible
        common = sorted(set(runs[a]) & set(runs[b]))
        if not common:
            continue
        d = np.stack([runs[a][s] - runs[b][s] for s in common])  # (|C|, P)
        u = _counts(rng, len(common), replicates)
        reps = np.einsum("bs,sp,bp->b", u, d, w) / (len(common) * n_problems)
        pairs[(a, b)] = Interval(float(d.mean()), *_percentiles(reps, confidence), len(common))
    return pairs


# ---- t-intervals over seeds ------------------------------------------------------------------
def t_half_width(std: float, n: int, confidence: float) -> float:
    """Half width of the Student-t interval of a mean of n values with sample std `std` (df = n - 1)."""
    return float(_scipy_stats.t.ppf(0.5 + confidence / 2.0, n - 1)) * std / math.sqrt(n)


def mean_std_ci(values, confidence: float = 0.95) -> dict[str, float]:
    """Mean, sample std (ddof=1) and the Student-t interval of the mean of `values` (one per seed;
    None and non-finite values are left out). With one value std and the interval are NaN."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    n = int(v.size)
    if n == 0:
        return {"n": 0, "mean": math.nan, "std": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    mean = float(v.mean())
    if n == 1:
        return {"n": 1, "mean": mean, "std": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    std = float(v.std(ddof=1))
    half = t_half_width(std, n, confidence)
    return {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half}


def seed_matched_t(verdicts: Mapping[str, Mapping[int, np.ndarray]], *,
                   confidence: float = 0.95) -> dict[tuple[str, str], Interval]:
    """The primary interval of each pair: a t-interval over the seeds both arms have.

    verdicts: arm -> {seed: (problems,) 0/1}, the same problems for every run. For the pair (a, b)
    with common seeds C, d_s = mean over problems of V_a[s] - V_b[s] for s in C; the estimate is the
    mean of the d_s and the interval mean +- t(df = |C| - 1) * std(d, ddof=1) / sqrt(|C|). Pairs with
    no common seed are left out; with one, there is no interval (low = high = None). Interval.n is |C|.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    means = {a: {int(s): float(np.mean(np.asarray(v, dtype=np.float64))) for s, v in by_seed.items()}
             for a, by_seed in verdicts.items()}
    pairs = {}
    for a, b in combinations(list(means), 2):
        common = sorted(set(means[a]) & set(means[b]))
        if not common:
            continue
        stats = mean_std_ci([means[a][s] - means[b][s] for s in common], confidence)
        low, high = (stats["ci_low"], stats["ci_high"]) if stats["n"] > 1 else (None, None)
        pairs[(a, b)] = Interval(stats["mean"], low, high, stats["n"])
    return pairs
