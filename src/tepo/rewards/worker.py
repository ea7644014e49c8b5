"""math-verify in a worker process with a hard wall-clock limit, or in this process without one.

math-verify's own ``signal.alarm`` timeouts cannot interrupt one long C-level operation (a huge
integer power, say) and work only on the main thread, so an answer is verified in a child process
that is killed and replaced when a call overruns its limit. The limit covers the answer only: the
first time a worker meets a gold answer it parses it, in a request of its own under the gold
budget (:data:`tepo.rewards.gold.GOLD_PARSE_TIMEOUT_S`), and keeps it. Both sides arrive already rewritten
(:func:`tepo.rewards.forms.math_verify_form`).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

from tepo.rewards.gold import GOLD_PARSE_TIMEOUT_S, Gold, parsed_gold
from tepo.rewards.stats import stats, warn_once

VERIFY_TIMEOUT_S = 1.5  # wall-clock limit of one answer's math-verify call (the worker is killed after it)
WORKER_START_TIMEOUT_S = 120.0  # importing sympy on a loaded 2-core box can take a while
WORKER_MEMORY_BYTES = 4 << 30  # address-space limit of the worker (a huge power fails fast)
MAX_WORKER_GOLDS = 1 << 14  # parsed gold answers a worker keeps


def _verify_parsed(pred_latex: str, gold_parsed: list, timeout_s: int | None) -> bool:
    from math_verify import parse, verify

    pred_parsed = parse(pred_latex, parsing_timeout=timeout_s)
    if not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout_s))


def worker_main() -> None:
    """The worker's loop: one JSON request a line on stdin, one JSON verdict a line back."""
    from math_verify import parse

    proto = os.fdopen(os.dup(1), "w", encoding="ascii", newline="\n")
    os.dup2(2, 1)  # anything a library prints goes to stderr, not into the protocol
    _die_with_parent()
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, WORKER_MEMORY_BYTES))
    except (ImportError, ValueError, OSError):
        pass
    logging.disable(logging.CRITICAL)  # math-verify logs every timeout as a warning
    import warnings

    warnings.simplefilter("ignore")
    golds: dict[str, list] = {}
    _verify_parsed("$x+1$", parse("$1+x$"), 5)  # import and warm up sympy and the parsers before "ready"
    proto.write("ready\n")
    proto.flush()
    for line in sys.stdin.buffer:
        try:
            request = json.loads(line)
            gold = request["gold"]
            if gold not in golds:
                if len(golds) >= MAX_WORKER_GOLDS:
                    golds.clear()
                golds[gold] = parse(gold, parsing_timeout=request["gold_t"])
            if "pred" not in request:  # a gold answer to parse and keep, with its own budget
                reply = {"gold_ok": bool(golds[gold])}
            elif not golds[gold]:
                reply = {"ok": False, "gold_ok": False}
            else:
                reply = {"ok": _verify_parsed(request["pred"], golds[gold], request["t"]), "gold_ok": True}
        except Exception as err:  # noqa: BLE001 - a verdict, never a crash
            reply = {"ok": False, "gold_ok": True, "error": type(err).__name__}
        proto.write(json.dumps(reply) + "\n")
        proto.flush()


def _die_with_parent() -> None:
    """Linux: ask for SIGKILL when the parent dies, so a worker stuck in C never outlives it."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort only
        pass


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

    def _readline(self, deadline: float) -> bytes | None:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            readable, _, _ = select.select([fd], [], [], left)
            if not readable:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError("math-verify worker exited")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def wait_ready(self, timeout: float) -> bool:
        if not self.ready:
            line = self._readline(time.monotonic() + timeout)
            self.ready = line == b"ready"
        return self.ready

    def _request(self, request: dict, timeout: float) -> dict | None:
        self.proc.stdin.write((json.dumps(request) + "\n").encode("ascii"))
        self.proc.stdin.flush()
        line = self._readline(time.monotonic() + timeout)
        return None if line is None else json.loads(line)

    def call(self, pred: str, gold: str, timeout: float) -> dict | None:
        """The reply, or None when the call overran ``timeout`` (the worker is then useless). The
        first time this worker meets ``gold`` it parses it first, in a call of its own under the
        gold budget, so the answer's limit covers the answer only."""
        if gold not in self.golds:
            if len(self.golds) >= MAX_WORKER_GOLDS:  # the worker clears its cache at this size too
                self.golds.clear()
            reply = self._request({"gold": gold, "gold_t": GOLD_PARSE_TIMEOUT_S}, GOLD_PARSE_TIMEOUT_S + 5)
            if reply is None or not reply.get("gold_ok"):
                return None if reply is None else {"ok": False, "gold_ok": False}
            self.golds.add(gold)
        return self._request({"pred": pred, "gold": gold, "t": max(1, int(timeout)), "gold_t": GOLD_PARSE_TIMEOUT_S}, timeout)

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
    """Runs math-verify in a worker process with a hard wall-clock limit.

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

    def verify(self, pred: str, gold: str, timeout: float) -> dict | None:
        with self._lock:
            try:
                worker = self._ensure()
            except (OSError, RuntimeError, EOFError, ValueError) as err:
                self.close()
                self.unavailable = f"{type(err).__name__}: {err}"
                raise
            try:
                reply = worker.call(pred, gold, timeout)
            except (OSError, EOFError, ValueError):
                reply = {"ok": False, "gold_ok": True, "error": "worker died"}
                self._retire_active()
                return reply
            if reply is None:
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


def guarded_math_verify(pred_latex: str, gold: Gold, timeout: float) -> bool:
    """math-verify's verdict on ``pred_latex`` against ``gold``, in the worker (False when it
    overruns ``timeout``), or in this process when no worker can run."""
    if guard.unavailable is None and os.name == "posix" and sys.executable:
        try:
            reply = guard.verify(pred_latex, gold.latex, timeout)
        except (OSError, RuntimeError, EOFError, ValueError):
            warn_once("worker", f"math-verify worker unavailable ({guard.unavailable}); verifying in process")
        else:
            if reply is None:
                stats["timeout"] += 1
                return False
            stats["math_verify"] += 1
            if reply.get("error"):
                stats["worker_error"] += 1
            if not reply.get("gold_ok", True):  # parsed here but not there: should not happen
                stats["worker_gold_unparsed"] += 1
                warn_once(f"gold:{gold.text}", f"the math-verify worker cannot parse the gold answer {gold.text!r}")
            return bool(reply["ok"])
    # No worker: math-verify here, on the gold parsed once in this process, with signal timeouts
    # for the answer only where they work (the main thread).
    stats["in_process"] += 1
    gold = parsed_gold(gold)
    on_main = threading.current_thread() is threading.main_thread()
    try:
        return _verify_parsed(pred_latex, gold.parsed, max(1, int(timeout)) if on_main else None)
    except Exception:  # noqa: BLE001
        return False
