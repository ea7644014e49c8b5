"""Stability monitor: watch the per-step training metrics for the ways RL fine-tuning goes wrong.

`StabilityMonitor` is pure logic (this module imports no torch): feed it one metrics dict per
optimiser step, it answers with the warnings that fired at that step; `replay_metrics` runs one
over a finished run's metrics.jsonl rows. `tepo.training.monitor.StabilityMonitorCallback` puts it
into a transformers/TRL training loop and writes `RUN_DIR/monitor.json` with the final verdicts.

Detectors (kind -> what fires it; every threshold is a constructor argument):
- `entropy_collapse` (critical): smoothed token entropy below `entropy_collapse_ratio` x its
  initial value (the mean of the first `warmup_steps` steps).
- `entropy_fall` (warning): over the last `entropy_window` steps a least-squares line through the
  entropy falls by more than `entropy_fall_frac` of its value at the window's start (a sustained
  fall, not a one-step dip).
- `reward_crash` (critical, model collapse): the reward (trailing mean over `reward_window` steps)
  had risen by at least `reward_min_rise` above its initial value and has since given back
  `reward_crash_frac` of that gain, a drop of at least `reward_min_drop`, for `reward_patience`
  steps in a row (noise dips recover; a collapsed model does not).
- `non_finite` (critical): a NaN or infinite metric value (loss, grad norm, reward, ...), or a
  rise of the trainer's running count `nonfinite_skipped` (steps skipped for a non-finite loss or
  gradient; metrics.jsonl stores NaN as null, so replays see the count rather than the NaN).
- `length_blowup` (warning): smoothed mean completion length above `length_blowup_ratio` x initial,
  or the truncated fraction risen by `truncation_rise` above its initial value.
- `repetition` (warning): a repetition metric (any of `repetition_keys`) above `repetition_max`.
- `clip_explosion` (warning): smoothed clip fraction above `clip_frac_max`.
- `ratio_explosion` (warning): importance ratio max above `ratio_max_limit`, min below
  `ratio_min_limit`, or approx KL above `approx_kl_max`, for `explosion_patience` steps in a row.

"Smoothed" = trailing mean over the last `smooth_window` logged values. TEPOTrainer logs ratio_min /
ratio_max as the optimiser step's extremes and entropy_mean, clip_frac, approx_kl as token means over
the whole step, whatever the gradient accumulation or the number of processes
(`tepo.training.step_metrics`). Metric names are those of
`metrics.jsonl` (reward_mean, entropy_mean, ...); TRL's own log names (reward, entropy,
clip_ratio/region_mean, completions/mean_length, ...) are understood too, so the callback works
whatever the trainer logs.
"""

from __future__ import annotations

import math
import os
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from tepo.run_folder import MONITOR_FILE, write_json



CRITICAL, WARNING = "critical", "warning"
SEVERITY = {
    "entropy_collapse": CRITICAL,
    "entropy_fall": WARNING,
    "reward_crash": CRITICAL,
    "non_finite": CRITICAL,
    "length_blowup": WARNING,
    "repetition": WARNING,
    "clip_explosion": WARNING,
    "ratio_explosion": WARNING,
}
KINDS = tuple(SEVERITY)

# Canonical metric name -> other names the same quantity is logged under (TRL 1.16 GRPOTrainer).
ALIASES: dict[str, tuple[str, ...]] = {
    "reward_mean": ("reward",),
    "entropy_mean": ("entropy",),
    "clip_frac": ("clip_ratio/region_mean",),
    "completion_len_mean": ("completions/mean_length",),
    "truncated_frac": ("completions/clipped_ratio",),
    "ratio_max": (),
    "ratio_min": (),
    "approx_kl": (),
    "loss": (),
    "grad_norm": (),
}
# Values that must be finite whenever they are logged.
FINITE_KEYS = ("loss", "grad_norm", "reward_mean", "entropy_mean", "approx_kl", "ratio_mean",
               "ratio_max", "ratio_min", "completion_len_mean")


def _as_float(value: Any) -> float | None:
    """A number as float; None for missing/None/non-numbers (bools and strings are not metrics)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:  # numpy / torch scalars
        return float(value)
    except (TypeError, ValueError):
        return None


def lookup(metrics: Mapping[str, Any], name: str) -> float | None:
    """The value of metric `name` in `metrics`, by its own name, a known alias, or `<prefix>/name`."""
    for key in (name, *ALIASES.get(name, ())):
        if key in metrics:
            return _as_float(metrics[key])
    suffixed = [k for k in metrics if isinstance(k, str) and k.endswith("/" + name) and not k.startswith("monitor/")]
    if len(suffixed) == 1:
        return _as_float(metrics[suffixed[0]])
    return None


@dataclass
class Verdict:
    """One kind of trouble seen in a run: when it first showed, how long it lasted, how bad."""

    kind: str
    severity: str
    first_step: int
    message: str
    value: float
    threshold: float
    last_step: int = -1
    steps_active: int = 0
    episodes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


@dataclass
class _Series:
    """Recent history of one metric plus its initial level."""

    smooth_window: int
    warmup_steps: int
    recent: deque = field(default_factory=deque)
    warmup: list = field(default_factory=list)

    def add(self, value: float) -> None:
        self.recent.append(value)
        while len(self.recent) > self.smooth_window:
            self.recent.popleft()
        if len(self.warmup) < self.warmup_steps:
            self.warmup.append(value)

    @property
    def ready(self) -> bool:
        return len(self.warmup) >= self.warmup_steps

    @property
    def initial(self) -> float:
        return sum(self.warmup) / len(self.warmup)

    @property
    def smoothed(self) -> float:
        return sum(self.recent) / len(self.recent)


class StabilityMonitor:
    """Feed `update(step, metrics)` once per logged step; it returns the warnings that started then.

    Args (defaults chosen for GRPO-style runs of a few dozen to a few thousand steps):
        warmup_steps: steps whose mean is a metric's "initial" value (5).
        smooth_window: trailing-mean window for noisy per-step metrics (5).
        entropy_collapse_ratio: entropy collapse when smoothed entropy < ratio x initial (0.25).
        entropy_window: steps over which a sustained entropy fall is judged (30).
        entropy_fall_frac: sustained fall when the fitted line drops by this fraction (0.4).
        reward_window: trailing-mean window of the reward (10; per-step rewards are noisy).
        reward_min_rise: a reward crash needs the smoothed reward to have risen this much first (0.1).
        reward_crash_frac: ... and then to have lost this fraction of its gain (0.75) ...
        reward_min_drop: ... falling by at least this much from its peak (0.15) ...
        reward_patience: ... for this many consecutive steps (5).
        length_blowup_ratio: mean completion length above ratio x initial (2.0).
        truncation_rise: truncated fraction this far above its initial value (0.3).
        repetition_keys / repetition_max: a repetition metric above this value (0.5).
        clip_frac_max: smoothed clip fraction above this (0.5).
        ratio_max_limit / ratio_min_limit: importance-ratio extremes (10.0 / 0.1).
        approx_kl_max: mean KL(pi_old || pi_theta) estimate above this (0.5).
        explosion_patience: consecutive steps a ratio/KL extreme must last (2).
    """

    def __init__(
        self,
        *,
        warmup_steps: int = 5,
        smooth_window: int = 5,
        entropy_collapse_ratio: float = 0.25,
        entropy_window: int = 30,
        entropy_fall_frac: float = 0.4,
        reward_window: int = 10,
        reward_min_rise: float = 0.1,
        reward_crash_frac: float = 0.75,
        reward_min_drop: float = 0.15,
        reward_patience: int = 5,
        length_blowup_ratio: float = 2.0,
        truncation_rise: float = 0.3,
        repetition_keys: Iterable[str] = ("repetition_frac", "repetition_rate", "repeat_frac"),
        repetition_max: float = 0.5,
        clip_frac_max: float = 0.5,
        ratio_max_limit: float = 10.0,
        ratio_min_limit: float = 0.1,
        approx_kl_max: float = 0.5,
        explosion_patience: int = 2,
    ) -> None:
        for name, value in (("warmup_steps", warmup_steps), ("smooth_window", smooth_window),
                            ("entropy_window", entropy_window), ("explosion_patience", explosion_patience),
                            ("reward_window", reward_window), ("reward_patience", reward_patience)):
            if int(value) < 1:
                raise ValueError(f"StabilityMonitor: {name} must be >= 1, got {value!r}")
        for name, value in (("entropy_collapse_ratio", entropy_collapse_ratio), ("entropy_fall_frac", entropy_fall_frac),
                            ("reward_crash_frac", reward_crash_frac)):
            if not 0.0 < float(value) <= 1.0:
                raise ValueError(f"StabilityMonitor: {name} must be in (0, 1], got {value!r}")
        if entropy_window < 3:
            raise ValueError(f"StabilityMonitor: entropy_window must be >= 3 to fit a trend, got {entropy_window}")
        self.config = dict(
            warmup_steps=int(warmup_steps), smooth_window=int(smooth_window),
            entropy_collapse_ratio=float(entropy_collapse_ratio), entropy_window=int(entropy_window),
            entropy_fall_frac=float(entropy_fall_frac), reward_window=int(reward_window),
            reward_min_rise=float(reward_min_rise), reward_crash_frac=float(reward_crash_frac),
            reward_min_drop=float(reward_min_drop), reward_patience=int(reward_patience), length_blowup_ratio=float(length_blowup_ratio),
            truncation_rise=float(truncation_rise), repetition_keys=list(repetition_keys),
            repetition_max=float(repetition_max), clip_frac_max=float(clip_frac_max),
            ratio_max_limit=float(ratio_max_limit), ratio_min_limit=float(ratio_min_limit),
            approx_kl_max=float(approx_kl_max), explosion_patience=int(explosion_patience),
        )
        self._series: dict[str, _Series] = {}
        self._entropy_window: deque = deque(maxlen=int(entropy_window))
        self._reward_peak = -math.inf
        self._reward_low_run = 0
        self._explosion_run = 0
        self._nonfinite_skipped = 0.0
        self._active: dict[str, bool] = {}
        self.verdicts: dict[str, Verdict] = {}
        self.steps_seen = 0
        self.last_flags: dict[str, float] = {}

    # ---- helpers -------------------------------------------------------------------------
    def _series_for(self, name: str) -> _Series:
        if name not in self._series:
            window = self.config["reward_window"] if name == "reward_mean" else self.config["smooth_window"]
            self._series[name] = _Series(window, self.config["warmup_steps"])
        return self._series[name]

    def _track(self, metrics: Mapping[str, Any], name: str) -> _Series | None:
        """Record metric `name` if it is logged and finite this step; its series, or None."""
        value = lookup(metrics, name)
        if value is None or not math.isfinite(value):
            return None
        series = self._series_for(name)
        series.add(value)
        return series

    # ---- detectors: each returns (fired, value, threshold, message) or None when it cannot judge
    def _non_finite(self, metrics: Mapping[str, Any]):
        bad = [name for name in FINITE_KEYS if (v := lookup(metrics, name)) is not None and not math.isfinite(v)]
        skipped = lookup(metrics, "nonfinite_skipped")
        if skipped is not None and math.isfinite(skipped):
            if skipped > self._nonfinite_skipped:
                bad.append(f"nonfinite_skipped {self._nonfinite_skipped:g} -> {skipped:g}")
            self._nonfinite_skipped = skipped
        if not bad:
            return False, 0.0, 0.0, ""
        return True, float("nan"), 0.0, f"non-finite values: {', '.join(bad)}"

    def _entropy(self, metrics: Mapping[str, Any]):
        series = self._track(metrics, "entropy_mean")
        if series is None:
            return None, None
        self._entropy_window.append(series.recent[-1])
        collapse = fall = None
        if series.ready and series.initial > 0:
            limit = self.config["entropy_collapse_ratio"] * series.initial
            collapse = (series.smoothed < limit, series.smoothed, limit,
                        f"entropy {series.smoothed:.4g} < {self.config['entropy_collapse_ratio']:g} x initial {series.initial:.4g}")
        window = self._entropy_window
        if len(window) == window.maxlen:
            start, end = _line_ends(list(window))
            if start > 0:
                drop = (start - end) / start
                fall = (drop > self.config["entropy_fall_frac"], drop, self.config["entropy_fall_frac"],
                        f"entropy fell {100 * drop:.0f}% over the last {len(window)} steps ({start:.4g} -> {end:.4g})")
        return collapse, fall

    def _reward(self, metrics: Mapping[str, Any]):
        series = self._track(metrics, "reward_mean")
        if series is None or not series.ready:
            return None
        current = series.smoothed
        self._reward_peak = max(self._reward_peak, current)
        gain = self._reward_peak - series.initial
        if gain < self.config["reward_min_rise"]:
            return False, current, math.nan, ""
        limit = self._reward_peak - max(self.config["reward_crash_frac"] * gain, self.config["reward_min_drop"])
        self._reward_low_run = self._reward_low_run + 1 if current <= limit else 0
        return (self._reward_low_run >= self.config["reward_patience"], current, limit,
                f"reward fell to {current:.4g} from a peak of {self._reward_peak:.4g} (initial {series.initial:.4g}) "
                f"for {self._reward_low_run} steps")

    def _length(self, metrics: Mapping[str, Any]):
        verdict = None
        length = self._track(metrics, "completion_len_mean")
        if length is not None and length.ready and length.initial > 0:
            limit = self.config["length_blowup_ratio"] * length.initial
            verdict = (length.smoothed > limit, length.smoothed, limit,
                       f"mean completion length {length.smoothed:.4g} > {self.config['length_blowup_ratio']:g} x initial {length.initial:.4g}")
        trunc = self._track(metrics, "truncated_frac")  # tracked every step, even when length already fired
        if trunc is not None and trunc.ready and (verdict is None or not verdict[0]):
            limit = trunc.initial + self.config["truncation_rise"]
            verdict = (trunc.smoothed > limit, trunc.smoothed, limit,
                       f"truncated fraction {trunc.smoothed:.3g} rose above initial {trunc.initial:.3g} + {self.config['truncation_rise']:g}")
        return verdict

    def _repetition(self, metrics: Mapping[str, Any]):
        for key in self.config["repetition_keys"]:
            series = self._track(metrics, key)
            if series is not None:
                limit = self.config["repetition_max"]
                return series.smoothed > limit, series.smoothed, limit, f"{key} {series.smoothed:.3g} > {limit:g}"
        return None

    def _clip(self, metrics: Mapping[str, Any]):
        series = self._track(metrics, "clip_frac")
        if series is None:
            return None
        limit = self.config["clip_frac_max"]
        return series.smoothed > limit, series.smoothed, limit, f"clip fraction {series.smoothed:.3g} > {limit:g}"

    def _ratio(self, metrics: Mapping[str, Any]):
        rmax, rmin, kl = (lookup(metrics, k) for k in ("ratio_max", "ratio_min", "approx_kl"))
        if rmax is None and rmin is None and kl is None:
            return None
        problems = []
        if rmax is not None and math.isfinite(rmax) and rmax > self.config["ratio_max_limit"]:
            problems.append((rmax, self.config["ratio_max_limit"], f"ratio_max {rmax:.4g} > {self.config['ratio_max_limit']:g}"))
        if rmin is not None and math.isfinite(rmin) and rmin < self.config["ratio_min_limit"]:
            problems.append((rmin, self.config["ratio_min_limit"], f"ratio_min {rmin:.4g} < {self.config['ratio_min_limit']:g}"))
        if kl is not None and math.isfinite(kl) and kl > self.config["approx_kl_max"]:
            problems.append((kl, self.config["approx_kl_max"], f"approx_kl {kl:.4g} > {self.config['approx_kl_max']:g}"))
        self._explosion_run = self._explosion_run + 1 if problems else 0
        if not problems:
            return False, 0.0, 0.0, ""
        value, limit, _ = problems[0]
        fired = self._explosion_run >= self.config["explosion_patience"]
        return fired, value, limit, "; ".join(p[2] for p in problems) + f" ({self._explosion_run} steps in a row)"

    # ---- public --------------------------------------------------------------------------
    def update(self, step: int, metrics: Mapping[str, Any]) -> list[Verdict]:
        """Judge one step's metrics. Returns the verdicts that started at this step (new episodes).

        `self.last_flags` afterwards holds `monitor/<kind>`: 1.0 / 0.0 for each kind that could be
        judged at this step.
        """
        self.steps_seen += 1
        collapse, fall = self._entropy(metrics)
        results = {
            "non_finite": self._non_finite(metrics),
            "entropy_collapse": collapse,
            "entropy_fall": fall,
            "reward_crash": self._reward(metrics),
            "length_blowup": self._length(metrics),
            "repetition": self._repetition(metrics),
            "clip_explosion": self._clip(metrics),
            "ratio_explosion": self._ratio(metrics),
        }
        started: list[Verdict] = []
        self.last_flags = {}
        for kind, result in results.items():
            if result is None:
                continue
            fired, value, limit, message = result
            self.last_flags[f"monitor/{kind}"] = 1.0 if fired else 0.0
            was_active = self._active.get(kind, False)
            self._active[kind] = bool(fired)
            if not fired:
                continue
            verdict = self.verdicts.get(kind)
            if verdict is None:
                verdict = self.verdicts[kind] = Verdict(kind, SEVERITY[kind], int(step), message, float(value), float(limit))
            verdict.last_step = int(step)
            verdict.steps_active += 1
            if not was_active:
                verdict.episodes += 1
                started.append(Verdict(kind, SEVERITY[kind], int(step), message, float(value), float(limit),
                                       last_step=int(step), steps_active=1, episodes=1))
        return started

    def active(self) -> list[str]:
        """Kinds whose condition held at the last step."""
        return [kind for kind, on in self._active.items() if on]

    @property
    def healthy(self) -> bool:
        return not self.verdicts

    def summary(self) -> dict[str, Any]:
        """The content of monitor.json: verdicts in order of appearance, and each kind's first step."""
        verdicts = sorted(self.verdicts.values(), key=lambda v: (v.first_step, KINDS.index(v.kind)))
        return {
            "verdicts": [v.to_dict() for v in verdicts],
            "first_step": {v.kind: v.first_step for v in verdicts},
            "healthy": self.healthy,
            "steps_seen": self.steps_seen,
            "config": self.config,
        }


def _line_ends(values: list[float]) -> tuple[float, float]:
    """Least-squares line through (i, values[i]); its values at the first and the last index."""
    n = len(values)
    mean_x = (n - 1) / 2
    mean_y = sum(values) / n
    sxx = sum((i - mean_x) ** 2 for i in range(n))
    slope = sum((i - mean_x) * (y - mean_y) for i, y in enumerate(values)) / sxx
    return mean_y - slope * mean_x, mean_y + slope * (n - 1 - mean_x)


def write_monitor_file(monitor: StabilityMonitor, run_dir: str | os.PathLike, **extra: Any) -> Path:
    """Write `run_dir/monitor.json` (atomically, so a reader never sees half a file)."""
    return write_json(Path(run_dir) / MONITOR_FILE, {**monitor.summary(), **extra})


def replay_metrics(rows: Iterable[Mapping[str, Any]], **thresholds: Any) -> StabilityMonitor:
    """Run a fresh monitor over recorded metrics rows (each with a `step`); used for runs made without one."""
    monitor = StabilityMonitor(**thresholds)
    for index, row in enumerate(rows):
        step = row.get("step")
        monitor.update(int(step) if isinstance(step, (int, float)) and not isinstance(step, bool) else index + 1, row)
    return monitor
