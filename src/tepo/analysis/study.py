"""Studies: a YAML file that says what to train, how each method's open settings are chosen, and
how the chosen ones are compared (docs/study.md has the format and the rules).

A study has two stages. Tuning: each arm with a `grid` trains once per (setting, tuning seed) and
is scored on the validation split. Final: each arm at its selected setting trains once per final
seed, with the validation split evaluated during training (for steps-to-target) and the test split,
which tuning never sees, evaluated once at the end with per-problem verdicts.

Runs are the unit of work. `run_study` trains, one at a time, every run whose results folder has
no DONE.json, each in its work folder under `runs_dir` (checkpoints, weights, log: never committed)
and resumed from its last checkpoint when an earlier attempt left one; when a run ends it copies
the run's small files (SMALL_FILES) into its results folder under `results_dir` and writes
DONE.json last, so a results folder with DONE.json is complete. A killed study rerun with the same
command carries on where it stopped.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import itertools
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from tepo.analysis.compare import _cpu_lock, _duration, _tail
from tepo.analysis.compare import subprocess_runner as compare_runner

DONE_FILE = "DONE.json"
FAILED_FILE = "FAILED.json"
LOG_FILE = "train.log"
SMALL_FILES = ("run.json", "metrics.jsonl", "eval_before.json", "eval_after.json", "eval_test.json", "monitor.json")
STAGES = ("tuning", "final")
STUDY_KEYS = {"name", "description", "recipe", "base", "validation_problems", "test_problems", "target",
              "arms", "tuning", "final", "results_dir", "runs_dir", "model"}
# tepo train options the study sets per run (the split each stage evaluates on, the seed, the folder)
CONTROLLED = {"seed", "output_dir", "heldout_split", "reserve_validation", "heldout_num_problems", "test_num_problems",
              "resume_from_checkpoint", "heldout_eval", "heldout_data", "data", "config"}

Runner = Callable[[Sequence[str], Path, Mapping[str, str]], int]


class StudyError(ValueError):
    """A study file that cannot be run as written, or results that do not match it."""


# --------------------------------------------------------------------------------------------
# the study file
# --------------------------------------------------------------------------------------------
@dataclass
class Study:
    name: str
    path: Path
    recipe: Path | None
    base: dict[str, Any]
    arms: dict[str, dict[str, Any]]
    grid: dict[str, list[dict[str, Any]]]  # arm -> settings, simplest first
    tuning_seeds: list[int]
    final_seeds: list[int]
    validation_problems: int
    test_problems: int
    target: float
    results_dir: Path
    runs_dir: Path
    tie_tolerance: float = 0.0
    description: str = ""
    model: str | None = None

    def recipe_digest(self) -> str:
        return hashlib.sha256(self.recipe.read_bytes()).hexdigest()[:16] if self.recipe else ""


def _scalar(value: Any, where: str) -> Any:
    if isinstance(value, (bool, int, float, str)) and not (isinstance(value, float) and not math.isfinite(value)):
        return value
    raise StudyError(f"{where}: expected a number, string or boolean, got {value!r}")


def _options(raw: Any, where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise StudyError(f"{where}: expected a mapping of tepo train options, got {type(raw).__name__}")
    out = {}
    for key, value in raw.items():
        key = str(key)
        if key in CONTROLLED:
            raise StudyError(f"{where}: {key!r} is set by the study for each run; remove it")
        out[key] = _scalar(value, f"{where}.{key}")
    return out


def _seeds(raw: Any, where: str) -> list[int]:
    if not isinstance(raw, list) or not raw or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in raw):
        raise StudyError(f"{where}: expected a non-empty list of seeds (integers >= 0), got {raw!r}")
    if len(set(raw)) != len(raw):
        raise StudyError(f"{where}: a seed is listed twice: {raw}")
    return list(raw)


def _grid(raw: Any, where: str) -> list[dict[str, Any]]:
    """A list of settings (mappings), or a mapping option -> list of values (their product, in order)."""
    if isinstance(raw, dict):
        keys = list(raw)
        lists = [raw[k] if isinstance(raw[k], list) else [raw[k]] for k in keys]
        raw = [dict(zip(keys, values)) for values in itertools.product(*lists)]
    if not isinstance(raw, list) or not raw:
        raise StudyError(f"{where}: expected a non-empty list of settings, or a mapping option -> list of values")
    settings = [_options(s, f"{where}[{i}]") for i, s in enumerate(raw)]
    if any(not s for s in settings):
        raise StudyError(f"{where}: an empty setting")
    if len({json.dumps(s, sort_keys=True) for s in settings}) != len(settings):
        raise StudyError(f"{where}: a setting is listed twice")
    return settings


def load_study(path: str | os.PathLike, *, results_dir: str | None = None, runs_dir: str | None = None) -> Study:
    """Read and check a study file. Relative `recipe` paths are relative to the study file;
    relative `results_dir` / `runs_dir` to the current directory (defaults results/<name>, runs/<name>)."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study file {path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise StudyError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise StudyError(f"{path}: expected a mapping at the top level")
    unknown = sorted(set(raw) - STUDY_KEYS)
    if unknown:
        raise StudyError(f"{path}: unknown key(s) {unknown}; known: {sorted(STUDY_KEYS)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_." for c in name):
        raise StudyError(f"{path}: 'name' must be a non-empty folder-safe string (letters, digits, - _ .), got {name!r}")
    recipe = None
    if raw.get("recipe") is not None:
        recipe = (path.parent / str(raw["recipe"])).resolve()
        if not recipe.is_file():
            raise StudyError(f"{path}: recipe {raw['recipe']!r} not found (looked at {recipe})")
    base = _options(raw.get("base"), "base")
    arms_raw = raw.get("arms")
    if not isinstance(arms_raw, dict) or not arms_raw:
        raise StudyError(f"{path}: 'arms' must map arm names to tepo train options, e.g. grpo: {{objective: grpo}}")
    arms = {}
    for arm, options in arms_raw.items():
        arm = str(arm)
        if not arm or not all(c.isalnum() or c in "-_." for c in arm):
            raise StudyError(f"{path}: arm name {arm!r} must be folder-safe (letters, digits, - _ .)")
        arms[arm] = _options(options, f"arms.{arm}")
    tuning = raw.get("tuning") or {}
    final = raw.get("final") or {}
    if not isinstance(tuning, dict) or not isinstance(final, dict):
        raise StudyError(f"{path}: 'tuning' and 'final' must be mappings")
    extra = sorted(set(tuning) - {"seeds", "grid", "tie_tolerance"}) + sorted(set(final) - {"seeds"})
    if extra:
        raise StudyError(f"{path}: unknown key(s) in tuning/final: {extra}")
    grid_raw = tuning.get("grid") or {}
    if not isinstance(grid_raw, dict):
        raise StudyError(f"{path}: tuning.grid must map arm names to settings")
    missing = sorted(set(grid_raw) - set(arms))
    if missing:
        raise StudyError(f"{path}: tuning.grid names arm(s) {missing} that are not in 'arms'")
    grid = {str(a): _grid(g, f"tuning.grid.{a}") for a, g in grid_raw.items()}
    for arm, settings in grid.items():
        clash = sorted({k for s in settings for k in s} & set(arms[arm]))
        if clash:
            raise StudyError(f"{path}: arm {arm} fixes {clash} and tunes it too; keep it in one place")
    tuning_seeds = _seeds(tuning.get("seeds", [0]), "tuning.seeds") if grid else []
    if "seeds" not in final:
        raise StudyError(f"{path}: final.seeds is required (e.g. [1, 2, 3, 4])")
    final_seeds = _seeds(final["seeds"], "final.seeds")
    numbers = {}
    for key, default in (("validation_problems", 100), ("test_problems", 400)):
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise StudyError(f"{path}: {key} must be a positive integer, got {value!r}")
        numbers[key] = value
    target = raw.get("target")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1:
        raise StudyError(f"{path}: 'target' (validation accuracy for steps-to-target, in (0, 1]) is required, got {target!r}")
    tie = tuning.get("tie_tolerance", 0.0)
    if isinstance(tie, bool) or not isinstance(tie, (int, float)) or tie < 0:
        raise StudyError(f"{path}: tuning.tie_tolerance must be a number >= 0, got {tie!r}")
    task = base.get("task") or (_recipe_value(recipe, "task") if recipe else None)
    if task != "arithmetic":
        raise StudyError(f"{path}: a study needs task: arithmetic (in base or the recipe): its validation and test "
                         f"splits come from the task; got {task!r}")
    return Study(
        name=name, path=path.resolve(), recipe=recipe, base=base, arms=arms, grid=grid, tuning_seeds=tuning_seeds,
        final_seeds=final_seeds, validation_problems=numbers["validation_problems"],
        test_problems=numbers["test_problems"], target=float(target),
        results_dir=Path(results_dir or raw.get("results_dir") or f"results/{name}").resolve(),
        runs_dir=Path(runs_dir or raw.get("runs_dir") or f"runs/{name}").resolve(),
        tie_tolerance=float(tie), description=str(raw.get("description") or ""),
        model=None if raw.get("model") is None else str(raw["model"]),
    )


def _recipe_value(recipe: Path, key: str) -> Any:
    data = yaml.safe_load(recipe.read_text()) or {}
    return data.get(key) if isinstance(data, dict) else None


# --------------------------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------------------------
@dataclass
class StudyRun:
    stage: str
    arm: str
    seed: int
    setting: int | None  # index into the arm's grid (None: the arm has no grid)
    options: dict[str, Any]  # the arm's options plus the setting's, as passed to tepo train
    key: str  # tuning/<arm>/g<k>-s<seed> or final/<arm>-s<seed>

    def results(self, study: Study) -> Path:
        return study.results_dir / self.key

    def work(self, study: Study) -> Path:
        return study.runs_dir / self.key


def _flag(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def train_args(study: Study, run: StudyRun) -> list[str]:
    """The tepo train arguments of a run, without --output_dir and --resume_from_checkpoint: its identity."""
    args: list[str] = []
    if study.recipe is not None:
        args += ["--config", str(study.recipe)]
    if study.model is not None:
        model = Path(study.model)
        args += ["--model", str(model.resolve()) if model.exists() else study.model]
    for key, value in {**study.base, **run.options}.items():
        args += [f"--{key}", _flag(value)]
    args += ["--seed", str(run.seed), "--reserve_validation", "true", "--heldout_split", "validation",
             "--heldout_num_problems", str(study.validation_problems),
             "--test_num_problems", str(study.test_problems if run.stage == "final" else 0)]
    return args


def tuning_runs(study: Study) -> list[StudyRun]:
    runs = []
    for arm, settings in study.grid.items():
        for k, setting in enumerate(settings):
            for seed in study.tuning_seeds:
                runs.append(StudyRun("tuning", arm, seed, k, {**study.arms[arm], **setting}, f"tuning/{arm}/g{k}-s{seed}"))
    return runs


def final_runs(study: Study, selected: Mapping[str, int | None]) -> list[StudyRun]:
    """Seed-major (every arm for one seed, then the next), so a study cut short stays balanced.
    Arms missing from `selected` (tuning not finished) are left out."""
    runs = []
    for seed in study.final_seeds:
        for arm in study.arms:
            if arm not in selected:
                continue
            k = selected[arm]
            setting = study.grid[arm][k] if k is not None else {}
            runs.append(StudyRun("final", arm, seed, k, {**study.arms[arm], **setting}, f"final/{arm}-s{seed}"))
    return runs


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise StudyError(f"{path}: not valid JSON ({err})") from None


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def run_status(study: Study, run: StudyRun) -> str:
    """done, failed, or todo (never started, or started and not finished)."""
    folder = run.results(study)
    if (folder / DONE_FILE).exists():
        return "done"
    return "failed" if (folder / FAILED_FILE).exists() else "todo"


def check_identity(study: Study, run: StudyRun) -> None:
    """A finished run must have been trained with the arguments (and recipe) the study file gives now."""
    done = run.results(study) / DONE_FILE
    if not done.exists():
        return
    record = _read_json(done)
    now = train_args(study, run)
    if _portable(record.get("args")) != _portable(now) or record.get("recipe_sha256", "") != study.recipe_digest():
        then = record.get("args") or []
        raise StudyError(
            f"{run.key} finished with other training arguments or another recipe than the study file gives now:\n"
            f"  then: {shlex.join(map(str, then))} (recipe {record.get('recipe_sha256')})\n"
            f"  now:  {shlex.join(now)} (recipe {study.recipe_digest()})\n"
            f"restore the study file, or move {run.results(study)} away to train it again"
        )


def _portable(args: Sequence[str] | None) -> list[str] | None:
    """Arguments as compared across checkouts: the recipe by content (recipe_sha256), not by path."""
    if args is None:
        return None
    args = list(args)
    for i, arg in enumerate(args[:-1]):
        if arg == "--config":
            args[i + 1] = "<recipe>"
    return args


# ---- selection -------------------------------------------------------------------------------
def validation_score(study: Study, run: StudyRun) -> float | None:
    """Validation accuracy at the run's last step (its eval_after.json); None unless done."""
    if run_status(study, run) != "done":
        return None
    return float(_read_json(run.results(study) / "eval_after.json")["accuracy"])


def select_settings(study: Study) -> dict[str, dict[str, Any]]:
    """Per arm with a grid: each setting's tuning scores and the selected setting.

    Rule: the highest mean validation accuracy at the last step over the tuning seeds; settings
    within `tie_tolerance` of the best count as tied, and a tie goes to the setting listed first
    (list settings simplest first). A setting is eligible once every one of its tuning runs is done;
    a failed run (stopped, non-finite) makes it ineligible. `selected` is None until every setting
    of the arm is done or failed."""
    out: dict[str, dict[str, Any]] = {}
    runs = tuning_runs(study)
    for arm, settings in study.grid.items():
        rows = []
        for k, setting in enumerate(settings):
            mine = [r for r in runs if r.arm == arm and r.setting == k]
            statuses = [run_status(study, r) for r in mine]
            scores = {r.seed: validation_score(study, r) for r in mine}
            eligible = all(s == "done" for s in statuses)
            mean = float(sum(scores.values()) / len(scores)) if eligible else math.nan
            rows.append({"setting": k, "options": setting, "scores": scores, "statuses": statuses,
                         "eligible": eligible, "mean": mean, "finished": all(s != "todo" for s in statuses)})
        selected = None
        if all(r["finished"] for r in rows):
            eligible = [r for r in rows if r["eligible"]]
            if not eligible:
                raise StudyError(f"every tuning setting of arm {arm} failed; nothing to select (see FAILED.json files)")
            best = max(r["mean"] for r in eligible)
            selected = next(r["setting"] for r in eligible if r["mean"] >= best - study.tie_tolerance - 1e-12)
        out[arm] = {"settings": rows, "selected": selected}
    return out


def selected_settings(study: Study) -> dict[str, int | None]:
    """arm -> selected grid index (None for an arm without a grid); arms still tuning are left out."""
    selection = select_settings(study)
    out: dict[str, int | None] = {}
    for arm in study.arms:
        if arm not in study.grid:
            out[arm] = None
        elif selection[arm]["selected"] is not None:
            out[arm] = selection[arm]["selected"]
    return out


# ---- running ---------------------------------------------------------------------------------
def default_train_command() -> list[str]:
    return [sys.executable, "-m", "tepo.cli", "train"]


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the study process dies (even by SIGKILL), so no trainer is
    left running behind a killed study to race the rerun on the same folder (Linux only)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def subprocess_runner(command: Sequence[str], log_path: Path, env: Mapping[str, str]) -> int:
    """compare's runner, with the child trainer bound to die with the study (Linux)."""
    return compare_runner(command, log_path, env, stop_wait_s=60,
                          preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)


def _git_commit(paths: Sequence[Path], message: str, echo: Callable[[str], None]) -> None:
    """Commit `paths` (only them) in the repository that holds the first; warn, never fail the study."""
    cwd = paths[0] if paths[0].is_dir() else paths[0].parent
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
        rel = [os.path.relpath(p, top) for p in paths if p.exists()]
        for attempt in range(10):
            if not Path(top, ".git", "index.lock").exists():
                break
            time.sleep(2)
        subprocess.run(["git", "add", "--", *rel], cwd=top, capture_output=True, text=True, check=True)
        done = subprocess.run(["git", "commit", "-q", "-m", message, "--", *rel], cwd=top, capture_output=True, text=True)
        if done.returncode != 0 and "nothing to commit" not in done.stdout + done.stderr:
            echo(f"tepo study: git commit failed: {(done.stderr or done.stdout).strip()}")
    except (OSError, subprocess.CalledProcessError) as err:
        echo(f"tepo study: could not commit {paths[0]}: {getattr(err, 'stderr', '') or err}")


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _snapshot_study_files(study: Study) -> list[Path]:
    """study.yaml and recipe.yaml beside the results: what the stored runs were trained from."""
    study.results_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for source, name in ((study.path, "study.yaml"), (study.recipe, "recipe.yaml")):
        if source is None:
            continue
        target = study.results_dir / name
        if not target.exists() or target.read_bytes() != source.read_bytes():
            shutil.copyfile(source, target)
        written.append(target)
    return written


def _stored_problem_ids(path: Path) -> list[str] | None:
    return list(_read_json(path).get("ids") or []) if path.exists() else None


def train_one(study: Study, run: StudyRun, *, runner: Runner, train_command: Sequence[str], cpu_lock: str | None,
              echo: Callable[[str], None], prefix: str) -> str:
    """Train one run (resuming from its checkpoint if one is there); store its small files. Its status."""
    work, results = run.work(study), run.results(study)
    work.mkdir(parents=True, exist_ok=True)
    args = train_args(study, run)
    command = [*train_command, *args, "--output_dir", str(work), "--resume_from_checkpoint", "true"]
    resumed = any(work.glob("checkpoint-*"))
    echo(f"{prefix} {run.key}: {'resuming' if resumed else 'training'} (log: {work / LOG_FILE})")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    asked = time.monotonic()
    with _cpu_lock(cpu_lock):
        start = time.monotonic()  # the run's own time, not the wait for another job to free the CPU
        rc = runner(command, work / LOG_FILE, env)
        elapsed = time.monotonic() - start
    record = {"key": run.key, "stage": run.stage, "arm": run.arm, "seed": run.seed, "setting": run.setting,
              "options": run.options, "args": args, "recipe_sha256": study.recipe_digest(), "returncode": rc,
              "finished": _now(), "duration_s": round(elapsed, 1), "lock_wait_s": round(start - asked, 1)}
    if rc != 0:
        _write_json(results / FAILED_FILE, {**record, "log_tail": _tail(work / LOG_FILE, 30)})
        echo(f"{prefix} {run.key}: FAILED (exit status {rc}) after {_duration(elapsed)}; last lines of {work / LOG_FILE}:\n"
             f"{_tail(work / LOG_FILE)}")
        return "failed"
    missing = [f for f in ("metrics.jsonl", "eval_after.json") + (("eval_test.json",) if run.stage == "final" else ())
               if not (work / f).exists()]
    if missing:
        _write_json(results / FAILED_FILE, {**record, "returncode": None, "log_tail": f"exited 0 without {missing}"})
        echo(f"{prefix} {run.key}: FAILED: the trainer exited 0 but wrote no {', '.join(missing)}")
        return "failed"
    results.mkdir(parents=True, exist_ok=True)
    (results / FAILED_FILE).unlink(missing_ok=True)
    for name in SMALL_FILES:
        if (work / name).exists():
            shutil.copyfile(work / name, results / name)
    _write_json(results / DONE_FILE, record)  # last: a results folder with DONE.json is complete
    score = _read_json(results / ("eval_test.json" if run.stage == "final" else "eval_after.json"))["accuracy"]
    echo(f"{prefix} {run.key}: done in {_duration(elapsed)}, {'test' if run.stage == 'final' else 'validation'} "
         f"accuracy {score:.3f}")
    return "done"


def run_study(study: Study, *, runner: Runner | None = None, train_command: Sequence[str] | None = None,
              cpu_lock: str | None = None, retry_failed: bool = False, max_runs: int | None = None,
              time_limit_s: float | None = None, commit: bool = False, readme: Path | None = None,
              echo: Callable[[str], None] = lambda s: print(s, flush=True)) -> dict[str, int]:
    """Train what is missing: tuning runs first, then the final runs of every arm whose selection is
    known. Stops after `max_runs` runs or once `time_limit_s` has passed (no new run starts then).
    With `readme`, the study's marked tables in that Markdown file are rewritten after each run (and
    committed with it), so the file never lags the results.
    Returns counts: done, failed, todo (still to train), trained (this call)."""
    runner = runner or subprocess_runner
    command = list(train_command) if train_command is not None else default_train_command()
    snapshot = _snapshot_study_files(study)
    if commit:
        _git_commit(snapshot, f"study {study.name}: study file and recipe", echo)
    started = time.monotonic()
    trained = 0
    previous_sigterm = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):  # stop the child trainer too (subprocess_runner's except clause)
        raise KeyboardInterrupt

    if threading_main():
        signal.signal(signal.SIGTERM, on_sigterm)
    try:
        for stage in STAGES:
            plan = tuning_runs(study) if stage == "tuning" else final_runs(study, selected_settings(study))
            for run in plan:
                check_identity(study, run)
            todo = [r for r in plan if run_status(study, r) == "todo" or (retry_failed and run_status(study, r) == "failed")]
            if stage == "tuning":
                counts = _counts(study, plan)
                echo(f"tepo study {study.name}: tuning {counts['done']}/{len(plan)} done, {counts['failed']} failed, "
                     f"{len(todo)} to train")
            else:
                waiting = [a for a in study.arms if a not in selected_settings(study)]
                counts = _counts(study, plan)
                echo(f"tepo study {study.name}: final {counts['done']}/{len(plan)} planned runs done, {counts['failed']} failed, "
                     f"{len(todo)} to train" + (f"; arms still tuning: {', '.join(waiting)}" if waiting else ""))
            for index, run in enumerate(todo, start=1):
                if max_runs is not None and trained >= max_runs:
                    echo(f"tepo study {study.name}: stopping after {trained} run(s) (--max_runs); rerun to carry on")
                    return _summary(study, trained)
                if time_limit_s is not None and time.monotonic() - started >= time_limit_s:
                    echo(f"tepo study {study.name}: time limit reached after {trained} run(s); rerun to carry on")
                    return _summary(study, trained)
                if run_status(study, run) == "done":
                    continue
                (run.results(study) / FAILED_FILE).unlink(missing_ok=True)
                status = train_one(study, run, runner=runner, train_command=command, cpu_lock=cpu_lock, echo=echo,
                                   prefix=f"[{stage} {index}/{len(todo)}]")
                trained += 1
                written = [run.results(study)]
                if readme is not None and _sync_readme(study, readme, echo):
                    written.append(readme)
                if commit:
                    _git_commit(written, f"study {study.name}: {run.key} {status}", echo)
    except KeyboardInterrupt:
        echo(f"tepo study {study.name}: interrupted; rerun the same command to carry on (the interrupted run resumes "
             "from its last checkpoint)")
        raise
    finally:
        if threading_main():
            signal.signal(signal.SIGTERM, previous_sigterm)
    summary = _summary(study, trained)
    echo(f"tepo study {study.name}: {summary['done']} runs done, {summary['failed']} failed, {summary['todo']} to train; "
         f"report with: tepo study report {study.path}")
    return summary


def _sync_readme(study: Study, readme: Path, echo: Callable[[str], None]) -> bool:
    """Rewrite the README's marked tables of this study from the results; True if it changed. Warns, never fails."""
    from tepo.analysis.study_report import compute, readme_regen_command, sync_readme, tables

    try:
        changed = sync_readme(readme, study, tables(study, compute(study)), readme_regen_command(study, readme))
    except (OSError, StudyError) as err:
        echo(f"tepo study: could not update {readme}'s tables: {err}")
        return False
    if changed:
        echo(f"tepo study {study.name}: {readme}: rewrote table(s) {', '.join(changed)}")
    return bool(changed)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _counts(study: Study, plan: Sequence[StudyRun]) -> dict[str, int]:
    statuses = [run_status(study, r) for r in plan]
    return {s: statuses.count(s) for s in ("done", "failed", "todo")}


def all_runs(study: Study) -> list[StudyRun]:
    """Every run the study has planned so far (final runs of arms still tuning are not known yet)."""
    return tuning_runs(study) + final_runs(study, selected_settings(study))


def _summary(study: Study, trained: int) -> dict[str, int]:
    counts = _counts(study, all_runs(study))
    waiting = sum(1 for a in study.arms if a not in selected_settings(study)) * len(study.final_seeds)
    return {**counts, "todo": counts["todo"] + waiting, "trained": trained}


def plan_lines(study: Study) -> list[str]:
    """A human-readable plan: every run with its status and command arguments."""
    lines = []
    for run in all_runs(study):
        lines.append(f"{run_status(study, run):6} {run.key}: tepo train {shlex.join(train_args(study, run))}")
    for arm in study.arms:
        if arm not in selected_settings(study):
            lines.append(f"{'later':6} final/{arm}-s{{{','.join(map(str, study.final_seeds))}}}: after its tuning")
    return lines
