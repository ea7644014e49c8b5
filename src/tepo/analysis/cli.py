"""`tepo compare` and `tepo report`: parse arguments, then call tepo.analysis."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

COMPARE_EPILOG = """\
Every other option (or everything after `--`) is passed unchanged to each `tepo train` run,
e.g. --heldout_eval_steps 10 --learning_rate 1e-5. Runs go one at a time into
OUTPUT_DIR/runs/<objective>-s<seed>/ (log: train.log). A rerun skips finished runs and, unless
--retry_failed, failed ones; it starts the rest. Exit status: 0 when every run is done, 1 if not,
2 for bad arguments (nothing is launched then).
"""


def compare_main(argv: list[str]) -> int:
    from tepo.analysis.compare import parse_list, parse_seeds, plan_comparison, run_comparison

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
    parser.add_argument("--config", help="YAML recipe shared by every run")
    parser.add_argument("--model", help="model id or folder (default: the recipe's / offline SmolLM2)")
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--task", help="built-in task, e.g. arithmetic")
    data.add_argument("--data", help="JSONL training data")
    parser.add_argument("--max_steps", type=int, help="optimiser steps per run")
    parser.add_argument("--train_command", help="command that trains one run (default: this Python's `-m tepo.cli train`)")
    parser.add_argument("--cpu_lock", help="flock this file while each run trains (e.g. /tmp/tepo-cpu.lock)")
    parser.add_argument("--fail_fast", action="store_true", help="stop at the first failed run (default: carry on)")
    parser.add_argument("--allow_setup_change", action="store_true",
                        help="keep finished runs even if they were trained with other arguments")
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
        if args.config and not args.dry_run:
            args.config = str(snapshot_recipe(args.config, args.output_dir, args.allow_setup_change))
        train_args: list[str] = []
        for name in ("config", "model", "task", "data", "max_steps"):
            value = getattr(args, name)
            if value is not None:
                is_path = name in ("config", "data") or (name == "model" and Path(value).exists())
                train_args += [f"--{name}", str(Path(value).resolve()) if is_path else str(value)]  # runs may start elsewhere
        train_args += extra
        command = shlex.split(args.train_command) if args.train_command else None
        plan = plan_comparison(objectives, seeds, args.output_dir, train_args, train_command=command)
    except (ValueError, RuntimeError) as err:
        print(f"tepo compare: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        for spec in plan:
            print(f"{spec.name}: {shlex.join(spec.command)}")
        return 0
    settings = {"config": args.config, "model": args.model, "task": args.task, "data": args.data, "max_steps": args.max_steps}
    try:
        state = run_comparison(plan, args.output_dir, train_args, fail_fast=args.fail_fast, cpu_lock=args.cpu_lock,
                               allow_setup_change=args.allow_setup_change, resume=args.resume,
                               retry_failed=args.retry_failed, settings=settings)
    except ValueError as err:
        print(f"tepo compare: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 1 if any(r["status"] != "done" for r in state["runs"]) else 0


def snapshot_recipe(config: str, output_dir: str, allow_change: bool = False) -> Path:
    """Copy the recipe into OUTPUT_DIR/recipe.yaml once and train every run from that copy.

    Runs go one at a time for hours: an edit of the original recipe in the meantime must not give
    later runs another setup. A rerun whose recipe differs from the snapshot is refused (unless
    --allow_setup_change, which takes the new recipe for the runs still to do).
    """
    snapshot = Path(output_dir) / "recipe.yaml"
    text = Path(config).read_text()
    if snapshot.is_file() and snapshot.read_text() != text and not allow_change:
        raise ValueError(
            f"--config {config} differs from the recipe this comparison started with ({snapshot}); "
            "finished runs used the snapshot. Pass the snapshot as --config, or --allow_setup_change"
        )
    if not snapshot.is_file() or snapshot.read_text() != text:
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        snapshot.write_text(text)
    return snapshot


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
    if (Path(args.dir) / "metrics.jsonl").is_file() and not (Path(args.dir) / "runs").is_dir():
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
tepo study run FILE      train every run the study still lacks (tuning first, then the final runs),
                         one at a time; a rerun skips finished runs and resumes an interrupted one
tepo study report FILE   tables and plots from results/<study>/ alone (seconds): report/index.html
tepo study plan FILE     every run with its status and tepo train arguments
--readme README.md       (report, run) rewrite the study's marked tables in README.md; with report
                         --check, only say whether they match the results
See docs/study.md for the study file, the selection rule and the bootstrap.
"""


def study_main(argv: list[str]) -> int:
    from tepo.analysis.study import StudyError, load_study, plan_lines, run_study

    parser = argparse.ArgumentParser(prog="tepo study", description="Run and report a study (a YAML file).",
                                     epilog=STUDY_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("action", choices=("run", "report", "plan"))
    parser.add_argument("file", help="the study YAML")
    parser.add_argument("--results_dir", help="where the small files go (default: the file's results_dir, or results/<name>)")
    parser.add_argument("--runs_dir", help="where checkpoints and weights go (default: the file's runs_dir, or runs/<name>)")
    parser.add_argument("--cpu_lock", help="run: flock this file while each run trains (e.g. /tmp/tepo-cpu.lock)")
    parser.add_argument("--commit", action="store_true", help="run: git-commit each finished run's results folder")
    parser.add_argument("--max_runs", type=int, help="run: train at most this many runs, then stop")
    parser.add_argument("--time_limit", type=float, help="run: start no new run after this many minutes")
    parser.add_argument("--retry_failed", action="store_true", help="run: train again the runs that failed")
    parser.add_argument("--train_command", help="run: command that trains one run (default: this Python's -m tepo.cli train)")
    parser.add_argument("--out", help="report: folder (default results/<name>/report)")
    parser.add_argument("--confidence", type=float, default=0.95, help="report: interval level (default 0.95)")
    parser.add_argument("--replicates", type=int, default=10000, help="report: bootstrap replicates (default 10000)")
    parser.add_argument("--readme", help="report, run (after each run): also rewrite the study's marked tables in this "
                                          "Markdown file (<!-- study:NAME:TABLE --> ... <!-- /study:NAME:TABLE -->)")
    parser.add_argument("--check", action="store_true",
                        help="report --readme: write nothing; exit 1 naming each marked table that differs from the results")
    args = parser.parse_args(argv)
    try:
        study = load_study(args.file, results_dir=args.results_dir, runs_dir=args.runs_dir)
        if args.check and not (args.readme and args.action == "report"):
            raise StudyError("--check goes with `report --readme FILE` (the Markdown file whose tables it checks)")
        if args.readme:  # malformed markers are found now, not after hours of training
            from tepo.analysis.study_report import check_readme_marks

            check_readme_marks(Path(args.readme), study)
        if args.action == "plan":
            print("\n".join(plan_lines(study)))
            return 0
        if args.action == "report":
            from tepo.analysis.study_report import compute, readme_regen_command, sync_readme, tables, write_study_report

            if args.check:  # the tables alone, from the stored files; nothing written
                tabs = tables(study, compute(study, confidence=args.confidence, replicates=args.replicates))
            else:
                index, tabs = write_study_report(study, args.out, confidence=args.confidence, replicates=args.replicates)
                print(f"tepo study report: wrote {index} and {index.parent / 'summary.md'}")
            if args.readme:
                regen = readme_regen_command(study, Path(args.readme))
                changed = sync_readme(Path(args.readme), study, tabs, regen, check=args.check)
                if args.check:
                    if changed:
                        print(f"tepo study report: {args.readme} differs from the results in table(s) {', '.join(changed)} "
                              f"(rewrite them with `{regen}`)", file=sys.stderr)
                        return 1
                    print(f"tepo study report: {args.readme}'s tables of study {study.name} match the results")
                else:
                    print(f"tepo study report: {args.readme}: " + (f"rewrote table(s) {', '.join(changed)}" if changed else "its tables were up to date"))
            return 0
        if args.max_runs is not None and args.max_runs < 1:
            raise StudyError(f"--max_runs must be >= 1, got {args.max_runs}")
        summary = run_study(study, cpu_lock=args.cpu_lock, commit=args.commit, max_runs=args.max_runs,
                            time_limit_s=None if args.time_limit is None else 60.0 * args.time_limit,
                            retry_failed=args.retry_failed, readme=Path(args.readme) if args.readme else None,
                            train_command=shlex.split(args.train_command) if args.train_command else None)
    except StudyError as err:
        print(f"tepo study: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0 if summary["todo"] == 0 and summary["failed"] == 0 else 1
