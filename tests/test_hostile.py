"""The reward path against hostile completions (tests/hostile_completions.jsonl).

Every completion must get a verdict within ``VERDICT_BOUND_S`` of wall time (a bound against
hangs, not a benchmark), never raise, and never run code or read files it names: payloads that
would create a canary file do not create it, and a file holding the gold answer, named with
``\\input{}``, does not make the answer right.

Rows hold either ``completion`` or ``prefix + unit * times + suffix`` (megabyte strings are built
here, not stored). ``{CANARY}`` and ``{GOLDFILE}`` are replaced by temporary paths.

Run as a script to print each case's verdict time, with ``--plain`` also the time plain
math-verify (``verify(parse(gold), parse(completion))``, default settings, in a subprocess killed
after ``--plain-limit`` seconds) takes on the same case.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from tepo import rewards
from tepo.rewards import verify as verify_mod
from tepo.rewards import worker as worker_mod
from tepo.rewards import canonical_answer, extract_answer, math_reward, math_reward_func, verify_answer
from tepo.rewards.gold import prepare_gold

CORPUS = Path(__file__).with_name("hostile_completions.jsonl")
VERDICT_BOUND_S = 2.0


def load_corpus() -> list[dict]:
    rows = [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]
    for i, row in enumerate(rows):
        row["index"] = i
    return rows


def build(row: dict, canary: str, goldfile: str) -> str:
    text = row["completion"] if "unit" not in row else row["prefix"] + row["unit"] * row["times"] + row["suffix"]
    return text.replace("{CANARY}", canary).replace("{GOLDFILE}", goldfile)


ROWS = load_corpus()


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    goldfile = d / "gold.tex"
    goldfile.write_text("42", encoding="utf-8")
    # The worker process starts once per session (importing sympy takes a second or two); that
    # start-up is not a per-completion cost, so it happens here, before any case is timed.
    assert verify_answer("x+1", "1+x")
    yield {"canary": str(d / "canary"), "goldfile": str(goldfile)}
    assert not (d / "canary").exists(), "a hostile payload was executed: the canary file exists"


def test_corpus_is_big_and_well_formed():
    assert len(ROWS) >= 50
    kinds = {r["kind"] for r in ROWS}
    for kind in ("code", "file", "tower", "factorial", "huge_int", "sum", "integral", "nested_braces",
                 "megabyte", "many_boxes", "nul", "surrogate", "non_ascii_digits"):
        assert kind in kinds, kind
    for r in ROWS:
        assert isinstance(r["gold"], str) and r["gold"]
        assert ("completion" in r) != ("unit" in r)


@pytest.mark.slow
@pytest.mark.parametrize("row", ROWS, ids=[f"{r['index']:02d}-{r['kind']}" for r in ROWS])
def test_hostile_completion_gets_a_bounded_verdict(row, paths):
    text = build(row, paths["canary"], paths["goldfile"])
    start = time.perf_counter()
    reward = math_reward(text, row["gold"])
    elapsed = time.perf_counter() - start
    assert reward in (0.0, 1.0)
    assert elapsed <= VERDICT_BOUND_S, f"verdict took {elapsed:.2f} s"
    if "expect" in row:
        assert reward == row["expect"]
    # the other entry points are bounded too and never raise
    start = time.perf_counter()
    answer = extract_answer(text)
    canonical_answer(text)
    if answer is not None:
        verify_answer(answer, row["gold"])
    assert time.perf_counter() - start <= VERDICT_BOUND_S
    assert not os.path.exists(paths["canary"])


def test_no_code_runs_in_process(tmp_path, monkeypatch):
    """The in-process paths (extraction, plain numbers, pre-screen) on payloads that would set an
    environment variable or create a file if evaluated."""
    monkeypatch.delenv("TEPO_CANARY", raising=False)
    canary = tmp_path / "canary"
    payloads = [
        "__import__('os').environ.__setitem__('TEPO_CANARY', '1')",
        f"open({str(canary)!r}, 'w').write('1')",
        "exec(\"import os; os.environ['TEPO_CANARY'] = '1'\")",
    ]
    for p in payloads:
        for text in (f"\\boxed{{{p}}}", f"The final answer is {p}", f"#### {p}"):
            assert math_reward(text, "1") == 0.0
            canonical_answer(text)
    assert "TEPO_CANARY" not in os.environ
    assert not canary.exists()


def test_guard_stops_an_overrunning_call_and_recovers(paths):
    """A call past its CPU-time budget (0.3 s here) is cut off, counted as ``timeout_cpu`` (and in
    ``timeout``), and the next call is answered."""
    pred = "9^{9^{9^{9}}}"  # past the pre-screen on purpose: straight to the worker
    before = {k: rewards.verifier_stats().get(k, 0) for k in ("timeout", "timeout_cpu", "timeout_wall")}
    start = time.perf_counter()
    assert worker_mod.guarded_math_verify("$" + pred + "$", prepare_gold("5"), 0.3) is False
    assert time.perf_counter() - start < VERDICT_BOUND_S
    after = {k: rewards.verifier_stats().get(k, 0) for k in before}
    assert after == {"timeout": before["timeout"] + 1, "timeout_cpu": before["timeout_cpu"] + 1,
                     "timeout_wall": before["timeout_wall"]}
    start = time.perf_counter()
    assert verify_answer("\\sqrt{12}", "2\\sqrt{3}")
    assert time.perf_counter() - start < VERDICT_BOUND_S  # the warm spare took over


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_gets_its_own_worker(paths):
    """A forked process (a data-loader worker, say) must not talk over its parent's pipes."""
    parent_worker = worker_mod.guard._active.proc.pid
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report the verdict and the worker it used, then leave at once
        try:
            verify_mod.clear_cache()
            ok = verify_answer("\\sqrt{18}", "3\\sqrt{2}")
            os.write(write_end, json.dumps([ok, worker_mod.guard._active.proc.pid]).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    ok, child_worker = json.loads(os.read(read_end, 1000))
    os.close(read_end)
    assert ok is True and child_worker != parent_worker
    assert verify_answer("\\sqrt{50}", "5\\sqrt{2}") and worker_mod.guard._active.proc.pid == parent_worker


def test_off_main_thread(paths):
    """TRL or an evaluator may score from a thread: no signal works there, the worker's CPU-time
    budget still does."""
    results: list = []

    def score():
        try:
            start = time.perf_counter()
            r1 = math_reward_func(["\\boxed{\\sqrt{8}}", "\\boxed{9^{9^{9^{9}}}}", "\\boxed{(1,3]}"],
                                  answer=["2\\sqrt{2}", "5", "(1, 3]"])
            r2 = worker_mod.guarded_math_verify("$(10^{6})!$", prepare_gold("5"), worker_mod.VERIFY_CPU_S)
            results.append((r1, r2, time.perf_counter() - start))
        except BaseException as err:  # noqa: BLE001 - reported below
            results.append(err)

    thread = threading.Thread(target=score)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert not isinstance(results[0], BaseException), results[0]
    r1, r2, elapsed = results[0]
    assert r1 == [1.0, 0.0, 1.0] and r2 is False
    assert elapsed < 4 * VERDICT_BOUND_S


# --------------------------------------------------------------------------------------------
# timing table (not a test): python tests/test_hostile.py [--plain] [--plain-limit 60]

_PLAIN_SNIPPET = """
import json, sys, time
from math_verify import parse, verify
case = json.loads(sys.stdin.read())
gold = case["gold"] if "$" in case["gold"] else "$" + case["gold"] + "$"
start = time.perf_counter()
try:
    verdict = verify(parse(gold), parse(case["text"]))
except Exception as err:
    verdict = type(err).__name__
print(json.dumps({"seconds": time.perf_counter() - start, "verdict": str(verdict)}))
"""


def _plain_math_verify(text: str, gold: str, limit: float) -> str:
    import subprocess

    payload = json.dumps({"text": text, "gold": gold})
    start = time.perf_counter()
    try:
        out = subprocess.run([sys.executable, "-c", _PLAIN_SNIPPET], input=payload, capture_output=True,
                             text=True, timeout=limit, errors="replace")
    except subprocess.TimeoutExpired:
        return f">{limit:.0f} s (killed)"
    if out.returncode != 0:
        return f"crashed after {time.perf_counter() - start:.1f} s ({out.stderr.strip().splitlines()[-1:]})"
    row = json.loads(out.stdout.strip().splitlines()[-1])
    return f"{row['seconds']:.3f} s ({row['verdict']})"


def _main() -> None:
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plain", action="store_true", help="also time plain math-verify on each case")
    parser.add_argument("--plain-limit", type=float, default=60.0, help="kill plain math-verify after this many seconds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        canary, goldfile = os.path.join(d, "canary"), os.path.join(d, "gold.tex")
        Path(goldfile).write_text("42", encoding="utf-8")
        start = time.perf_counter()
        verify_answer("x+1", "1+x")
        print(f"worker start-up: {time.perf_counter() - start:.2f} s")
        slowest = (0.0, None)
        for row in ROWS:
            text = build(row, canary, goldfile)
            start = time.perf_counter()
            reward = math_reward(text, row["gold"])
            took = time.perf_counter() - start
            slowest = max(slowest, (took, row["index"]), key=lambda x: x[0])
            line = f"{row['index']:3d} {row['kind']:17s} reward {reward:.0f}  tepo {took:7.3f} s"
            if args.plain:
                line += f"  plain math-verify {_plain_math_verify(text, row['gold'], args.plain_limit)}"
            print(line, flush=True)
        print(f"slowest tepo verdict: {slowest[0]:.3f} s (case {slowest[1]}); canary created: {os.path.exists(canary)}")
        print(f"verifier stats: {rewards.verifier_stats()}")


if __name__ == "__main__":
    _main()
