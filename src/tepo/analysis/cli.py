"""`tepo compare`, `tepo report` and `tepo study`: parse arguments, then call tepo.analysis."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

COMPARE_EPILOG = """\
Every other option (or everything after `--`) is passed unchanged to each `tepo train` run,
e.g. --heldout_eval_steps 10 --learning_rate 1e-5. A comparison is a study without tuning or test
stage (docs/study.md), trained by the same runner: runs go one at a time (--jobs N: N at once) into
OUTPUT_DIR/runs/<objective>-s<seed>/ (log: train.log). A rerun skips finished runs and, unless
--retry_failed, failed ones; it starts the rest. Exit status: 0 when every run is done, 1 if not,
2 for bad arguments (nothing is launched then).
"""
DEFAULT_DOC = "docs/results.md"  # where the committed study tables live


def compare_main(argv: list[str]) -> int:
    from tepo.analysis.compare import check_setup, parse_list, parse_seeds, plan_comparison, run_comparison, run_specs
    from tepo.analysis.runner import snapshot_files

    argv = list(argv)
    passthrough: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(
        prog="tepo compare", description="Train several objectives over several seeds on one identical setup.",
        epilog=COMPARE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
    )
    parser.add_argument("--objectives", required=True, help="comma-separated objective names, e.g. grpo,dapo,tepo")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--output_dir", required=True, help="comparison folder (runs/, compare.json, report/)")
    parser.add_argument("--config", help="YAML recipe shared by every run (trained from its copy OUTPUT_DIR/recipe.yaml)")
    parser.add_argument("--model", help="model id or folder (default: the recipe's / offline SmolLM2)")
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--task", help="built-in task, e.g. arithmetic")
    data.add_argument("--data", help="JSONL training data")
    parser.add_argument("--max_steps", type=int, help="optimiser steps per run")
    parser.add_argument("--train_command", help="command that trains one run (default: this Python's `-m tepo.cli train`)")
    parser.add_argument("--cpu_lock", help="flock this file while each run trains (e.g. /tmp/tepo-cpu.lock)")
    parser.add_argument("--jobs", type=int, default=1, help="train this many runs at once, each on its own CPU cores (default 1)")
    parser.add_argument("--fail_fast", action="store_true", help="stop at the first failed run (default: carry on)")
    parser.add_argument("--allow_setup_change", action="store_true",
                        help="keep finished runs even if they were trained with other arguments or another recipe")
    parser.add_argument("--retry_failed", action="store_true",
                        help="run again the runs that failed in an earlier invocation (default: report them, leave them)")
    parser.add_argument("--resume", action="store_true",
                        help="rerun an unfinished run in its own folder (the trainer resumes from its last checkpoint) "
                             "instead of moving that attempt to OUTPUT_DIR/failed/ and starting clean")
    parser.add_argument("--dry_run", action="store_true", help="print the plan and exit")
    args, extra = parser.parse_known_args(argv)
    extra += passthrough

    try:
        objectives = parse_list(args.objectives, "objectives")
        seeds = parse_seeds(args.seeds)
        if args.max_steps is not None and args.max_steps < 1:
            raise ValueError(f"--max_steps must be >= 1, got {args.max_steps}")
        if args.config and not Path(args.config).is_file():
            raise ValueError(f"--config: no such file {args.config}")
        if args.data and not Path(args.data).exists():
            raise ValueError(f"--data: no such file {args.data}")
        shared: list[str] = []
        for name in ("model", "task", "data", "max_steps"):
            value = getattr(args, name)
            if value is not None:
                is_path = name == "data" or (name == "model" and Path(value).exists())
                shared += [f"--{name}", str(Path(value).resolve()) if is_path else str(value)]  # runs may start elsewhere
        shared += extra
        command = shlex.split(args.train_command) if args.train_command else None
        study = plan_comparison(objectives, seeds, args.output_dir, shared, recipe=args.config)
        if args.dry_run:
            for spec in run_specs(study, command):
                print(f"{spec.name}: {shlex.join(spec.command)}")
            return 0
        if not args.allow_setup_change:
            check_setup(study)  # before the recipe's copy is refreshed
        if study.recipe is not None:  # every run trains from the copy: an edit of the original cannot reach later runs
            snapshot_files(study)
            study.recipe = study.results_dir / "recipe.yaml"
    except (ValueError, RuntimeError) as err:
        print(f"tepo compare: {err}", file=sys.stderr)
        return 2
    settings = {"config": args.config, "model": args.model, "task": args.task, "data": args.data, "max_steps": args.max_steps}
    try:
        state = run_comparison(study, train_command=command, fail_fast=args.fail_fast, cpu_lock=args.cpu_lock,
                               allow_setup_change=args.allow_setup_change, resume=args.resume, jobs=args.jobs,
                               retry_failed=args.retry_failed, settings=settings)
    except ValueError as err:
        print(f"tepo compare: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 1 if any(r["status"] != "done" for r in state["runs"]) else 0


def report_main(argv: list[str]) -> int:
    from tepo.analysis.report import build_report

    parser = argparse.ArgumentParser(prog="tepo report", allow_abbrev=False,
                                     description="HTML report of a `tepo compare` folder, or of one `tepo train` run.")
    parser.add_argument("dir", help="the comparison folder (holds runs/), or a training run's output_dir (holds metrics.jsonl)")
    parser.add_argument("--out", help="report folder (default DIR/report)")
    parser.add_argument("--target", type=float, default=None,
                        help="performance to reach for the steps-to-target table (default: midpoint between start and best final)")
    parser.add_argument("--smooth", type=int, default=5, help="trailing-mean window for per-step curves (default 5; 1 = raw)")
    parser.add_argument("--confidence", type=float, default=0.95, help="confidence level of the intervals (default 0.95)")
    args = parser.parse_args(argv)
    from tepo.run_folder import METRICS_FILE

    if (Path(args.dir) / METRICS_FILE).is_file() and not (Path(args.dir) / "runs").is_dir():
        from tepo.analysis.run_report import build_run_report

        try:
            index = build_run_report(args.dir, args.out, smooth=args.smooth)
        except (ValueError, FileNotFoundError) as err:
            print(f"tepo report: {err}", file=sys.stderr)
            return 2
        print(f"tepo report: wrote {index} (open it in a browser)")
        return 0
    try:
        index = build_report(args.dir, args.out, target=args.target, smooth=args.smooth, confidence=args.confidence)
    except (ValueError, FileNotFoundError) as err:
        print(f"tepo report: {err}", file=sys.stderr)
        return 2
    print(f"tepo report: wrote {index} and {index.parent / 'summary.md'}")
    return 0




STUDY_EPILOG = """\
tepo study run FILE      train every run the study still lacks (tuning first, then the final runs);
                         a rerun skips finished runs and resumes an interrupted one
tepo study run FILE --only KEY   train that run alone (a key from `plan`), e.g. one task of a SLURM array
tepo study run FILE --jobs N     train N runs at once, each on its own CPU cores (--devices: its own GPU)
tepo study report FILE   tables and plots from results/<study>/ alone (seconds): report/index.html
tepo study plan FILE     every run, one JSON object a line: key, stage, arm, seed, status, and the
                         commands that train it (`run`: tepo study run --only KEY; `train`: tepo train)
--doc docs/results.md    (report, run) rewrite the study's marked tables in that Markdown file; with
                         report --check (default file docs/results.md), only say whether they match
Two runners never train the same run (a lock file per run), so several may work on one study at once.
See docs/study.md for the study file, the selection rule and the statistics.
"""


def git_commit(paths: Sequence[Path], message: str, echo=print) -> None:
    """Commit `paths` (only them) in the repository that holds the first; warn, never fail the study."""
    cwd = paths[0] if paths[0].is_dir() else paths[0].parent
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
        rel = [os.path.relpath(p, top) for p in paths if p.exists()]
        for _ in range(10):
            if not Path(top, ".git", "index.lock").exists():
                break
            time.sleep(2)
        subprocess.run(["git", "add", "--", *rel], cwd=top, capture_output=True, text=True, check=True)
        done = subprocess.run(["git", "commit", "-q", "-m", message, "--", *rel], cwd=top, capture_output=True, text=True)
        if done.returncode != 0 and "nothing to commit" not in done.stdout + done.stderr:
            echo(f"tepo study: git commit failed: {(done.stderr or done.stdout).strip()}")
    except (OSError, subprocess.CalledProcessError) as err:
        echo(f"tepo study: could not commit {paths[0]}: {getattr(err, 'stderr', '') or err}")


def study_hook(study, doc: Path | None, commit: bool):
    """What `tepo study run` plugs into the runner: after each run, rewrite the doc's marked tables
    (--doc) and git-commit the run's results with it (--commit). None when neither is asked."""
    if doc is None and not commit:
        return None
    from tepo.analysis.study import StudyError
    from tepo.analysis.study_report import compute, readme_regen_command, sync_readme, tables

    def after_run(run, status: str) -> None:
        written = [run.results(study)]
        if doc is not None:
            try:
                changed = sync_readme(doc, study, tables(study, compute(study)), readme_regen_command(study, doc))
            except (OSError, StudyError) as err:
                print(f"tepo study: could not update {doc}'s tables: {err}", flush=True)
                changed = []
            if changed:
                print(f"tepo study {study.name}: {doc}: rewrote table(s) {', '.join(changed)}", flush=True)
                written.append(doc)
        if commit:
            git_commit(written, f"study {study.name}: {run.key} {status}")

    return after_run


def study_main(argv: list[str]) -> int:
    from tepo.analysis.study import StudyError, load_study, plan_records

    parser = argparse.ArgumentParser(prog="tepo study", description="Run and report a study (a YAML file).",
                                     epilog=STUDY_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("action", choices=("run", "report", "plan"))
    parser.add_argument("file", help="the study YAML")
    parser.add_argument("--results_dir", help="where the small files go (default: the file's results_dir, or results/<name>)")
    parser.add_argument("--runs_dir", help="where checkpoints and weights go (default: the file's runs_dir, or runs/<name>)")
    parser.add_argument("--only", action="append", metavar="KEY", help="run: train only this run (repeatable; keys from `plan`)")
    parser.add_argument("--jobs", type=int, default=1, help="run: train this many runs at once, each on its own CPU cores")
    parser.add_argument("--devices", help="run: comma-separated devices (CUDA_VISIBLE_DEVICES values) dealt out to the runs")
    parser.add_argument("--cpu_lock", help="run: flock this file while each run trains (e.g. /tmp/tepo-cpu.lock)")
    parser.add_argument("--commit", action="store_true", help="run: git-commit each finished run's results folder")
    parser.add_argument("--max_runs", type=int, help="run: train at most this many runs, then stop")
    parser.add_argument("--time_limit", type=float, help="run: start no new run after this many minutes")
    parser.add_argument("--retry_failed", action="store_true", help="run: train again the runs that failed")
    parser.add_argument("--train_command", help="run, plan: command that trains one run (default: this Python's -m tepo.cli train)")
    parser.add_argument("--out", help="report: folder (default results/<name>/report)")
    parser.add_argument("--confidence", type=float, default=0.95, help="report: interval level (default 0.95)")
    parser.add_argument("--replicates", type=int, default=10000, help="report: bootstrap replicates (default 10000)")
    parser.add_argument("--doc", "--readme", dest="doc",
                        help="report, run (after each run): also rewrite the study's marked tables in this Markdown file "
                             f"(<!-- study:NAME:TABLE --> ... <!-- /study:NAME:TABLE -->); --check's default: {DEFAULT_DOC}")
    parser.add_argument("--check", action="store_true",
                        help="report: write nothing; exit 1 naming each marked table of --doc that differs from the results")
    args = parser.parse_args(argv)
    if args.check and args.doc is None:
        args.doc = DEFAULT_DOC
    command = shlex.split(args.train_command) if args.train_command else None
    try:
        study = load_study(args.file, results_dir=args.results_dir, runs_dir=args.runs_dir)
        if args.check and args.action != "report":
            raise StudyError("--check goes with `report` (it checks the --doc file's tables against the results)")
        if args.doc:  # malformed markers are found now, not after hours of training
            from tepo.analysis.study_report import check_readme_marks

            check_readme_marks(Path(args.doc), study)
        if args.action == "plan":
            from tepo.analysis.runner import default_train_command

            for record in plan_records(study, command or default_train_command()):
                print(json.dumps(record))
            return 0
        if args.action == "report":
            return _study_report(study, args)
        if args.max_runs is not None and args.max_runs < 1:
            raise StudyError(f"--max_runs must be >= 1, got {args.max_runs}")
        from tepo.analysis.runner import Options, run_study, snapshot_files

        if args.commit:
            git_commit(snapshot_files(study), f"study {study.name}: study file and recipe")
        options = Options(train_command=command, cpu_lock=args.cpu_lock, retry_failed=args.retry_failed,
                          max_runs=args.max_runs, time_limit_s=None if args.time_limit is None else 60.0 * args.time_limit,
                          only=args.only or (), jobs=args.jobs, devices=args.devices.split(",") if args.devices else None,
                          after_run=study_hook(study, Path(args.doc) if args.doc else None, args.commit))
        result = run_study(study, options)
        if args.only:
            from tepo.analysis.study import find_run, run_status

            return 0 if all(run_status(study, find_run(study, key)) == "done" for key in args.only) else 1
    except StudyError as err:
        print(f"tepo study: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0 if result["todo"] == 0 and result["failed"] == 0 else 1


def _study_report(study, args) -> int:
    from tepo.analysis.study_report import compute, readme_regen_command, sync_readme, tables, write_study_report

    if args.check:  # the tables alone, from the stored files; nothing written
        tabs = tables(study, compute(study, confidence=args.confidence, replicates=args.replicates))
    else:
        index, tabs = write_study_report(study, args.out, confidence=args.confidence, replicates=args.replicates)
        print(f"tepo study report: wrote {index} and {index.parent / 'summary.md'}")
    if args.doc:
        regen = readme_regen_command(study, Path(args.doc))
        changed = sync_readme(Path(args.doc), study, tabs, regen, check=args.check)
        if args.check:
            if changed:
                print(f"tepo study report: {args.doc} differs from the results in table(s) {', '.join(changed)} "
                      f"(rewrite them with `{regen}`)", file=sys.stderr)
                return 1
            print(f"tepo study report: {args.doc}'s tables of study {study.name} match the results")
        else:
            print(f"tepo study report: {args.doc}: " + (f"rewrote table(s) {', '.join(changed)}" if changed else "its tables were up to date"))
    return 0
