"""Studies: a YAML file that says what to train, how each method's open settings are chosen, and
how the chosen ones are compared (docs/study.md has the format and the rules).

This module is the study's description, without side effects: the file (`load_study`), the plan
(`tuning_runs`, `final_runs`, `train_args`), each run's status (from its results folder) and the
selection of the tuned settings. Training the runs is `tepo.analysis.runner`; the report is
`tepo.analysis.study_report`.

A study has up to two stages. Tuning (optional): each arm with a `grid` trains once per (setting,
tuning seed) and is scored on the validation split. Final: each arm at its selected setting trains
once per final seed, with the validation split evaluated during training (for steps-to-target) and,
when `test_problems` > 0, the test split, which tuning never sees, evaluated once at the end with
per-problem verdicts. `tepo compare` is a study built in memory (`comparison_study`): arms are
objectives, no tuning, no test stage, the trainer's own held-out evaluation.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from tepo.run_folder import DONE_FILE, EVAL_AFTER_FILE, FAILED_FILE, LEGACY_DONE_FILE, read_json

STAGES = ("tuning", "final")
STUDY_KEYS = {"name", "description", "recipe", "base", "validation_problems", "test_problems", "target",
              "arms", "tuning", "final", "results_dir", "runs_dir", "model"}
# tepo train options the study sets per run (the split each stage evaluates on, the seed, the folder)
CONTROLLED = {"seed", "output_dir", "heldout_split", "reserve_validation", "heldout_num_problems", "test_num_problems",
              "resume_from_checkpoint", "heldout_eval", "heldout_data", "data", "config"}


class StudyError(ValueError):
    """A study file that cannot be run as written, or results that do not match it."""


# --------------------------------------------------------------------------------------------
# the study file
# --------------------------------------------------------------------------------------------
@dataclass
class Study:
    name: str
    path: Path | None  # None: built in memory (tepo compare)
    recipe: Path | None
    base: dict[str, Any]
    arms: dict[str, dict[str, Any]]
    grid: dict[str, list[dict[str, Any]]]  # arm -> settings, simplest first
    tuning_seeds: list[int]
    final_seeds: list[int]
    validation_problems: int
    test_problems: int  # 0: no test stage
    target: float | None  # None: no steps-to-target in the study report
    results_dir: Path
    runs_dir: Path
    tie_tolerance: float = 0.0
    description: str = ""
    model: str | None = None
    splits: bool = True  # False: no validation/test split arguments; the trainer's own held-out set
    extra_args: list[str] = field(default_factory=list)  # passed unchanged to every run, last
    final_dir: str = "final"  # the final runs' folder under results_dir / runs_dir
    kind: str = "study"  # how messages name it: "study" or "compare"

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
    args += ["--seed", str(run.seed)]
    if study.splits:
        args += ["--reserve_validation", "true", "--heldout_split", "validation",
                 "--heldout_num_problems", str(study.validation_problems),
                 "--test_num_problems", str(study.test_problems if run.stage == "final" else 0)]
    return args + list(study.extra_args)


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
            runs.append(StudyRun("final", arm, seed, k, {**study.arms[arm], **setting}, f"{study.final_dir}/{arm}-s{seed}"))
    return runs


def _read_json(path: Path) -> Any:
    try:
        return read_json(path)
    except ValueError as err:
        raise StudyError(str(err)) from None


def run_status(study: Study, run: StudyRun) -> str:
    """done, failed, or todo (never started, or started and not finished)."""
    folder = run.results(study)
    if (folder / DONE_FILE).exists() or (folder / LEGACY_DONE_FILE).exists():
        return "done"
    return "failed" if (folder / FAILED_FILE).exists() else "todo"


def check_identity(study: Study, run: StudyRun) -> None:
    """A finished run must have been trained with the arguments (and recipe) the study file gives now."""
    done = run.results(study) / DONE_FILE
    if not done.exists():
        return
    record = _read_json(done)
    if "args" not in record and "train_args" in record:  # a DONE.json of `tepo compare` before it was a study
        return
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
    return float(_read_json(run.results(study) / EVAL_AFTER_FILE)["accuracy"])


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


def counts(study: Study, plan: Sequence[StudyRun]) -> dict[str, int]:
    statuses = [run_status(study, r) for r in plan]
    return {s: statuses.count(s) for s in ("done", "failed", "todo")}


def all_runs(study: Study) -> list[StudyRun]:
    """Every run the study has planned so far (final runs of arms still tuning are not known yet)."""
    return tuning_runs(study) + final_runs(study, selected_settings(study))


def find_run(study: Study, key: str) -> StudyRun:
    """The planned run with this key; StudyError naming the keys there are otherwise."""
    runs = {r.key: r for r in all_runs(study)}
    if key in runs:
        return runs[key]
    waiting = [a for a in study.arms if a not in selected_settings(study)]
    if any(key.startswith(f"{study.final_dir}/{a}-s") for a in waiting):
        raise StudyError(f"{key}: its arm is still tuning; its setting is not selected yet")
    raise StudyError(f"no run {key!r} in study {study.name}; runs: {', '.join(runs) or '(none)'}")


def summary(study: Study, trained: int = 0) -> dict[str, int]:
    """Counts over the study: done, failed, todo (final runs of arms still tuning included), trained."""
    found = counts(study, all_runs(study))
    waiting = sum(1 for a in study.arms if a not in selected_settings(study)) * len(study.final_seeds)
    return {**found, "todo": found["todo"] + waiting, "trained": trained}


def plan_records(study: Study, train_command: Sequence[str]) -> list[dict[str, Any]]:
    """Every run as a scheduler reads it (`tepo study plan`, one JSON object a line): its key,
    stage, arm, seed, status, its `tepo study run FILE --only KEY` command and the `tepo train`
    command that command runs. Final runs of arms still tuning come as status "later", no command."""
    records = []
    for run in all_runs(study):
        only = ["tepo", "study", "run", str(study.path), "--only", run.key] if study.path else None
        records.append({"key": run.key, "stage": run.stage, "arm": run.arm, "seed": run.seed, "setting": run.setting,
                        "status": run_status(study, run), "run": only,
                        "train": [*train_command, *train_args(study, run), "--output_dir", str(run.work(study))]})
    for arm in study.arms:
        if arm not in selected_settings(study):
            for seed in study.final_seeds:
                records.append({"key": f"{study.final_dir}/{arm}-s{seed}", "stage": "final", "arm": arm, "seed": seed,
                                "setting": None, "status": "later", "run": None, "train": None})
    return records


def comparison_study(name: str, objectives: Sequence[str], seeds: Sequence[int], output_dir: str | os.PathLike, *,
                     recipe: str | os.PathLike | None = None, extra_args: Sequence[str] = ()) -> Study:
    """`tepo compare` as a study: one arm per objective ({objective: NAME}), no tuning, final seeds =
    seeds, no validation or test split (the trainer's own held-out evaluation), every run in
    OUTPUT_DIR/runs/<objective>-s<seed>/ (work and results folder at once), `extra_args` shared."""
    if not objectives or not seeds:
        raise StudyError("need at least one objective and one seed")
    out = Path(output_dir).resolve()
    return Study(name=name, path=None, recipe=Path(recipe).resolve() if recipe else None, base={},
                 arms={o: {"objective": o} for o in objectives}, grid={}, tuning_seeds=[], final_seeds=list(seeds),
                 validation_problems=0, test_problems=0, target=None, results_dir=out, runs_dir=out, splits=False,
                 extra_args=list(extra_args), final_dir="runs", kind="compare")
