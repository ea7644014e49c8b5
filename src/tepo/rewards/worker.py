"""math-verify in a worker process with a CPU-time budget per answer, or in this process.

The budget of one answer's verification is the CPU time the verification itself uses
(:data:`VERIFY_CPU_S`), never the wall clock: on a loaded machine a verification gets less of the
CPU per second but needs the same CPU time, so load does not change its verdict. Two guards count it:

* the worker's own CPU-time timer (``ITIMER_PROF``, the worker's user + system time) interrupts the
  verification at the budget; the worker answers "over budget" and stays alive;
* the parent reads the worker's CPU time (``/proc/PID/stat``, else psutil) while it waits and kills
  the worker when it passes the budget by :data:`CPU_KILL_GRACE_S`: one long C-level operation (a
  huge integer power, say) does not return to the interpreter, so the timer cannot interrupt it.

A wall-clock backstop, :data:`WALL_BACKSTOP_FACTOR` times the CPU budget, catches what a CPU budget
cannot: a worker that is not scheduled at all (stopped, swapped out). Each limit that fires is
counted (``timeout_cpu``, ``timeout_wall``; ``timeout`` is their sum) in
:func:`tepo.rewards.verifier_stats`. A killed worker is replaced by a warm spare.

Before each answer the worker clears sympy's and math-verify's caches, so the work (and the CPU
time) a verification takes does not depend on the answers verified before it. The budget covers
the answer only: the first time a worker meets a gold answer it parses it, in a request of its own
under the gold budget (:data:`tepo.rewards.gold.GOLD_PARSE_TIMEOUT_S`), and keeps it. Both sides
arrive already rewritten (:func:`tepo.rewards.forms.math_verify_form`) and are parsed as a whole
(:func:`tepo.rewards.parsing.parse_whole`).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tepo.rewards.gold import GOLD_PARSE_TIMEOUT_S, Gold, parsed_gold
from tepo.rewards.parsing import parse_whole
from tepo.rewards.stats import stats, warn_once

VERIFY_CPU_S = 1.0  # CPU seconds one answer's verification may use (parse + compare), whatever the load
WALL_BACKSTOP_FACTOR = 15  # wall-clock backstop: this many times the CPU budget (15 s by default)
VERIFY_WALL_S = WALL_BACKSTOP_FACTOR * VERIFY_CPU_S
CPU_KILL_GRACE_S = 0.25  # the parent kills a worker this much CPU time past the budget
VERIFY_TIMEOUT_S = VERIFY_CPU_S  # the name of the budget before 2026-12-07 (then 1.5 s of wall clock)
WORKER_START_TIMEOUT_S = 120.0  # importing sympy on a loaded 2-core box can take a while
WORKER_MEMORY_BYTES = 4 << 30  # address-space limit of the worker (a huge power fails fast)
MAX_WORKER_GOLDS = 1 << 14  # parsed gold answers a worker keeps
POLL_S = 0.02  # how often the parent reads the worker's CPU time while it waits


def _verify_parsed(pred_latex: str, gold_parsed: list) -> bool:
    """math-verify's verdict, with none of its own (wall-clock) timeouts: the caller limits it."""
    from math_verify import verify

    pred_parsed = parse_whole(pred_latex, None)
    if not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def clear_verification_caches() -> None:
    """Forget what sympy and math-verify cached from earlier verifications, so that the work one
    verification does (and its CPU time) does not depend on what was verified before."""
    from math_verify import parser as mv_parser
    from sympy.core.cache import clear_cache

    clear_cache()
    for name in ("parse_latex_cached", "parse_expr_cached", "extract_latex"):
        cached = getattr(mv_parser, name, None)
        if cached is not None and hasattr(cached, "cache_clear"):
            cached.cache_clear()


class CpuBudgetExceeded(BaseException):
    """Raised in the verifying thread when its process's CPU-time timer fires. A BaseException:
    math-verify turns every Exception into "not equal" and would go on."""


_armed = False


def _on_cpu_timer(signum, frame) -> None:  # noqa: ARG001
    if _armed:
        raise CpuBudgetExceeded


def verify_within_cpu(pred_latex: str, gold_parsed: list, cpu_s: float) -> bool | None:
    """math-verify's verdict on ``pred_latex``, or None when the verification used more than
    ``cpu_s`` seconds of this process's CPU time (``ITIMER_PROF``: user + system time). Main thread
    only (a signal handler). Caches are cleared first (:func:`clear_verification_caches`)."""
    global _armed
    clear_verification_caches()
    old_handler = signal.signal(signal.SIGPROF, _on_cpu_timer)
    old_timer: tuple[float, float] = (0.0, 0.0)
    try:
        try:
            _armed = True
            old_timer = signal.setitimer(signal.ITIMER_PROF, cpu_s)
            try:
                return _verify_parsed(pred_latex, gold_parsed)
            finally:
                signal.setitimer(signal.ITIMER_PROF, 0)
                _armed = False
        except CpuBudgetExceeded:
            _armed = False
            return None
    finally:
        signal.signal(signal.SIGPROF, old_handler)
        if old_timer[0] > 0:  # someone else's CPU timer (a profiler): give it back
            signal.setitimer(signal.ITIMER_PROF, *old_timer)


def worker_main() -> None:
    """The worker's loop: one JSON request a line on stdin, one JSON verdict a line back."""
    proto = os.fdopen(os.dup(1), "w", encoding="ascii", newline="\n")
    os.dup2(2, 1)  # anything a library prints goes to stderr, not into the protocol
    _die_with_parent()
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, WORKER_MEMORY_BYTES))
    except (ImportError, ValueError, OSError):
        pass
    logging.disable(logging.CRITICAL)  # math-verify logs every failed parse
    import warnings

    warnings.simplefilter("ignore")
    golds: dict[str, list] = {}
    _verify_parsed("$x+1$", parse_whole("$1+x$", None))  # import and warm up sympy and the parsers before "ready"
    proto.write("ready\n")
    proto.flush()
    for line in sys.stdin.buffer:
        try:
            request = json.loads(line)
            gold = request["gold"]
            if gold not in golds:
                if len(golds) >= MAX_WORKER_GOLDS:
                    golds.clear()
                golds[gold] = parse_whole(gold, request["gold_t"])
            if "pred" not in request:  # a gold answer to parse and keep, with its own budget
                reply = {"gold_ok": bool(golds[gold])}
            elif not golds[gold]:
                reply = {"ok": False, "gold_ok": False}
            else:
                ok = verify_within_cpu(request["pred"], golds[gold], request["cpu"])
                reply = {"ok": False, "gold_ok": True, "over": "cpu"} if ok is None else {"ok": ok, "gold_ok": True}
        except Exception as err:  # noqa: BLE001 - a verdict, never a crash
            reply = {"ok": False, "gold_ok": True, "error": type(err).__name__}
        proto.write(json.dumps(reply) + "\n")
        proto.flush()


def _die_with_parent() -> None:
    """Linux: ask for SIGKILL when the parent dies, so a worker stuck in C never outlives it."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort only
        pass


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_cpu_source: str | None = None  # "proc", "psutil" or "none", decided on first use


def process_cpu_seconds(pid: int) -> float | None:
    """The CPU time (user + system) process ``pid`` has used so far, or None when it cannot be read
    (no /proc and no psutil, or the process is gone)."""
    global _cpu_source
    if _cpu_source is None:
        if os.path.exists(f"/proc/{os.getpid()}/stat"):
            _cpu_source = "proc"
        else:
            try:
                import psutil  # noqa: F401
            except ImportError:
                _cpu_source = "none"
            else:
                _cpu_source = "psutil"
    try:
        if _cpu_source == "proc":
            with open(f"/proc/{pid}/stat", "rb") as f:
                data = f.read()
            fields = data[data.rindex(b")") + 2 :].split()  # after the command name, which may hold spaces
            return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime
        if _cpu_source == "psutil":
            import psutil

            times = psutil.Process(pid).cpu_times()
            return times.user + times.system
    except Exception:  # noqa: BLE001 - unreadable: the wall-clock backstop still holds
        return None
    return None


class _Worker:
    """One math-verify child process, spoken to over pipes. ``golds``: the gold answers it has parsed."""

    def __init__(self) -> None:
        src = str(Path(__file__).resolve().parents[2])
        boot = f"import sys; sys.path.insert(0, {src!r}); from tepo.rewards.worker import worker_main; worker_main()"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", boot],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
        )
        self.ready = False
        self.golds: set[str] = set()
        self._buf = b""

    def _readline(self, wall_s: float, cpu_s: float | None = None, cpu_start: float | None = None) -> bytes | str:
        """The next line from the worker, or the limit it overran first: ``"cpu"`` when its CPU time
        passed ``cpu_start + cpu_s`` (not checked when ``cpu_s`` or ``cpu_start`` is None),
        ``"wall"`` when ``wall_s`` seconds of wall clock passed."""
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + wall_s
        watch_cpu = cpu_s is not None and cpu_start is not None
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return "wall"
            if watch_cpu:
                used = process_cpu_seconds(self.proc.pid)
                if used is not None and used - cpu_start > cpu_s:
                    return "cpu"
            readable, _, _ = select.select([fd], [], [], min(left, POLL_S) if watch_cpu else left)
            if readable:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise EOFError("math-verify worker exited")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def wait_ready(self, timeout: float) -> bool:
        if not self.ready:
            line = self._readline(timeout)
            self.ready = line == b"ready"
        return self.ready

    def _request(self, request: dict, wall_s: float, cpu_s: float | None = None) -> dict | str:
        cpu_start = process_cpu_seconds(self.proc.pid) if cpu_s is not None else None
        self.proc.stdin.write((json.dumps(request) + "\n").encode("ascii"))
        self.proc.stdin.flush()
        line = self._readline(wall_s, cpu_s, cpu_start)
        return line if isinstance(line, str) else json.loads(line)

    def call(self, pred: str, gold: str, cpu_s: float, wall_s: float) -> dict | str:
        """The reply, or the limit (``"cpu"``, ``"wall"``) at which the parent stopped waiting (the
        worker is then useless). The worker stops itself at ``cpu_s`` of CPU time (reply ``"over":
        "cpu"``); the parent gives up at :data:`CPU_KILL_GRACE_S` past it or at ``wall_s``. The
        first time this worker meets ``gold`` it parses it first, in a call of its own under the
        gold budget, so the answer's budget covers the answer only."""
        if gold not in self.golds:
            if len(self.golds) >= MAX_WORKER_GOLDS:  # the worker clears its cache at this size too
                self.golds.clear()
            reply = self._request({"gold": gold, "gold_t": GOLD_PARSE_TIMEOUT_S}, GOLD_PARSE_TIMEOUT_S + 5)
            if isinstance(reply, str) or not reply.get("gold_ok"):
                return reply if isinstance(reply, str) else {"ok": False, "gold_ok": False}
            self.golds.add(gold)
        request = {"pred": pred, "gold": gold, "cpu": cpu_s, "gold_t": GOLD_PARSE_TIMEOUT_S}
        return self._request(request, wall_s, cpu_s + CPU_KILL_GRACE_S)

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except Exception:  # noqa: BLE001
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except Exception:  # noqa: BLE001
                pass


class _Guard:
    """Runs math-verify in a worker process under a CPU-time budget and a wall-clock backstop.

    A warm spare waits beside the active worker, so replacing a killed worker costs the next call
    nothing; a new spare starts at once. Calls are serialised (one lock per process); a forked child
    process starts its own workers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._active: _Worker | None = None
        self._spare: _Worker | None = None
        self.unavailable: str | None = None

    def after_fork_in_child(self) -> None:
        """A forked child must not talk to its parent's workers (or inherit a held lock)."""
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._active = self._spare = None

    def _ensure(self) -> _Worker:
        if self._pid != os.getpid():  # forked without the hook (should not happen)
            self.after_fork_in_child()
        if self._active is None:
            self._active, self._spare = (self._spare or _Worker()), None
        if self._spare is None:
            self._spare = _Worker()
        if not self._active.wait_ready(WORKER_START_TIMEOUT_S):
            raise RuntimeError("math-verify worker did not start")
        return self._active

    def _retire_active(self) -> None:
        if self._active is not None:
            self._active.kill()
        self._active = None
        stats["worker_restart"] += 1

    def verify(self, pred: str, gold: str, cpu_s: float, wall_s: float) -> dict | str:
        with self._lock:
            try:
                worker = self._ensure()
            except (OSError, RuntimeError, EOFError, ValueError) as err:
                self.close()
                self.unavailable = f"{type(err).__name__}: {err}"
                raise
            try:
                reply = worker.call(pred, gold, cpu_s, wall_s)
            except (OSError, EOFError, ValueError):
                reply = {"ok": False, "gold_ok": True, "error": "worker died"}
                self._retire_active()
                return reply
            if isinstance(reply, str):  # overran a limit: the worker may be stuck in C
                self._retire_active()
                if self._spare is not None:  # promote the spare now; its replacement warms up
                    self._active, self._spare = self._spare, _Worker()
            return reply

    def close(self) -> None:
        if self._pid != os.getpid():
            return
        for w in (self._active, self._spare):
            if w is not None:
                w.kill()
        self._active = self._spare = None


guard = _Guard()
atexit.register(guard.close)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=guard.after_fork_in_child)


def _over(limit: str) -> bool:
    stats["timeout"] += 1
    stats[f"timeout_{limit}"] += 1
    return False


def guarded_math_verify(pred_latex: str, gold: Gold, cpu_s: float, wall_s: float | None = None) -> bool:
    """math-verify's verdict on ``pred_latex`` against ``gold``, in the worker, False when the
    verification uses more than ``cpu_s`` seconds of CPU time or when ``wall_s`` of wall clock
    pass first (default :data:`WALL_BACKSTOP_FACTOR` x ``cpu_s``); in this process when no worker
    can run."""
    wall_s = WALL_BACKSTOP_FACTOR * cpu_s if wall_s is None else wall_s
    if guard.unavailable is None and os.name == "posix" and sys.executable:
        try:
            reply = guard.verify(pred_latex, gold.latex, cpu_s, wall_s)
        except (OSError, RuntimeError, EOFError, ValueError):
            warn_once("worker", f"math-verify worker unavailable ({guard.unavailable}); verifying in process")
        else:
            if isinstance(reply, str):
                return _over(reply)
            if reply.get("over"):
                return _over(reply["over"])
            stats["math_verify"] += 1
            if reply.get("error"):
                stats["worker_error"] += 1
            if not reply.get("gold_ok", True):  # parsed here but not there: should not happen
                stats["worker_gold_unparsed"] += 1
                warn_once(f"gold:{gold.text}", f"the math-verify worker cannot parse the gold answer {gold.text!r}")
            return bool(reply["ok"])
    # No worker: math-verify here, on the gold parsed once in this process, under the same CPU
    # budget where a CPU timer works (the main thread; it counts the whole process's CPU time).
    stats["in_process"] += 1
    gold = parsed_gold(gold)
    try:
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
            ok = verify_within_cpu(pred_latex, gold.parsed, cpu_s)
            return _over("cpu") if ok is None else ok
        return _verify_parsed(pred_latex, gold.parsed)
    except Exception:  # noqa: BLE001
        return False
