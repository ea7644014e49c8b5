"""The one runner of `tepo study run` and `tepo compare`: train a study's runs as `tepo train` subprocesses.

A run is the unit of work, addressed by its key (`tuning/<arm>/g<k>-s<seed>`, `final/<arm>-s<seed>`,
or `runs/<objective>-s<seed>` for a comparison). `run_study` trains every run whose results folder
has no DONE.json (tuning first, then the final runs of every arm whose selection is known), or only
the runs named by `only`. Each run trains in its work folder under `runs_dir` (checkpoints, log:
never committed), resumed from its last checkpoint when an earlier attempt left one (or, with
`fresh_start`, after moving that attempt to `results_dir/failed/`); when it ends the runner copies
its small files (`tepo.run_folder.SMALL_FILES`) into its results folder and writes DONE.json last
(FAILED.json when the trainer failed), so a results folder with DONE.json is complete. A killed
runner rerun with the same command carries on where it stopped.

Concurrency: each run is trained under its own lock file (`<work folder>.lock`, an flock), so two
runners (two `tepo study run`, `--jobs N`, or a scheduler's array of `--only KEY` jobs) never train
the same run: a runner that finds a run locked leaves it to its holder, and before a stage that
depends on it (the final runs depend on the tuning) waits for the lock to be released. With
`jobs` > 1 runs train N at once, each bound to its own share of this process's CPU cores
(`sched_setaffinity`, OMP_NUM_THREADS) and, with `devices`, to its own device (CUDA_VISIBLE_DEVICES).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from tepo.analysis.study import (
    STAGES,
    Study,
    StudyError,
    StudyRun,
    check_identity,
    counts,
    final_runs,
    find_run,
    run_status,
    selected_settings,
    summary,
    train_args,
    tuning_runs,
)
from tepo.run_folder import (
    DONE_FILE,
    EVAL_AFTER_FILE,
    EVAL_TEST_FILE,
    FAILED_FILE,
    LOG_FILE,
    METRICS_FILE,
    SMALL_FILES,
    read_json,
    write_json,
)

# (command, log path, environment) -> exit status; `cpus` binds the child to those cores
Runner = Callable[..., int]
# called after each run with (run, status); the CLI plugs in the doc sync and git commit here
AfterRun = Callable[[StudyRun, str], None]


def default_train_command() -> list[str]:
    return [sys.executable, "-m", "tepo.cli", "train"]


def now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def cpu_lock(path: str | None):
    """Hold an exclusive flock on `path` (the CPU lock shared with other jobs) while a run trains."""
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


@contextlib.contextmanager
def run_lock(path: Path, *, wait: bool = False):
    """The lock of one run: yields True when this process holds it, False when another one does
    (with `wait`, blocks until it is free and yields True)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def lock_path(study: Study, run: StudyRun) -> Path:
    work = run.work(study)
    return work.with_name(work.name + ".lock")


def _child_setup(cpus: Sequence[int] | None) -> Callable[[], None] | None:
    """In the child: get SIGTERM when the runner dies (even by SIGKILL), so no trainer is left
    running behind a killed runner to race the rerun on the same folder (Linux), and bind it to
    `cpus`."""
    linux = sys.platform.startswith("linux")
    if not linux and not cpus:
        return None

    def setup() -> None:
        if linux:
            with contextlib.suppress(Exception):
                import ctypes

                ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if cpus:
            with contextlib.suppress(OSError, AttributeError):
                os.sched_setaffinity(0, set(cpus))

    return setup


def subprocess_runner(command: Sequence[str], log_path: Path, env: Mapping[str, str], *,
                      cpus: Sequence[int] | None = None, stop_wait_s: float = 60) -> int:
    """Run `command`, stdout and stderr into `log_path`; its exit status. Ctrl-C (or SIGTERM to the
    runner) stops the child too (terminated, killed after `stop_wait_s`)."""
    with open(log_path, "ab") as log:
        log.write(f"$ {shlex.join(command)}\n".encode())
        log.flush()
        proc = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, env=dict(env),
                                preexec_fn=_child_setup(cpus))
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


def snapshot_files(study: Study) -> list[Path]:
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


def _set_aside(work: Path, failed_dir: Path) -> Path:
    """Move an unfinished attempt's folder to failed_dir/<name>.<k> so the rerun starts clean."""
    failed_dir.mkdir(parents=True, exist_ok=True)
    k = 1
    while (failed_dir / f"{work.name}.{k}").exists():
        k += 1
    target = failed_dir / f"{work.name}.{k}"
    shutil.move(str(work), str(target))
    return target


@dataclass
class Slot:
    """Where one of the runs that train at once goes: its CPU cores and device (None: unbound)."""

    cpus: list[int] | None = None
    device: str | None = None

    def env(self, base: Mapping[str, str]) -> dict[str, str]:
        env = dict(base)
        if self.cpus:
            env["OMP_NUM_THREADS"] = str(len(self.cpus))
        if self.device is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.device
        return env


def slots(jobs: int, devices: Sequence[str] | None = None) -> list[Slot]:
    """`jobs` slots; with more than one, this process's cores are split between them (each its own),
    and devices, when given, are dealt out in turn."""
    if jobs < 1:
        raise StudyError(f"--jobs must be >= 1, got {jobs}")
    if jobs == 1:
        return [Slot(None, devices[0] if devices else None)]
    try:
        cores = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux: no binding
        cores = []
    out = []
    for i in range(jobs):
        share = cores[i::jobs] if len(cores) >= jobs else ([cores[i % len(cores)]] if cores else None)
        out.append(Slot(share, devices[i % len(devices)] if devices else None))
    return out


@dataclass
class Options:
    """How `run_study` trains (what the command line sets)."""

    runner: Runner | None = None
    train_command: Sequence[str] | None = None
    cpu_lock: str | None = None
    retry_failed: bool = False
    max_runs: int | None = None
    time_limit_s: float | None = None
    only: Sequence[str] = ()
    jobs: int = 1
    devices: Sequence[str] | None = None
    fail_fast: bool = False
    allow_setup_change: bool = False
    fresh_start: bool = False  # move an unfinished attempt aside instead of resuming it in place
    after_run: AfterRun | None = None


def _required(study: Study, run: StudyRun) -> list[str]:
    """The files a run's trainer must have written for the run to count as done."""
    if not study.splits:
        return []
    return [METRICS_FILE, EVAL_AFTER_FILE] + ([EVAL_TEST_FILE] if run.stage == "final" and study.test_problems else [])


def _score(study: Study, run: StudyRun) -> str:
    folder = run.results(study)
    for name, what in ((EVAL_TEST_FILE, "test"), (EVAL_AFTER_FILE, "validation" if study.splits else "held-out")):
        if (folder / name).exists():
            with contextlib.suppress(ValueError, TypeError, KeyError):
                return f", {what} accuracy {float(read_json(folder / name)['accuracy']):.3f}"
    return ""


def train_one(study: Study, run: StudyRun, *, runner: Runner, train_command: Sequence[str], cpu_lock: str | None,
              echo: Callable[[str], None], prefix: str, slot: Slot | None = None, fresh_start: bool = False,
              retry_failed: bool = False) -> str:
    """Train one run under its lock; store its small files. Its status: done, failed, busy (another
    runner holds it) or skipped (another runner ended it since it was planned); nothing is done for
    the last two."""
    with run_lock(lock_path(study, run)) as mine:
        if not mine:
            echo(f"{prefix} {run.key}: another runner is training it; leaving it to that one")
            return "busy"
        status = run_status(study, run)  # another runner may have ended it since it was planned
        if status == "done" or (status == "failed" and not retry_failed):
            echo(f"{prefix} {run.key}: {status} by another runner meanwhile")
            return "skipped"
        return _train_locked(study, run, runner=runner, train_command=train_command, cpu_lock=cpu_lock, echo=echo,
                             prefix=prefix, slot=slot or Slot(), fresh_start=fresh_start)


def _train_locked(study: Study, run: StudyRun, *, runner: Runner, train_command: Sequence[str], cpu_lock: str | None,
                  echo: Callable[[str], None], prefix: str, slot: Slot, fresh_start: bool) -> str:
    work, results = run.work(study), run.results(study)
    (results / FAILED_FILE).unlink(missing_ok=True)
    args = train_args(study, run)
    command = [*train_command, *args, "--output_dir", str(work)]
    left = work.exists() and any(p.name != FAILED_FILE for p in work.iterdir())
    if fresh_start and left:
        moved = _set_aside(work, study.results_dir / "failed")
        echo(f"{prefix} {run.key}: an earlier attempt left files; moved them to {moved}")
    elif not fresh_start:
        command += ["--resume_from_checkpoint", "true"]
    work.mkdir(parents=True, exist_ok=True)
    resumed = any(work.glob("checkpoint-*"))
    echo(f"{prefix} {run.key}: {'resuming' if resumed else 'training'} (log: {work / LOG_FILE})")
    env = slot.env(dict(os.environ, PYTHONUNBUFFERED="1"))
    asked = time.monotonic()
    with cpu_lock_of(cpu_lock):
        start = time.monotonic()  # the run's own time, not the wait for another job to free the CPU
        rc = runner(command, work / LOG_FILE, env, **({"cpus": slot.cpus} if slot.cpus else {}))
        elapsed = time.monotonic() - start
    record = {"key": run.key, "stage": run.stage, "arm": run.arm, "seed": run.seed, "setting": run.setting,
              "options": run.options, "args": args, "recipe_sha256": study.recipe_digest(), "returncode": rc,
              "finished": now(), "duration_s": round(elapsed, 1), "lock_wait_s": round(start - asked, 1)}
    if rc != 0:
        write_json(results / FAILED_FILE, {**record, "log_tail": tail(work / LOG_FILE, 30)}, indent=1)
        echo(f"{prefix} {run.key}: FAILED (exit status {rc}) after {duration(elapsed)}; last lines of {work / LOG_FILE}:\n"
             f"{tail(work / LOG_FILE)}")
        return "failed"
    missing = [f for f in _required(study, run) if not (work / f).exists()]
    if missing:
        write_json(results / FAILED_FILE, {**record, "returncode": None, "log_tail": f"exited 0 without {missing}"}, indent=1)
        echo(f"{prefix} {run.key}: FAILED: the trainer exited 0 but wrote no {', '.join(missing)}")
        return "failed"
    results.mkdir(parents=True, exist_ok=True)
    if results.resolve() != work.resolve():
        for name in SMALL_FILES:
            if (work / name).exists():
                shutil.copyfile(work / name, results / name)
    write_json(results / DONE_FILE, record, indent=1)  # last: a results folder with DONE.json is complete
    echo(f"{prefix} {run.key}: done in {duration(elapsed)}{_score(study, run)}")
    return "done"


cpu_lock_of = cpu_lock  # train_one's parameter `cpu_lock` (a path) hides the function there


def _stage_plan(study: Study, stage: str) -> list[StudyRun]:
    return tuning_runs(study) if stage == "tuning" else final_runs(study, selected_settings(study))


def _check_identities(study: Study, plan: Sequence[StudyRun], allow_change: bool, echo: Callable[[str], None]) -> None:
    for run in plan:
        try:
            check_identity(study, run)
        except StudyError:
            if not allow_change:
                raise
            echo(f"tepo {study.kind} {study.name}: {run.key} was trained with other arguments; kept (--allow_setup_change)")


def run_study(study: Study, options: Options | None = None, *,
              echo: Callable[[str], None] = lambda s: print(s, flush=True)) -> dict[str, int]:
    """Train what is missing (or the runs `options.only` names). Stops after `max_runs` runs or once
    `time_limit_s` has passed (no new run starts then). Returns counts: done, failed, todo (still to
    train), trained (this call), busy (left to another runner)."""
    o = options or Options()
    runner = o.runner or subprocess_runner
    command = list(o.train_command) if o.train_command is not None else default_train_command()
    snapshot_files(study)
    started = time.monotonic()
    state = {"trained": 0, "stop": "", "busy": 0}
    state_lock = threading.Lock()
    pool = slots(o.jobs, o.devices)
    previous_sigterm = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):  # stop the child trainers too (subprocess_runner's except clause)
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:
        signal.signal(signal.SIGTERM, on_sigterm)
    label = lambda stage: stage if study.grid else "runs"  # noqa: E731
    try:
        if o.only:
            todo = [find_run(study, key) for key in o.only]
            _check_identities(study, todo, o.allow_setup_change, echo)
            todo = [r for r in todo if run_status(study, r) == "todo" or (o.retry_failed and run_status(study, r) == "failed")]
            _run_batch(study, todo, "only", o, runner, command, pool, state, state_lock, started, echo)
        for stage in STAGES if not o.only else ():
            plan = _stage_plan(study, stage)
            if not plan:
                continue
            _check_identities(study, plan, o.allow_setup_change, echo)
            todo = [r for r in plan if run_status(study, r) == "todo" or (o.retry_failed and run_status(study, r) == "failed")]
            found = counts(study, plan)
            waiting = [a for a in study.arms if a not in selected_settings(study)] if stage == "final" else []
            echo(f"tepo {study.kind} {study.name}: {label(stage)} {found['done']}/{len(plan)} done, {found['failed']} failed, "
                 f"{len(todo)} to train" + (f"; arms still tuning: {', '.join(waiting)}" if waiting else ""))
            if found["failed"] and not o.retry_failed:
                failed = [r.key for r in plan if run_status(study, r) == "failed"]
                echo(f"tepo {study.kind} {study.name}: not retrying {', '.join(failed)} (--retry_failed to train them again)")
            busy = _run_batch(study, todo, label(stage), o, runner, command, pool, state, state_lock, started, echo)
            if state["stop"]:
                break
            for run in busy:  # the next stage depends on this one: wait for the other runners' runs
                echo(f"tepo {study.kind} {study.name}: waiting for another runner to finish {run.key}")
                with run_lock(lock_path(study, run), wait=True):
                    pass
    except KeyboardInterrupt:
        echo(f"tepo {study.kind} {study.name}: interrupted; rerun the same command to carry on"
             + ("" if o.fresh_start else " (the interrupted run resumes from its last checkpoint)"))
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous_sigterm)
    result = {**summary(study, state["trained"]), "busy": state["busy"]}
    if state["stop"]:
        echo(f"tepo {study.kind} {study.name}: {state['stop']}")
    where = f"tepo study report {study.path}" if study.path else f"tepo report {study.results_dir}"
    echo(f"tepo {study.kind} {study.name}: {result['done']} runs done, {result['failed']} failed, {result['todo']} to train; "
         f"report with: {where}")
    return result


def _run_batch(study: Study, todo: Sequence[StudyRun], stage: str, o: Options, runner: Runner, command: list[str],
               pool: Sequence[Slot], state: dict, state_lock: threading.Lock, started: float,
               echo: Callable[[str], None]) -> list[StudyRun]:
    """Train `todo`, len(pool) at a time; the runs another runner holds (busy)."""
    queue = list(enumerate(todo, start=1))
    busy: list[StudyRun] = []

    def take() -> tuple[int, StudyRun] | None:
        with state_lock:
            if state["stop"] or not queue:
                return None
            if o.max_runs is not None and state["trained"] >= o.max_runs:
                state["stop"] = f"stopping after {state['trained']} run(s) (--max_runs); rerun to carry on"
                return None
            if o.time_limit_s is not None and time.monotonic() - started >= o.time_limit_s:
                state["stop"] = f"time limit reached after {state['trained']} run(s); rerun to carry on"
                return None
            return queue.pop(0)

    def work(slot: Slot) -> None:
        while (item := take()) is not None:
            index, run = item
            status = train_one(study, run, runner=runner, train_command=command, cpu_lock=o.cpu_lock, echo=echo,
                               prefix=f"[{stage} {index}/{len(todo)}]", slot=slot, fresh_start=o.fresh_start,
                               retry_failed=o.retry_failed)
            with state_lock:
                if status in ("busy", "skipped"):
                    if status == "busy":
                        busy.append(run)
                        state["busy"] += 1
                    continue
                state["trained"] += 1
                if status == "failed" and o.fail_fast:
                    state["stop"] = "stopping at the first failed run (--fail_fast); rerun to carry on"
            if o.after_run is not None:
                o.after_run(run, status)

    if len(pool) == 1 or len(todo) <= 1:
        work(pool[0])
    else:
        threads = [threading.Thread(target=work, args=(slot,), daemon=True) for slot in pool[:len(todo)]]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():  # join with a timeout, so Ctrl-C reaches the main thread
                t.join(0.5)
    return busy
