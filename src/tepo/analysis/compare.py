"""`tepo compare`: objectives side by side over seeds, as a study built in memory.

A comparison is a study (`tepo.analysis.study.comparison_study`) whose arms are objectives, with no
tuning and no test stage: one `tepo train` run per (objective, seed), trained by the one runner
(`tepo.analysis.runner`) in `DIR/runs/<objective>-s<seed>/` with its log in `train.log`. Every run
gets the same arguments except `--objective` and `--seed`, so within a seed only the objective
varies and within an objective only the seed (which drives data order and sampling). Each
objective trains on the advantages it is defined with (`scale_rewards` left unset:
`tepo.objectives.advantage_scale`, "none" for dr_grpo, "group" for the others) unless the training
arguments or the recipe set `scale_rewards` for all; each run's scale is recorded in compare.json.
A run is finished when its DONE.json exists. A rerun skips finished runs, and runs that failed
(non-zero exit, e.g. stopped for non-finite values: that is a result too) unless `retry_failed`; it
starts pending and interrupted runs, after moving what an earlier attempt left to `DIR/failed/`
(or, with `resume`, leaving it in place and asking the trainer to `--resume_from_checkpoint true`).
`DIR/compare.json` holds the plan and every run's status; `tepo report DIR` reads the folder
(`tepo.analysis.runs.load_comparison`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from tepo.analysis.runner import Options, default_train_command, now, run_study
from tepo.analysis.runs import COMPARE_FILE
from tepo.analysis.study import Study, StudyError, check_identity, comparison_study, final_runs, run_status, train_args
from tepo.run_folder import DONE_FILE, FAILED_FILE, LOG_FILE, read_json, write_json

# the options each run of a comparison gets from the runner; passing them as shared arguments would break the design
PER_RUN = ("--objective", "--seed", "--output_dir", "--resume_from_checkpoint")


def registered_objectives() -> list[str]:
    """Names the objective registry knows (`tepo.objectives.list_objectives()`)."""
    try:
        from tepo.objectives import list_objectives
    except ImportError as err:  # the registry is another module's job; say what is missing
        raise RuntimeError(f"cannot validate objective names: tepo.objectives.list_objectives is unavailable ({err})") from err
    return list(list_objectives())


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


@dataclass
class RunSpec:
    """One run of a comparison, as `--dry_run` and compare.json show it."""

    name: str
    objective: str
    seed: int
    run_dir: Path
    command: list[str]
    scale_rewards: str = ""  # the advantage scale the run trains with ("" when not known here)


def plan_comparison(
    objectives: Sequence[str],
    seeds: Sequence[int],
    output_dir: str | os.PathLike,
    train_args_shared: Sequence[str],
    *,
    recipe: str | os.PathLike | None = None,
    known_objectives: Iterable[str] | None = None,
) -> Study:
    """The comparison as a study: the runs go seed-major (every objective for seed 0, then seed 1,
    ...), so a comparison cut short is still balanced across objectives. `train_args_shared` are
    passed to every run."""
    known = list(registered_objectives() if known_objectives is None else known_objectives)
    unknown = [o for o in objectives if o not in known]
    if unknown:
        raise ValueError(f"unknown objective(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
    for arg in train_args_shared:
        name = arg.split("=", 1)[0]
        if name in PER_RUN:
            raise ValueError(f"{name} is set per run by tepo compare; remove it from the training arguments")
    return comparison_study(Path(output_dir).resolve().name, objectives, seeds, output_dir, recipe=recipe,
                            extra_args=train_args_shared)


def run_specs(study: Study, train_command: Sequence[str] | None = None) -> list[RunSpec]:
    """The runs of a comparison with their full commands and advantage scales."""
    command = list(train_command) if train_command is not None else default_train_command()
    shared = scale_rewards_set_in([*(["--config", str(study.recipe)] if study.recipe else []), *study.extra_args])
    specs = []
    for run in final_runs(study, {arm: None for arm in study.arms}):
        work = run.work(study)
        specs.append(RunSpec(Path(run.key).name, run.arm, run.seed, work,
                             [*command, *train_args(study, run), "--output_dir", str(work)],
                             shared or objective_scale(run.arm)))
    return specs


def run_comparison(study: Study, *, train_command: Sequence[str] | None = None, runner=None, fail_fast: bool = False,
                   cpu_lock: str | None = None, allow_setup_change: bool = False, resume: bool = False,
                   retry_failed: bool = False, jobs: int = 1, settings: Mapping[str, Any] | None = None,
                   echo: Callable[[str], None] = lambda s: print(s, flush=True)) -> dict[str, Any]:
    """Train every unfinished run of the comparison (the one runner); keep DIR/compare.json current.
    Returns the compare.json content."""
    specs = run_specs(study, train_command)
    state_path = study.results_dir / COMPARE_FILE
    previous = read_json(state_path) if state_path.exists() else {}
    state: dict[str, Any] = {"created": previous.get("created", now()), "objectives": list(study.arms),
                             "seeds": list(study.final_seeds), "train_args": list(study.extra_args),
                             "settings": dict(settings or {}), "runs": []}
    runs = final_runs(study, {arm: None for arm in study.arms})

    def record(spec: RunSpec, run) -> dict[str, Any]:
        status = run_status(study, run)
        out = {"name": spec.name, "objective": spec.objective, "seed": spec.seed, "run_dir": str(spec.run_dir),
               "log": str(spec.run_dir / LOG_FILE), "command": spec.command,
               "status": "pending" if status == "todo" else status, "scale_rewards": spec.scale_rewards}
        marker = spec.run_dir / (DONE_FILE if status == "done" else FAILED_FILE)
        if status in ("done", "failed") and marker.exists():
            out.update({k: v for k, v in read_json(marker).items() if k in ("returncode", "finished", "duration_s")})
        return out

    def save(*_: Any) -> None:
        state["updated"] = now()
        state["runs"] = [record(spec, run) for spec, run in zip(specs, runs)]
        write_json(state_path, state)

    study.results_dir.mkdir(parents=True, exist_ok=True)
    save()
    options = Options(runner=runner, train_command=train_command, cpu_lock=cpu_lock, retry_failed=retry_failed,
                      jobs=jobs, fail_fast=fail_fast, allow_setup_change=allow_setup_change, fresh_start=not resume,
                      after_run=save)
    try:
        state["summary"] = run_study(study, options, echo=echo)
    finally:
        save()
    return state


__all__ = ["RunSpec", "StudyError", "parse_list", "parse_seeds", "plan_comparison", "run_comparison", "run_specs",
           "scale_rewards_set_in", "objective_scale", "registered_objectives"]


def check_setup(study: Study) -> None:
    """StudyError when a finished run of the comparison was trained with other arguments or recipe."""
    for run in final_runs(study, {arm: None for arm in study.arms}):
        check_identity(study, run)
