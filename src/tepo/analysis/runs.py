"""One reader of a run folder (`tepo.run_folder` names the files) and the numbers read off a run.

`load_run(folder)` gives a `RunData`: metrics.jsonl rows, eval_before/eval_after/eval_test, any
`tepo eval` results.json, and the stability monitor's verdicts (monitor.json, or replayed from the
metrics). A `RunSet` is runs grouped by objective (or study arm), the unit every table and plot
of `tepo report` and `tepo study report` takes.

Steps to a target, the one rule (`steps_to_reach`): the first evaluated step whose value is >= the
target; a run that never reaches it counts as its last evaluated step plus one evaluation interval
and is marked as not reached: a lower bound, so that it counts as slower than any run that did.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tepo.analysis.stats import mean_std_ci
from tepo.run_folder import (
    EVAL_AFTER_FILE,
    EVAL_BEFORE_FILE,
    EVAL_TEST_FILE,
    METRICS_FILE,
    MONITOR_FILE,
    find_results,
    is_finished,
    read_accuracy,
    read_json,
    read_metrics,
)

# statuses of runs whose last logged point is not a final result
UNFINISHED_STATUSES = ("running", "pending", "interrupted", "partial", "empty", "unknown", "todo")
COMPARE_FILE = "compare.json"  # a comparison's plan and run statuses (tepo compare)
RUN_NAME = re.compile(r"^(?P<objective>.+)-s(?P<seed>\d+)$")


@dataclass
class RunData:
    """Everything one run left on disk."""

    name: str
    objective: str
    seed: int
    run_dir: Path
    rows: list[dict] = field(default_factory=list)
    eval_before: dict | None = None
    eval_after: dict | None = None
    eval_test: dict | None = None
    results: dict | None = None  # the evaluation results.json content, when one exists
    results_path: Path | None = None
    monitor: dict | None = None
    monitor_source: str = ""
    status: str = ""
    warnings: list[str] = field(default_factory=list)

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of a metric over the rows where it is a finite number, in step order."""
        steps, values = [], []
        for index, row in enumerate(self.rows):
            value = row.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                step = row.get("step", index + 1)
                steps.append(float(step))
                values.append(float(value))
        order = np.argsort(steps, kind="stable")
        return np.asarray(steps)[order], np.asarray(values)[order]

    @property
    def unfinished(self) -> bool:
        """Still training, waiting, stopped by hand, or without any end marker: its last point is not
        its final result. (A run that failed, e.g. stopped by the monitor, has ended: it counts.)"""
        return self.status in UNFINISHED_STATUSES

    @property
    def last_step(self) -> float | None:
        steps = [r["step"] for r in self.rows if isinstance(r.get("step"), (int, float))]
        return float(max(steps)) if steps else None


@dataclass
class RunSet:
    """Runs grouped by objective (a study's runs: by arm, `RunData.objective` holding the arm's name),
    the unit the tables and plots take. `state` is a comparison's compare.json ({} otherwise)."""

    root: Path
    runs: list[RunData]
    state: dict = field(default_factory=dict)
    order: list[str] | None = None  # the groups' order (default: compare.json's objectives, then as found)

    @property
    def objectives(self) -> list[str]:
        planned = self.order or self.state.get("objectives") or []
        seen = [r.objective for r in self.runs]
        return list(dict.fromkeys([o for o in planned if o in seen] + seen))

    def by_objective(self, ended_only: bool = False) -> dict[str, list[RunData]]:
        """Runs per objective, by seed; ended_only leaves out unfinished runs (for final results)."""
        runs = [r for r in self.runs if not (ended_only and r.unfinished)]
        grouped = {o: sorted((r for r in runs if r.objective == o), key=lambda r: r.seed) for o in self.objectives}
        return {o: rs for o, rs in grouped.items() if rs or not ended_only}


def load_run(run_dir: Path, objective: str, seed: int, status: str = "") -> RunData:
    """Everything a run folder holds; status "done" / "partial" / "empty" from the folder when not given."""
    run_dir = Path(run_dir)
    from tepo.stability import replay_metrics

    run = RunData(name=run_dir.name, objective=objective, seed=seed, run_dir=run_dir, status=status)
    metrics = run_dir / METRICS_FILE
    if metrics.exists():
        run.rows = read_metrics(metrics, run.warnings)
    for attr, filename in (("eval_before", EVAL_BEFORE_FILE), ("eval_after", EVAL_AFTER_FILE), ("eval_test", EVAL_TEST_FILE)):
        path = run_dir / filename
        if path.exists():
            setattr(run, attr, read_accuracy(path))
    run.results_path = find_results(run_dir)
    if run.results_path is not None:
        data = read_json(run.results_path)
        if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), dict):
            raise ValueError(f"{run.results_path}: expected an object with 'benchmarks'")
        run.results = data
    monitor_path = run_dir / MONITOR_FILE
    if monitor_path.exists():
        run.monitor, run.monitor_source = read_json(monitor_path), MONITOR_FILE
    elif run.rows:
        run.monitor, run.monitor_source = replay_metrics(run.rows).summary(), "replayed from metrics.jsonl"
    if not status:
        run.status = "done" if is_finished(run_dir) else ("partial" if run.rows else "empty")
    return run


def load_comparison(root: str | os.PathLike) -> RunSet:
    """Read DIR/compare.json (if any) and every DIR/runs/<objective>-s<seed>/ folder."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"comparison folder {root} does not exist")
    state = read_json(root / COMPARE_FILE) if (root / COMPARE_FILE).exists() else {}
    statuses = {r["name"]: r.get("status", "") for r in state.get("runs", [])}
    runs_dir = root / "runs"
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"{root} has no runs/ folder (is it a `tepo compare` output folder?)")
    runs = []
    for run_dir in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        match = RUN_NAME.match(run_dir.name)
        if not match:
            continue
        runs.append(load_run(run_dir, match["objective"], int(match["seed"]), statuses.get(run_dir.name, "")))
    if not runs:
        raise FileNotFoundError(f"no run folders named <objective>-s<seed> under {runs_dir}")
    return RunSet(root=root, runs=runs, state=state)


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last `window` values (fewer at the start)."""
    values = np.asarray(values, dtype=np.float64)
    if window <= 1 or values.size == 0:
        return values
    csum = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, values.size + 1)
    start = np.maximum(idx - window, 0)
    return (csum[idx] - csum[start]) / (idx - start)


@dataclass
class Band:
    """A metric over steps, across seeds: mean, std, min, max, and how many seeds logged each step."""

    steps: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    low: np.ndarray
    high: np.ndarray
    count: np.ndarray


def aggregate_over_seeds(series: Sequence[tuple[np.ndarray, np.ndarray]]) -> Band | None:
    """Combine per-seed (steps, values) on the union of their steps."""
    series = [(s, v) for s, v in series if len(s)]
    if not series:
        return None
    steps = np.unique(np.concatenate([s for s, _ in series]))
    table = np.full((len(series), steps.size), np.nan)
    for i, (s, v) in enumerate(series):
        table[i, np.searchsorted(steps, s)] = v
    count = np.isfinite(table).sum(axis=0)
    with np.errstate(invalid="ignore"), warnings_suppressed():
        mean = np.nanmean(table, axis=0)
        std = np.where(count > 1, np.nanstd(table, axis=0, ddof=1), np.nan)
        low, high = np.nanmin(table, axis=0), np.nanmax(table, axis=0)
    return Band(steps, mean, std, low, high, count)


@contextlib.contextmanager
def warnings_suppressed():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def heldout_series(run: RunData) -> tuple[np.ndarray, np.ndarray]:
    """Held-out accuracy against step: the periodic evaluations in metrics.jsonl, with eval_before
    at step 0 when those exist; else just before (step 0) and after (last step)."""
    steps, values = run.series("heldout_accuracy")
    if steps.size:
        if run.eval_before is not None and steps[0] > 0:
            steps = np.insert(steps, 0, 0.0)
            values = np.insert(values, 0, float(run.eval_before["accuracy"]))
        return steps, values
    points = []
    if run.eval_before is not None:
        points.append((0.0, float(run.eval_before["accuracy"])))
    if run.eval_after is not None:
        points.append((run.last_step or 1.0, float(run.eval_after["accuracy"])))
    return np.asarray([p[0] for p in points]), np.asarray([p[1] for p in points])


def final_accuracy(run: RunData) -> tuple[float, str]:
    """The run's final held-out accuracy and where it came from."""
    if run.eval_after is not None:
        return float(run.eval_after["accuracy"]), EVAL_AFTER_FILE
    steps, values = run.series("heldout_accuracy")
    if values.size:
        return float(values[-1]), f"metrics.jsonl, step {int(steps[-1])}"
    return math.nan, ""


def steps_to_reach(steps: np.ndarray, values: np.ndarray, target: float) -> tuple[float, bool]:
    """(the first step whose value is >= target, True) or, when never reached, (the last evaluated
    step + the evaluation interval, False): a lower bound, so that runs that never reach the target
    count as slower than any that did. NaN when nothing was evaluated."""
    steps, values = np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if steps.size == 0:
        return math.nan, False
    hits = np.nonzero(values >= target - 1e-12)[0]
    if hits.size:
        return float(steps[hits[0]]), True
    interval = float(steps[-1] - steps[-2]) if steps.size > 1 else float(steps[-1] or 1.0)
    return float(steps[-1] + interval), False


def accuracy_table(comparison: RunSet, confidence: float = 0.95) -> list[dict[str, Any]]:
    """Per objective: held-out accuracy before and after training over seeds, with a t-interval."""
    table = []
    for objective, runs in comparison.by_objective(ended_only=True).items():
        finals = [(r.seed, *final_accuracy(r)) for r in runs]
        before = [float(r.eval_before["accuracy"]) for r in runs if r.eval_before is not None]
        after = mean_std_ci([a for _, a, _ in finals], confidence)
        gains = [final_accuracy(r)[0] - float(r.eval_before["accuracy"]) for r in runs if r.eval_before is not None]
        problems = sorted({int(r.eval_after["num_problems"]) for r in runs if r.eval_after and "num_problems" in r.eval_after})
        table.append({
            "objective": objective, "seeds": [s for s, a, _ in finals if math.isfinite(a)],
            "per_seed": {s: a for s, a, _ in finals}, "sources": sorted({src for _, _, src in finals if src}),
            "before": mean_std_ci(before, confidence)["mean"], "after": after,
            "gain": mean_std_ci(gains, confidence), "num_problems": problems,
        })
    return table


def steps_to_target(comparison: RunSet, target: float | None = None, smooth: int = 5) -> dict[str, Any]:
    """Steps each run needs to reach a target performance, per objective (the rule of `steps_to_reach`:
    a run that never reaches it counts as its last evaluated step plus one interval, a lower bound).

    Uses held-out accuracy when every objective has a run with at least two periodic held-out
    evaluations; unfinished runs are left out. The default target is then
    the midpoint between the mean accuracy before training and the best objective's mean final
    accuracy. Otherwise it uses the training reward (trailing mean over `smooth` steps), target =
    midpoint between its mean initial and the best objective's mean final value.
    """
    by_objective = comparison.by_objective(ended_only=True)  # an unfinished run's last point is not its end
    runs = [r for rs in by_objective.values() for r in rs]
    use_heldout = bool(runs) and all(any(r.series("heldout_accuracy")[0].size >= 2 for r in rs)
                                     for rs in by_objective.values())
    series: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if use_heldout:
        metric = "held-out accuracy"
        for r in runs:
            series[r.name] = heldout_series(r) if r.series("heldout_accuracy")[0].size else (np.array([]), np.array([]))
        starts = [v[0] for s, v in series.values() if v.size]
        ends = {o: mean_std_ci([final_accuracy(r)[0] for r in rs])["mean"] for o, rs in by_objective.items()}
    else:
        metric = f"training reward (mean over {smooth} steps)" if smooth > 1 else "training reward"
        for r in runs:
            s, v = r.series("reward_mean")
            series[r.name] = (s, moving_average(v, smooth))
        starts = [float(np.mean(r.series("reward_mean")[1][:smooth])) for r in runs if r.series("reward_mean")[1].size]
        ends = {o: mean_std_ci([float(np.mean(r.series("reward_mean")[1][-smooth:])) for r in rs if r.series("reward_mean")[1].size])["mean"]
                for o, rs in by_objective.items()}
    finite_ends = [e for e in ends.values() if math.isfinite(e)]
    start = float(np.mean(starts)) if starts else math.nan
    best = max(finite_ends) if finite_ends else math.nan
    chosen = float(target) if target is not None else (start + best) / 2.0
    problem = ""
    if target is None and not best > start:  # also NaN: nothing to measure progress against
        problem = "no objective ended above the start, so there is no default target (give one with --target)"
        chosen = math.nan
    per_objective = {}
    for objective, rs in by_objective.items():
        measured = [r for r in rs if series[r.name][0].size] if not problem else []
        found = {r.seed: steps_to_reach(*series[r.name], chosen) for r in measured}
        per_objective[objective] = {"per_seed": {s: step for s, (step, _) in found.items()},
                                    "reached_per_seed": {s: hit for s, (_, hit) in found.items()},
                                    "reached": sum(hit for _, hit in found.values()), "runs": len(measured),
                                    "steps": mean_std_ci([step for step, _ in found.values()])}
    return {"metric": metric, "target": chosen, "start": start, "best_final": best,
            "target_given": target is not None, "per_objective": per_objective, "problem": problem}
