"""Objectives side by side over seeds: plan and run the training runs, then load and summarise them.

Running (`tepo compare`): one `tepo train` subprocess per (objective, seed), one at a time, each in
`DIR/runs/<objective>-s<seed>/` with its log in `train.log`. Every run gets the same arguments
except `--objective` and `--seed`, so within a seed only the objective varies and within an
objective only the seed (which drives data order and sampling). Each objective trains on the
advantages it is defined with (`scale_rewards` left unset: `tepo.objectives.advantage_scale`, "none"
for dr_grpo, "group" for the others) unless the training arguments or the recipe set `scale_rewards`
for all; each run's scale is recorded in compare.json. A run is finished when its `DONE`
marker (written here after the trainer exits 0) or its `eval_after.json` exists. A rerun skips
finished runs, and runs that failed (non-zero exit, e.g. stopped for non-finite values: that is a
result too) unless `retry_failed`; it starts pending and interrupted runs, after moving what an
earlier attempt left to `DIR/failed/` (or, with `resume`, leaving it in place and asking the
trainer to `--resume_from_checkpoint true`). `DIR/compare.json` holds the plan and every run's status.

Loading (`tepo report`): `load_comparison(DIR)` reads each run's metrics.jsonl, eval files, any
evaluation results.json and monitor verdicts; the functions below aggregate them over seeds.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

COMPARE_FILE = "compare.json"
DONE_FILE = "DONE"
# compare.json / folder statuses of runs whose last logged point is not a final result
UNFINISHED_STATUSES = ("running", "pending", "interrupted", "partial", "empty", "unknown")
LOG_FILE = "train.log"
RUN_NAME = re.compile(r"^(?P<objective>.+)-s(?P<seed>\d+)$")
# Options `tepo compare` sets per run; passing them as extra train arguments would break the design.
CONTROLLED = ("--objective", "--seed", "--output_dir")

Runner = Callable[[Sequence[str], Path, Mapping[str, str]], int]


def default_train_command() -> list[str]:
    return [sys.executable, "-m", "tepo.cli", "train"]


def registered_objectives() -> list[str]:
    """Names the objective registry knows (`tepo.objectives.list_objectives()`)."""
    try:
        from tepo.objectives import list_objectives
    except ImportError as err:  # the registry is another module's job; say what is missing
        raise RuntimeError(f"cannot validate objective names: tepo.objectives.list_objectives is unavailable ({err})") from err
    return list(list_objectives())


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------
# planning and running
# --------------------------------------------------------------------------------------------
@dataclass
class RunSpec:
    """One training run of the comparison."""

    objective: str
    seed: int
    run_dir: Path
    command: list[str]
    scale_rewards: str = ""  # the advantage scale the run trains with ("" when not known here)

    @property
    def name(self) -> str:
        return run_name(self.objective, self.seed)


def run_name(objective: str, seed: int) -> str:
    return f"{objective}-s{seed}"


def parse_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"--{what}: expected a comma-separated list, got {text!r}")
    dupes = sorted({t for t in items if items.count(t) > 1})
    if dupes:
        raise ValueError(f"--{what}: listed more than once: {', '.join(dupes)}")
    return items


def parse_seeds(text: str) -> list[int]:
    seeds = []
    for item in parse_list(text, "seeds"):
        try:
            seed = int(item)
        except ValueError:
            raise ValueError(f"--seeds: {item!r} is not an integer") from None
        if seed < 0:
            raise ValueError(f"--seeds: seeds must be >= 0, got {seed}")
        seeds.append(seed)
    return seeds


def plan_comparison(
    objectives: Sequence[str],
    seeds: Sequence[int],
    output_dir: str | os.PathLike,
    train_args: Sequence[str],
    *,
    train_command: Sequence[str] | None = None,
    known_objectives: Iterable[str] | None = None,
) -> list[RunSpec]:
    """The runs, seed-major (every objective for seed 0, then seed 1, ...), so a comparison cut
    short is still balanced across objectives. `train_args` are shared by every run."""
    known = list(registered_objectives() if known_objectives is None else known_objectives)
    unknown = [o for o in objectives if o not in known]
    if unknown:
        raise ValueError(f"unknown objective(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
    if not objectives or not seeds:
        raise ValueError("need at least one objective and one seed")
    for arg in train_args:
        if arg.split("=", 1)[0] in CONTROLLED:
            raise ValueError(f"{arg.split('=', 1)[0]} is set per run by tepo compare; remove it from the training arguments")
    command = list(train_command) if train_command is not None else default_train_command()
    runs_dir = Path(output_dir).resolve() / "runs"
    shared_scale = scale_rewards_set_in(train_args)
    plan = []
    for seed in seeds:
        for objective in objectives:
            run_dir = runs_dir / run_name(objective, seed)
            cmd = [*command, "--objective", objective, "--seed", str(seed), "--output_dir", str(run_dir), *train_args]
            plan.append(RunSpec(objective, int(seed), run_dir, cmd, shared_scale or objective_scale(objective)))
    return plan


def scale_rewards_set_in(train_args: Sequence[str]) -> str | None:
    """The `scale_rewards` the training arguments set for every run (`--scale_rewards X`, or the
    `--config` recipe's), or None: each run takes its objective's own."""
    args = list(train_args)
    for i, arg in enumerate(args):
        name, _, value = arg.partition("=")
        if name == "--scale_rewards":
            return value or (args[i + 1] if i + 1 < len(args) else None)
    for i, arg in enumerate(args):
        name, _, value = arg.partition("=")
        if name != "--config":
            continue
        recipe = value or (args[i + 1] if i + 1 < len(args) else "")
        if recipe and Path(recipe).is_file():
            import yaml

            settings = yaml.safe_load(Path(recipe).read_text()) or {}
            scale = settings.get("scale_rewards") if isinstance(settings, dict) else None
            if scale is not None:
                return {True: "group", False: "none"}.get(scale, str(scale))  # TRL reads booleans so
    return None


def objective_scale(objective: str) -> str:
    """The advantage scale `objective` is defined with, "" when the registry does not know it."""
    try:
        from tepo.objectives import advantage_scale

        return advantage_scale(objective)
    except (ImportError, KeyError, ValueError):
        return ""


def is_finished(run_dir: Path) -> bool:
    return (run_dir / DONE_FILE).exists() or (run_dir / "eval_after.json").exists()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def subprocess_runner(command: Sequence[str], log_path: Path, env: Mapping[str, str], *,
                      preexec_fn=None, stop_wait_s: float = 30) -> int:
    """Run `command`, stdout and stderr into `log_path`; its exit status. Ctrl-C stops the child too
    (terminated, killed after `stop_wait_s`); `preexec_fn` runs in the child before it starts."""
    with open(log_path, "ab") as log:
        log.write(f"$ {shlex.join(command)}\n".encode())
        log.flush()
        proc = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, env=dict(env),
                                preexec_fn=preexec_fn)
        try:
            return proc.wait()
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=stop_wait_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise


@contextlib.contextmanager
def _cpu_lock(path: str | None):
    """Hold an exclusive flock on `path` (the shared CPU lock) while a run trains."""
    if not path:
        yield
        return
    import fcntl

    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _set_aside(run_dir: Path, failed_dir: Path) -> Path:
    """Move an unfinished attempt's folder to failed_dir/<name>.<k> so the rerun starts clean."""
    failed_dir.mkdir(parents=True, exist_ok=True)
    k = 1
    while (failed_dir / f"{run_dir.name}.{k}").exists():
        k += 1
    target = failed_dir / f"{run_dir.name}.{k}"
    shutil.move(str(run_dir), str(target))
    return target


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def run_comparison(
    plan: Sequence[RunSpec],
    output_dir: str | os.PathLike,
    train_args: Sequence[str],
    *,
    runner: Runner | None = None,
    fail_fast: bool = False,
    cpu_lock: str | None = None,
    allow_setup_change: bool = False,
    resume: bool = False,
    retry_failed: bool = False,
    settings: Mapping[str, Any] | None = None,
    echo: Callable[[str], None] = lambda s: print(s, flush=True),
) -> dict[str, Any]:
    """Run every unfinished run of `plan` one at a time; write DIR/compare.json as it goes.

    Returns the compare.json content. A run whose DONE marker records other training arguments
    than `train_args` stops everything (mixing setups would make the comparison meaningless),
    unless `allow_setup_change`.
    """
    runner = runner or subprocess_runner
    out = Path(output_dir).resolve()
    (out / "runs").mkdir(parents=True, exist_ok=True)
    state_path = out / COMPARE_FILE
    previous = _read_json(state_path) if state_path.exists() else {}
    prev_runs = {r["name"]: r for r in previous.get("runs", [])}
    state: dict[str, Any] = {
        "created": previous.get("created", _now()),
        "updated": _now(),
        "objectives": list(dict.fromkeys(r.objective for r in plan)),
        "seeds": list(dict.fromkeys(r.seed for r in plan)),
        "train_args": list(train_args),
        "settings": dict(settings or {}),
        "runs": [],
    }
    records = []
    for spec in plan:
        record = {"name": spec.name, "objective": spec.objective, "seed": spec.seed, "run_dir": str(spec.run_dir),
                  "log": str(spec.run_dir / LOG_FILE), "command": list(spec.command), "status": "pending",
                  "scale_rewards": spec.scale_rewards,
                  "attempts": prev_runs.get(spec.name, {}).get("attempts", 0)}
        records.append(record)
    state["runs"] = records

    def save() -> None:
        state["updated"] = _now()
        _write_json(state_path, state)

    # Refuse to mix setups before anything is launched.
    for spec, record in zip(plan, records):
        if (spec.run_dir / DONE_FILE).exists():
            done = _read_json(spec.run_dir / DONE_FILE)
            if done.get("train_args") is not None and list(done["train_args"]) != list(train_args) and not allow_setup_change:
                raise ValueError(
                    f"{spec.run_dir} finished with other training arguments than this comparison:\n"
                    f"  then: {shlex.join(done['train_args'])}\n  now:  {shlex.join(train_args)}\n"
                    "use another --output_dir, or --allow_setup_change to keep the finished runs anyway"
                )

    todo, failed_before = [], []
    for spec, record in zip(plan, records):
        prev = prev_runs.get(spec.name, {})
        finished = is_finished(spec.run_dir)
        if finished or (prev.get("status") == "failed" and not retry_failed):
            record["status"] = "done" if finished else "failed"
            for key in ("started", "finished", "duration_s", "returncode"):
                if key in prev:
                    record[key] = prev[key]
            if not finished:
                failed_before.append(f"{spec.name} (exit status {prev.get('returncode')})")
        else:
            todo.append((spec, record))
    save()
    n_total = len(plan)
    echo(f"tepo compare: {n_total} runs planned ({len(state['objectives'])} objectives x {len(state['seeds'])} seeds), "
         f"{n_total - len(todo) - len(failed_before)} already finished, {len(todo)} to run; state in {state_path}")
    if failed_before:
        echo(f"tepo compare: not retrying runs that failed before: {', '.join(failed_before)} (--retry_failed to run them again)")

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    durations: list[float] = []
    failures = 0
    for index, (spec, record) in enumerate(todo, start=1):
        prefix = f"[{index}/{len(todo)}] {spec.name}"
        command = list(spec.command)
        if resume and spec.run_dir.exists() and any(spec.run_dir.iterdir()):
            echo(f"{prefix}: an earlier attempt left files; running again in place (--resume)")
            if not any(a.split("=", 1)[0] == "--resume_from_checkpoint" for a in command):
                command += ["--resume_from_checkpoint", "true"]
        elif spec.run_dir.exists() and any(spec.run_dir.iterdir()):
            moved = _set_aside(spec.run_dir, out / "failed")
            why = prev_runs.get(spec.name, {}).get("status", "unfinished")
            echo(f"{prefix}: an earlier attempt ({why}) left files; moved them to {moved} and running again")
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        log_path = spec.run_dir / LOG_FILE
        record.update(status="running", started=_now(), attempts=record["attempts"] + 1)
        for key in ("finished", "duration_s", "returncode"):
            record.pop(key, None)
        save()
        eta = ""
        if durations:
            eta = f", about {_duration(sum(durations) / len(durations) * (len(todo) - index + 1))} left"
        echo(f"{prefix}: running (log: {log_path}{eta})")
        start = time.monotonic()
        try:
            with _cpu_lock(cpu_lock):
                rc = runner(command, log_path, env)
        except KeyboardInterrupt:
            record.update(status="interrupted", finished=_now(), duration_s=round(time.monotonic() - start, 1))
            save()
            echo(f"{prefix}: interrupted; rerun the same command to carry on")
            raise
        elapsed = time.monotonic() - start
        durations.append(elapsed)
        record.update(finished=_now(), duration_s=round(elapsed, 1), returncode=rc)
        if rc == 0:
            _write_json(spec.run_dir / DONE_FILE, {"returncode": 0, "finished": record["finished"],
                                                     "duration_s": record["duration_s"], "command": command,
                                                     "train_args": list(train_args)})
            record["status"] = "done"
            save()
            after = spec.run_dir / "eval_after.json"
            extra = ""
            if after.exists():
                with contextlib.suppress(ValueError, TypeError, KeyError):
                    extra = f", held-out accuracy {float(_read_json(after)['accuracy']):.3f}"
            echo(f"{prefix}: done in {_duration(elapsed)}{extra}")
        else:
            failures += 1
            record["status"] = "failed"
            save()
            echo(f"{prefix}: FAILED (exit status {rc}) after {_duration(elapsed)}; last lines of {log_path}:\n{_tail(log_path)}")
            if fail_fast:
                echo("stopping (--fail_fast); rerun to retry the failed run and carry on")
                break
    for record in records:
        if record["status"] == "running":  # cannot happen unless a runner misbehaves; keep the file honest
            record["status"] = "unknown"
    save()
    counts = {s: sum(r["status"] == s for r in records) for s in ("done", "failed", "pending")}
    echo(f"tepo compare: {counts['done']}/{n_total} done, {counts['failed']} failed, {counts['pending']} not run; "
         f"report with: tepo report {out}")
    state["failures"] = failures
    return state


# --------------------------------------------------------------------------------------------
# loading and summarising
# --------------------------------------------------------------------------------------------
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
class Comparison:
    root: Path
    runs: list[RunData]
    state: dict  # compare.json, or {} when the folder has none

    @property
    def objectives(self) -> list[str]:
        planned = self.state.get("objectives") or []
        seen = [r.objective for r in self.runs]
        return list(dict.fromkeys([o for o in planned if o in seen] + seen))

    def by_objective(self, ended_only: bool = False) -> dict[str, list[RunData]]:
        """Runs per objective, by seed; ended_only leaves out unfinished runs (for final results)."""
        runs = [r for r in self.runs if not (ended_only and r.unfinished)]
        grouped = {o: sorted((r for r in runs if r.objective == o), key=lambda r: r.seed) for o in self.objectives}
        return {o: rs for o, rs in grouped.items() if rs or not ended_only}


def read_metrics(path: Path) -> tuple[list[dict], list[str]]:
    """Rows of a metrics.jsonl; a torn last line (run still writing) is dropped with a warning."""
    rows, warnings = [], []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                warnings.append(f"{path}: last line is incomplete, ignored")
                continue
            raise ValueError(f"{path}, line {number}: not valid JSON ({err})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows, warnings


def _find_results(run_dir: Path) -> Path | None:
    """The newest evaluation results.json under a run folder (checkpoints included), if any."""
    found = [p for p in run_dir.rglob("results.json") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def load_run(run_dir: Path, objective: str, seed: int, status: str = "") -> RunData:
    from tepo.training.monitor import MONITOR_FILE, replay_metrics

    run = RunData(name=run_dir.name, objective=objective, seed=seed, run_dir=run_dir, status=status)
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        run.rows, run.warnings = read_metrics(metrics)
    for attr, filename in (("eval_before", "eval_before.json"), ("eval_after", "eval_after.json")):
        path = run_dir / filename
        if path.exists():
            data = _read_json(path)
            if not isinstance(data, dict) or not isinstance(data.get("accuracy"), (int, float)):
                raise ValueError(f"{path}: expected an object with a numeric 'accuracy'")
            setattr(run, attr, data)
    run.results_path = _find_results(run_dir)
    if run.results_path is not None:
        data = _read_json(run.results_path)
        if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), dict):
            raise ValueError(f"{run.results_path}: expected an object with 'benchmarks'")
        run.results = data
    monitor_path = run_dir / MONITOR_FILE
    if monitor_path.exists():
        run.monitor, run.monitor_source = _read_json(monitor_path), "monitor.json"
    elif run.rows:
        run.monitor, run.monitor_source = replay_metrics(run.rows).summary(), "replayed from metrics.jsonl"
    if not status:
        run.status = "done" if is_finished(run_dir) else ("partial" if run.rows else "empty")
    return run


def load_comparison(root: str | os.PathLike) -> Comparison:
    """Read DIR/compare.json (if any) and every DIR/runs/<objective>-s<seed>/ folder."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"comparison folder {root} does not exist")
    state = _read_json(root / COMPARE_FILE) if (root / COMPARE_FILE).exists() else {}
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
    return Comparison(root=root, runs=runs, state=state)


# ---- statistics ------------------------------------------------------------------------------
def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b), by its continued fraction (modified Lentz)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast only below this point
        return 1.0 - _betainc(b, a, 1.0 - x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return math.exp(log_front) * h / a


def t_cdf(t: float, df: float) -> float:
    """Student-t cumulative distribution function."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Inverse of `t_cdf` (bisection; exact to ~1e-12)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile: need 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
        if hi - lo < 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def mean_std_ci(values: Iterable[float], confidence: float = 0.95) -> dict[str, float]:
    """Mean, sample std (ddof=1), and the Student-t confidence interval of the mean over `values`
    (seeds). With one value std and the interval are NaN."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    n = int(v.size)
    if n == 0:
        return {"n": 0, "mean": math.nan, "std": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    mean = float(v.mean())
    if n == 1:
        return {"n": 1, "mean": mean, "std": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    std = float(v.std(ddof=1))
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half}


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
        return float(run.eval_after["accuracy"]), "eval_after.json"
    steps, values = run.series("heldout_accuracy")
    if values.size:
        return float(values[-1]), f"metrics.jsonl, step {int(steps[-1])}"
    return math.nan, ""


def first_step_reaching(steps: np.ndarray, values: np.ndarray, target: float) -> float | None:
    """The first step whose value is >= target, or None."""
    hits = np.nonzero(np.asarray(values) >= target)[0]
    return float(np.asarray(steps)[hits[0]]) if hits.size else None


def accuracy_table(comparison: Comparison, confidence: float = 0.95) -> list[dict[str, Any]]:
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


def steps_to_target(comparison: Comparison, target: float | None = None, smooth: int = 5) -> dict[str, Any]:
    """Steps each run needs to reach a target performance, per objective.

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
        reached = {r.seed: first_step_reaching(*series[r.name], chosen) for r in measured}
        steps = [s for s in reached.values() if s is not None]
        per_objective[objective] = {"per_seed": reached, "reached": len(steps), "runs": len(measured),
                                    "steps": mean_std_ci(steps)}
    return {"metric": metric, "target": chosen, "start": start, "best_final": best,
            "target_given": target is not None, "per_objective": per_objective, "problem": problem}
