"""A verdict never depends on how busy the machine is (issue 28).

An answer's verification is budgeted in the CPU time it uses, not in wall-clock time: the same
answer gets the same verdict on an idle machine and on one whose cores are saturated by other
processes. A wall-clock backstop still stops a worker that is never scheduled. Each limit that
fires is counted in ``verifier_stats`` under its own name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import contextmanager

import pytest

from tepo import rewards
from tepo.rewards import math_reward, verify_answer
from tepo.rewards import verify as verify_mod
from tepo.rewards import worker as worker_mod
from tepo.rewards.gold import prepare_gold

# Busy-loop processes per core. The worker sleeps between requests, and Linux's scheduler lets a
# process that wakes from a sleep run before the busy ones for a while, so a short verification
# barely notices 3 busy processes per core; at 12 per core the wall-clock budget (1.5 s, with
# math-verify's own 1 s alarms) failed all three verdicts on the development machine (2 cores).
BUSY_PER_CORE = 12
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
BUSY_PROCESSES = BUSY_PER_CORE * min(CORES, 4)  # 24 on the development machine; at most 48
BUSY_SELF_LIMIT_S = 180  # a busy process stops by itself after this, even if the test dies before its clean-up

# Equivalent (the product of the sum's terms in the other order); about 0.15 s of CPU to verify.
EQUIVALENT = ("The answer is $\\boxed{F_n = \\sum_{k=0}^{n-1} F_{n-k-1} F_k}$.",
              "F_n = \\sum_{k=0}^{n-1} F_k F_{n-k-1}")


@contextmanager
def saturated_cores(n: int):
    """``n`` busy-loop processes for the duration of the block, killed at its end."""
    loop = f"import time\nend = time.monotonic() + {BUSY_SELF_LIMIT_S}\nwhile time.monotonic() < end:\n    pass\n"
    busy: list[subprocess.Popen] = []
    try:
        for _ in range(n):
            busy.append(subprocess.Popen([sys.executable, "-c", loop]))
        yield busy
    finally:
        for p in busy:
            p.kill()
        for p in busy:
            p.wait(timeout=30)


def stat(name: str) -> int:
    return rewards.verifier_stats().get(name, 0)


def test_an_equivalent_answer_scores_1_while_other_processes_saturate_the_cores():
    """Failed with the wall-clock budget (1.5 s, math-verify's own 1 s alarms): 0.0 under this load."""
    verify_answer("x+1", "1+x")  # idle: the worker and its spare start (importing sympy) before the load
    timeouts = stat("timeout")
    with saturated_cores(BUSY_PROCESSES) as busy:
        for _ in range(3):
            verify_mod.clear_cache()  # verified again each time, not answered from tepo's cache
            assert math_reward(*EQUIVALENT) == 1.0
        assert all(p.poll() is None for p in busy), "a busy process ended early: the load did not last"
    assert stat("timeout") == timeouts


def test_a_verification_over_its_cpu_budget_is_counted_as_a_cpu_timeout():
    """A power tower (past the pre-screen on purpose) runs past a 0.3 s CPU budget: the answer is
    wrong, ``timeout_cpu`` counts it, and the next call is answered."""
    verify_answer("x+1", "1+x")  # the worker is up
    cpu, wall, total = stat("timeout_cpu"), stat("timeout_wall"), stat("timeout")
    assert worker_mod.guarded_math_verify("$9^{9^{9^{9}}}$", prepare_gold("5"), 0.3) is False
    assert (stat("timeout_cpu"), stat("timeout_wall"), stat("timeout")) == (cpu + 1, wall, total + 1)
    verify_mod.clear_cache()
    assert verify_answer("\\sqrt{12}", "2\\sqrt{3}")


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs SIGSTOP")
def test_a_worker_that_is_never_scheduled_is_stopped_by_the_wall_clock_backstop():
    """A stopped worker uses no CPU time, so no CPU budget can end the wait: the wall-clock backstop
    does, ``timeout_wall`` counts it, and the spare worker answers the next call."""
    verify_mod.clear_cache()
    verify_answer("\\sqrt{8}", "3\\sqrt{2}")  # the worker and its spare are up; the worker knows this gold
    stopped = worker_mod.guard._active.proc
    cpu, wall, total = stat("timeout_cpu"), stat("timeout_wall"), stat("timeout")
    os.kill(stopped.pid, signal.SIGSTOP)
    try:
        assert worker_mod.guarded_math_verify("$\\sqrt{18}$", prepare_gold("3\\sqrt{2}"), 1.0, wall_s=2.0) is False
    finally:
        if stopped.poll() is None:
            os.kill(stopped.pid, signal.SIGCONT)
    assert (stat("timeout_cpu"), stat("timeout_wall"), stat("timeout")) == (cpu, wall + 1, total + 1)
    assert stopped.wait(timeout=10) is not None  # killed, not left behind
    assert worker_mod.guard._active is not None and worker_mod.guard._active.proc is not stopped
    verify_mod.clear_cache()
    assert verify_answer("\\sqrt{18}", "3\\sqrt{2}")


def test_a_c_level_operation_past_the_budget_is_stopped_on_the_workers_cpu_time():
    """One long C-level operation (a huge integer power) never returns to the interpreter, so the
    worker's own CPU timer cannot interrupt it. The parent reads the worker's CPU time while it
    waits and gives up on it at the budget plus the grace ("cpu"), long before the wall-clock
    backstop. A stand-in worker that starts such an operation on its first request shows it."""
    if worker_mod.process_cpu_seconds(os.getpid()) is None:
        pytest.skip("no way to read a process's CPU time here (no /proc, no psutil)")
    stand_in = "import sys\nsys.stdin.readline()\nx = 3 ** (10 ** 9)\n"  # one C call of minutes
    w = object.__new__(worker_mod._Worker)
    w.proc = subprocess.Popen([sys.executable, "-c", stand_in], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    w.ready, w.golds, w._buf = True, {"$5$"}, b""
    try:
        assert w.call("$x$", "$5$", 0.3, 300.0) == "cpu"
    finally:
        w.kill()


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs a CPU-time timer")
def test_in_process_verification_has_the_same_cpu_budget(monkeypatch):
    """Where no worker can start, math-verify runs in this process under the same CPU-time budget
    (a CPU timer, on the main thread), not under math-verify's own wall-clock alarms."""
    monkeypatch.setattr(worker_mod.guard, "unavailable", "off in this test: math-verify runs in this process")
    cpu, in_process = stat("timeout_cpu"), stat("in_process")
    assert worker_mod.guarded_math_verify("$9^{9^{9^{9}}}$", prepare_gold("5"), 0.3) is False
    assert (stat("timeout_cpu"), stat("in_process")) == (cpu + 1, in_process + 1)
    verify_mod.clear_cache()
    try:
        assert math_reward(*EQUIVALENT) == 1.0
        assert math_reward("The answer is $\\boxed{-[0,1)}$.", "1") == 0.0
    finally:
        verify_mod.clear_cache()
