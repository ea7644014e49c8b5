"""Studies: the splits, the paired bootstrap (known answers), `tepo study run` (resumes, skips what
is done, refuses changed runs) and `tepo study report` (numbers recompute from stored verdicts)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tepo.analysis.stats import paired_bootstrap, seed_bootstrap, seed_matched_bootstrap
from tepo.analysis.study import StudyError, load_study, select_settings
from tepo.tasks import check_disjoint, make_problems
from tepo.tasks.arithmetic import split_of

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# splits
def test_train_validation_test_are_disjoint_by_content_and_deterministic():
    train = make_problems(3000, levels=(1, 2, 3), split="train", seed=0, reserve_validation=True)
    val = make_problems(300, levels=(1, 2, 3), split="validation", seed=0)
    test = make_problems(600, levels=(1, 2, 3), split="test", seed=0)
    check_disjoint({"train": train, "validation": val, "test": test})
    for name, problems in (("train", train), ("validation", val), ("test", test)):
        regions = {split_of(p["content"].split("|")[0], tuple(map(int, p["content"].split("|")[1].split(",")))) for p in problems}
        assert regions == {name}
    assert make_problems(300, levels=(1, 2, 3), split="validation", seed=0) == val
    # without the reservation the train split keeps its old region, which holds validation problems
    old_train = make_problems(3000, levels=(1, 2, 3), split="train", seed=0)
    with pytest.raises(ValueError, match="train and validation problems overlap"):
        check_disjoint({"train": old_train, "validation": val})
    assert make_problems(400, levels=(1, 2), split="test", seed=0) == make_problems(400, levels=(1, 2), split="test", seed=0)


def test_the_studys_test_split_repeats_163_training_operations_in_other_words():
    """docs/results.md's claim: the split key includes the template, so 163 of tepo-arith's 400 test
    problems have the operation and operands of a training problem (under another template)."""
    from tepo.tasks import load_task

    train = load_task(task="arithmetic", split="train", reserve_validation=True, seed=0, levels=(1, 2))
    test = load_task(task="arithmetic", split="test", seed=0, num_problems=400, levels=(1, 2))
    check_disjoint({"train": train, "test": test})  # disjoint by (template, operands)

    def operation(problem):
        template, operands = problem["content"].split("|")
        return template.split("-")[0], operands  # add-find|3,4 -> (add, "3,4")

    seen = {operation(p) for p in train}
    assert sum(operation(p) in seen for p in test) == 163
    assert "163 of the 400 test problems" in " ".join((ROOT / "docs" / "results.md").read_text().split())


def test_check_disjoint_compares_text_and_content_not_ids():
    a = [{"id": "1", "problem": "Ava has 3 marbles.  How many?", "answer": "3"}]
    with pytest.raises(ValueError, match="same text"):
        check_disjoint({"train": a, "test": [{"id": "other", "problem": "ava has 3 marbles. how many?", "answer": "3"}]})
    check_disjoint({"train": a, "test": [{"id": "1", "problem": "Ben has 4 cards.", "answer": "4"}]})  # same id, other problem
    b = [{"id": "x", "problem": "Ben has 3 cards.", "answer": "3", "content": "add-find|3,4"}]
    with pytest.raises(ValueError, match="same content 'add-find\\|3,4'"):
        check_disjoint({"train": b, "test": [{"id": "y", "problem": "Tara has 3 shells.", "answer": "3", "content": "add-find|3,4"}]})


# --------------------------------------------------------------------------------------------
# bootstrap: constructed examples with known answers
def _binom_cdf(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k + 1))


def _binom_quantile(q: float, n: int, p: float) -> int:
    return next(k for k in range(n + 1) if _binom_cdf(k, n, p) >= q)


def test_paired_bootstrap_difference_is_binomial_over_the_problems_where_arms_differ():
    # Arm a and arm b agree on every problem except k = 30 of P = 200, where a is right and b wrong.
    # Resampling problems jointly, the difference of a replicate is (number of those 30 drawn) / P,
    # a Binomial(P, k/P) / P: its percentiles are known exactly, whatever the arms do elsewhere.
    rng = np.random.default_rng(1)
    P, k = 200, 30
    base = (rng.random(P) < 0.5).astype(float)
    a, b = base.copy(), base.copy()
    a[:k], b[:k] = 1.0, 0.0
    result = paired_bootstrap({"a": a[None, :], "b": b[None, :]}, replicates=40_000, seed=3)
    pair = result.pairs[("a", "b")]
    assert pair.estimate == pytest.approx(k / P, abs=1e-15)
    for q, got in ((0.025, pair.low), (0.975, pair.high)):
        # the empirical quantile lies within one binomial step of the exact one
        assert abs(got - _binom_quantile(q, P, k / P) / P) <= 1.0 / P + 1e-12
    diffs = result.replicates["a"] - result.replicates["b"]
    assert diffs.var() == pytest.approx((k / P) * (1 - k / P) / P, rel=0.05)
    # unpaired (problems drawn apart for each arm) the interval would be far wider: the pairing is real
    unpaired_sd = math.sqrt(a.var() / P + b.var() / P)
    assert diffs.std() < 0.6 * unpaired_sd


def test_seed_resampling_within_an_arm_is_binomial_over_its_seeds():
    # Arm a: 4 seeds, two right on every problem, two wrong on every problem; arm b: always wrong.
    # Problems then do not matter and a replicate mean of a is Binomial(4, 1/2) / 4.
    a = np.array([[1.0] * 50, [1.0] * 50, [0.0] * 50, [0.0] * 50])
    b = np.zeros((3, 50))
    result = paired_bootstrap({"a": a, "b": b}, replicates=40_000, seed=5)
    assert np.all(result.replicates["b"] == 0.0)
    values, counts = np.unique(np.round(result.replicates["a"], 12), return_counts=True)
    assert values.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    exact = np.array([math.comb(4, j) / 16 for j in range(5)])
    assert np.all(np.abs(counts / counts.sum() - exact) < 4 * np.sqrt(exact * (1 - exact) / 40_000))
    assert result.arms["a"].estimate == 0.5 and (result.arms["a"].low, result.arms["a"].high) == (0.0, 1.0)


def test_identical_arms_differ_by_exactly_zero_and_seed_bootstrap_matches():
    # one seed each: only problems are resampled, jointly, so identical arms differ by 0 in every replicate
    v = (np.random.default_rng(2).random((1, 60)) < 0.4).astype(float)
    result = paired_bootstrap({"a": v, "b": v.copy()}, replicates=500, seed=0)
    assert np.all(result.replicates["a"] == result.replicates["b"]) and result.replicates["a"].std() > 0
    assert (result.pairs[("a", "b")].low, result.pairs[("a", "b")].high) == (0.0, 0.0)
    s = seed_bootstrap({"x": np.array([10.0, 10.0, 10.0]), "y": np.array([4.0, 8.0])}, replicates=2000, seed=0)
    assert (s.arms["x"].low, s.arms["x"].high) == (10.0, 10.0)
    assert s.pairs[("x", "y")].estimate == 4.0
    assert set(np.unique(np.round(s.replicates["y"], 12))) <= {4.0, 6.0, 8.0}
    # one seed: nothing to resample, so no interval (not a zero-width one), for it and its pairs
    s = seed_bootstrap({"one": np.array([3.0]), "y": np.array([4.0, 8.0])}, replicates=200, seed=0)
    assert (s.arms["one"].low, s.arms["one"].high) == (None, None) and s.arms["one"].estimate == 3.0
    assert (s.pairs[("one", "y")].low, s.pairs[("one", "y")].high) == (None, None)
    assert s.pairs[("one", "y")].estimate == -3.0 and s.arms["y"].low == 4.0 and s.arms["y"].high == 8.0
    with pytest.raises(ValueError, match="different numbers of problems"):
        paired_bootstrap({"a": np.ones((2, 3)), "b": np.ones((2, 4))})


def test_a_difference_is_read_as_excluding_zero_only_with_seeds_on_both_sides():
    from tepo.analysis.study_report import excludes_zero

    # one seed each: the interval is problems only, however far from 0
    one = paired_bootstrap({"a": np.ones((1, 40)), "b": np.zeros((1, 40))}, replicates=200).to_dict()["pairs"][0]
    assert (one["low"], one["n"]) == (1.0, 1) and excludes_zero(one) == "–"
    two = paired_bootstrap({"a": np.ones((2, 40)), "b": np.zeros((2, 40))}, replicates=200).to_dict()["pairs"][0]
    assert excludes_zero(two) == "yes" and excludes_zero({**two, "low": -0.1}) == "no"
    assert excludes_zero({**two, "low": -0.3, "high": -0.1}) == "yes"


def test_seed_matched_bootstrap_cancels_a_seed_effect_both_arms_share():
    # Seeds 1-2 are easy for both arms (right on every problem but the k where they differ), seeds 3-4
    # hard (wrong on all of those): a seed effect both arms share, as a training order would be. On
    # every seed, a is right and b wrong on the same k = 30 of P = 200 problems, so drawing seeds
    # jointly for both arms, a replicate difference is Binomial(P, k/P) / P, whatever seeds it draws.
    P, k = 200, 30
    a, b = {}, {}
    for s in (1, 2, 3, 4):
        row = np.full(P, 1.0 if s <= 2 else 0.0)
        a[s], b[s] = row.copy(), row.copy()
        a[s][:k], b[s][:k] = 1.0, 0.0
    a[9] = np.ones(P)  # a seed only arm a has: not in the matched difference
    b = dict(reversed(list(b.items())))  # matched by seed label, not by position
    pairs = seed_matched_bootstrap({"a": a, "b": b, "c": {5: np.zeros(P)}, "d": {3: b[3]}}, replicates=40_000, seed=3)
    pair = pairs[("a", "b")]
    assert pair.n == 4 and pair.estimate == pytest.approx(k / P, abs=1e-15)
    for q, got in ((0.025, pair.low), (0.975, pair.high)):
        assert abs(got - _binom_quantile(q, P, k / P) / P) <= 1.0 / P + 1e-12
    # the primary analysis draws seeds apart for each arm: the shared seed effect widens its interval
    primary = paired_bootstrap({"a": np.stack([a[s] for s in (1, 2, 3, 4)]), "b": np.stack([b[s] for s in (1, 2, 3, 4)])},
                               replicates=40_000, seed=3).pairs[("a", "b")]
    assert primary.estimate == pytest.approx(pair.estimate, abs=1e-15)
    assert primary.high - primary.low > 4 * (pair.high - pair.low)
    # no common seed: no pair; one common seed: n = 1 (problems only, not read as excluding 0)
    assert ("a", "c") not in pairs and ("c", "d") not in pairs
    assert pairs[("b", "d")].n == 1 and pairs[("b", "d")].estimate == 0.0
    assert pairs[("a", "d")].n == 1 and pairs[("a", "d")].estimate == pytest.approx(k / P, abs=1e-15)
    assert seed_matched_bootstrap({"a": a, "b": b}, seed=1) == seed_matched_bootstrap({"a": a, "b": b}, seed=1)
    with pytest.raises(ValueError, match="one length"):
        seed_matched_bootstrap({"a": {1: np.ones(3)}, "b": {1: np.ones(4)}})


def test_paired_bootstrap_same_seed_same_answer():
    v = {"a": np.eye(3), "b": np.ones((2, 3))}
    assert paired_bootstrap(v, seed=4).to_dict() == paired_bootstrap(v, seed=4).to_dict()


# --------------------------------------------------------------------------------------------
# study runs with a fake trainer (no model: the study's bookkeeping alone)
FAKE_TRAIN = textwrap.dedent('''
    """A stand-in for `tepo train`: writes the files a run leaves, deterministically from its arguments."""
    import json, os, signal, sys, time, zlib
    from pathlib import Path
    argv = sys.argv[1:]
    opts = dict(zip(argv[::2], argv[1::2]))
    out = Path(opts["--output_dir"]); out.mkdir(parents=True, exist_ok=True)
    with open(os.environ["FAKE_CALLS"], "a") as f:
        f.write(json.dumps({"out": str(out), "args": argv, "cpus": sorted(os.sched_getaffinity(0)),
                            "omp": os.environ.get("OMP_NUM_THREADS")}) + "\\n")
    time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
    kill = os.environ.get("FAKE_KILL_STUDY_AT", "")
    if kill and kill in str(out) and not Path(os.environ["FAKE_CALLS"] + ".killed").exists():
        Path(os.environ["FAKE_CALLS"] + ".killed").write_text("1")
        (out / "metrics.jsonl").write_text('{"step": 1}\\n')  # a partial run
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(30)
        sys.exit(1)
    seed = int(opts["--seed"]); score = float(opts.get("--fake_score", "0.3"))
    steps = 4
    rows = [{"step": s, "reward_mean": 0.1 * s, "entropy_mean": 1.0 - 0.1 * s - 0.01 * seed,
             "clip_frac": 0.05, **({"heldout_accuracy": score * s / steps} if s % 2 == 0 else {})} for s in range(1, steps + 1)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in rows))
    (out / "run.json").write_text(json.dumps({"config": {"objective": opts.get("--objective"), "seed": seed}}))
    (out / "eval_before.json").write_text(json.dumps({"accuracy": score / 10, "num_problems": int(opts["--heldout_num_problems"])}))
    (out / "eval_after.json").write_text(json.dumps({"accuracy": score, "num_problems": int(opts["--heldout_num_problems"])}))
    n = int(opts["--test_num_problems"])
    if n:
        key = zlib.crc32(f"{opts.get('--objective')}-{seed}-{score}".encode())
        verdicts = [bool((key >> (i % 29)) & 1) ^ (i % 3 == 0) for i in range(n)]
        (out / "eval_test.json").write_text(json.dumps({"accuracy": sum(verdicts) / n, "num_problems": n,
                                                        "ids": [f"t{i}" for i in range(n)], "verdicts": verdicts}))
    flagged = opts.get("--objective") == "dapo" and seed == 1
    (out / "monitor.json").write_text(json.dumps({"verdicts": [{"kind": "entropy_fall", "severity": "warning", "first_step": 2,
                                                                "last_step": 4, "message": "m"}] if flagged else []}))
    (out / "checkpoint-4").mkdir(exist_ok=True); (out / "checkpoint-4" / "model.bin").write_text("weights")
''')

STUDY = textwrap.dedent('''
    name: fake
    description: two arms, one tuned over two settings
    base: {task: arithmetic, max_steps: 4}
    validation_problems: 20
    test_problems: 30
    target: 0.2
    arms:
      grpo: {objective: grpo}
      dapo: {objective: dapo}
    tuning:
      seeds: [0]
      grid:
        dapo:
          - {clip_high: 0.2, fake_score: 0.25}
          - {clip_high: 0.28, fake_score: 0.4}
          - {clip_high: 0.4, fake_score: 0.4}
    final:
      seeds: [1, 2]
''')


@pytest.fixture
def fake_study(tmp_path):
    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE_TRAIN)
    study = tmp_path / "study.yaml"
    study.write_text(STUDY + f"results_dir: {tmp_path / 'results'}\nruns_dir: {tmp_path / 'runs'}\n")
    calls = tmp_path / "calls.jsonl"
    env = dict(os.environ, FAKE_CALLS=str(calls), PYTHONPATH=str(ROOT / "src"))

    def run(*args, extra_env=None, cwd=None):
        return subprocess.run([sys.executable, "-m", "tepo.cli", "study", *args, str(study), "--train_command",
                               f"{sys.executable} {fake}"], env={**env, **(extra_env or {})}, capture_output=True,
                              text=True, timeout=120, cwd=cwd)

    def trained():
        return [Path(json.loads(line)["out"]).relative_to(tmp_path / "runs").as_posix()
                for line in calls.read_text().splitlines()] if calls.exists() else []

    return study, run, trained, tmp_path


def test_killed_study_resumes_and_skips_finished_runs(fake_study):
    study, run, trained, tmp = fake_study
    first = run("run", extra_env={"FAKE_KILL_STUDY_AT": "tuning/dapo/g1"})
    assert first.returncode == -signal.SIGKILL, first.stdout + first.stderr
    assert trained() == ["tuning/dapo/g0-s0", "tuning/dapo/g1-s0"]
    assert (tmp / "results/tuning/dapo/g0-s0/DONE.json").exists()
    assert not (tmp / "results/tuning/dapo/g1-s0").exists()  # killed mid-run: nothing stored
    second = run("run")
    assert second.returncode == 0, second.stdout + second.stderr
    order = trained()[2:]
    assert "tuning/dapo/g0-s0" not in order  # not retrained
    assert order[:2] == ["tuning/dapo/g1-s0", "tuning/dapo/g2-s0"]
    assert sorted(order[2:]) == sorted(["final/grpo-s1", "final/dapo-s1", "final/grpo-s2", "final/dapo-s2"])
    # the interrupted run was started again with --resume_from_checkpoint (it resumes when a checkpoint exists)
    resumed = [json.loads(line)["args"] for line in (tmp / "calls.jsonl").read_text().splitlines()][2]
    assert resumed[resumed.index("--resume_from_checkpoint") + 1] == "true"
    # the tie between g1 and g2 (both 0.4) goes to g1, the one listed first
    assert select_settings(load_study(study))["dapo"]["selected"] == 1
    dapo_final = json.loads((tmp / "results/final/dapo-s1/DONE.json").read_text())
    assert dapo_final["options"] == {"objective": "dapo", "clip_high": 0.28, "fake_score": 0.4}
    assert run("run").returncode == 0 and len(trained()) == 2 + len(order)  # a third call trains nothing
    # only small files are stored; checkpoints stay in runs/
    stored = {p.name for p in (tmp / "results").rglob("*") if p.is_file()}
    assert "model.bin" not in stored and (tmp / "runs/final/dapo-s1/checkpoint-4/model.bin").exists()


def test_a_runs_duration_excludes_the_wait_for_the_cpu_lock(fake_study, monkeypatch):
    """DONE.json's duration_s is the run's own time; the wait for the CPU lock is lock_wait_s."""
    import contextlib

    import tepo.analysis.runner as runner_module
    import tepo.analysis.study as study_module

    study_file, _, _, tmp = fake_study
    study = load_study(study_file)
    run = study_module.tuning_runs(study)[0]

    class Clock:
        now = 1000.0

        def monotonic(self):
            return self.now

    clock = Clock()

    @contextlib.contextmanager
    def busy_lock(path):  # another job holds the CPU for ten minutes
        clock.now += 600.0
        yield

    def runner(command, log_path, env):
        out = Path(command[command.index("--output_dir") + 1])
        (out / "metrics.jsonl").write_text('{"step": 1}\n')
        (out / "eval_after.json").write_text('{"accuracy": 0.5}')
        clock.now += 90.0
        return 0

    monkeypatch.setattr(runner_module, "time", clock)
    monkeypatch.setattr(runner_module, "cpu_lock_of", busy_lock)
    status = runner_module.train_one(study, run, runner=runner, train_command=["train"], cpu_lock="lock",
                                    echo=lambda line: None, prefix="")
    done = json.loads((run.results(study) / "DONE.json").read_text())
    assert status == "done" and done["duration_s"] == 90.0 and done["lock_wait_s"] == 600.0


def test_plan_is_one_json_object_a_line_with_the_command_of_each_run(fake_study):
    study, run, trained, tmp = fake_study
    out = run("plan")
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stdout.splitlines()]
    keys = [r["key"] for r in records]
    assert keys[:3] == ["tuning/dapo/g0-s0", "tuning/dapo/g1-s0", "tuning/dapo/g2-s0"]
    assert {r["status"] for r in records[:3]} == {"todo"} and records[0]["run"][-2:] == ["--only", "tuning/dapo/g0-s0"]
    assert records[0]["train"][records[0]["train"].index("--output_dir") + 1] == str(tmp / "runs/tuning/dapo/g0-s0")
    # grpo has no grid: its final runs are known now; dapo's wait for its tuning
    assert {r["key"]: r["status"] for r in records[3:]} == {"final/grpo-s1": "todo", "final/grpo-s2": "todo",
                                                            "final/dapo-s1": "later", "final/dapo-s2": "later"}


def test_only_trains_the_run_it_names(fake_study):
    study, run, trained, tmp = fake_study
    out = run("run", "--only", "final/grpo-s2")
    assert out.returncode == 0, out.stdout + out.stderr
    assert trained() == ["final/grpo-s2"] and (tmp / "results/final/grpo-s2/DONE.json").exists()
    assert run("run", "--only", "final/grpo-s2").returncode == 0 and trained() == ["final/grpo-s2"]  # done: not again
    early = run("run", "--only", "final/dapo-s1")
    assert early.returncode == 2 and "still tuning" in early.stderr
    assert run("run", "--only", "final/nope-s1").returncode == 2


def test_two_runners_at_once_never_train_the_same_run(fake_study):
    study, run, trained, tmp = fake_study
    command = [sys.executable, "-m", "tepo.cli", "study", "run", str(study), "--train_command", f"{sys.executable} {tmp / 'fake_train.py'}"]
    env = dict(os.environ, FAKE_CALLS=str(tmp / "calls.jsonl"), PYTHONPATH=str(ROOT / "src"), FAKE_SLEEP="0.5")
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    keys = trained()
    assert len(keys) == len(set(keys)) == 7, keys  # 3 tuning + 4 final runs, each trained once
    assert all((tmp / "results" / key / "DONE.json").exists() for key in keys)


def test_jobs_train_runs_at_once_each_on_its_own_cores(fake_study):
    study, run, trained, tmp = fake_study
    out = run("run", "--jobs", "2", extra_env={"FAKE_SLEEP": "0.3"})
    assert out.returncode == 0, out.stdout + out.stderr
    calls = [json.loads(line) for line in (tmp / "calls.jsonl").read_text().splitlines()]
    assert len({c["out"] for c in calls}) == len(calls) == 7
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) >= 2:
        slots = {tuple(c["cpus"]) for c in calls}
        assert len(slots) == 2 and not set(slots.pop()) & set(slots.pop())  # two disjoint shares of the cores
        assert all(c["omp"] == str(len(c["cpus"])) for c in calls)


def test_study_refuses_a_finished_run_trained_otherwise(fake_study):
    study, run, trained, tmp = fake_study
    assert run("run").returncode == 0
    study.write_text(study.read_text().replace("max_steps: 4", "max_steps: 5"))
    again = run("run")
    assert again.returncode == 2 and "finished with other training arguments" in again.stderr


def test_report_numbers_recompute_from_the_stored_verdicts(fake_study):
    study, run, trained, tmp = fake_study
    assert run("run").returncode == 0
    report = run("report", cwd=tmp)
    assert report.returncode == 0, report.stderr
    summary = json.loads((tmp / "results/report/summary.json").read_text())
    verdicts = {}
    for arm in ("grpo", "dapo"):
        rows = [json.loads((tmp / f"results/final/{arm}-s{s}/eval_test.json").read_text())["verdicts"] for s in (1, 2)]
        verdicts[arm] = np.array(rows, dtype=float)
        assert summary["arms"][arm]["test_accuracy"]["estimate"] == pytest.approx(verdicts[arm].mean(), abs=1e-15)
        for s, row in zip((1, 2), rows):
            assert summary["arms"][arm]["test_accuracy_per_seed"][str(s)] == pytest.approx(sum(row) / len(row), abs=1e-15)
    again = paired_bootstrap(verdicts, replicates=summary["replicates"], seed=summary["bootstrap_seed"])
    pair = summary["pairs"]["test_accuracy"][0]
    assert (pair["a"], pair["b"]) == ("grpo", "dapo")
    assert (pair["estimate"], pair["low"], pair["high"]) == pytest.approx(
        (again.pairs[("grpo", "dapo")].estimate, again.pairs[("grpo", "dapo")].low, again.pairs[("grpo", "dapo")].high), abs=1e-15)
    matched = seed_matched_bootstrap({arm: dict(zip((1, 2), verdicts[arm])) for arm in verdicts},
                                     replicates=summary["replicates"], seed=summary["bootstrap_seed"])[("grpo", "dapo")]
    pair = summary["pairs"]["test_accuracy_seed_matched"][0]
    assert (pair["a"], pair["b"], pair["seeds"], pair["n"]) == ("grpo", "dapo", [1, 2], 2)
    assert (pair["estimate"], pair["low"], pair["high"]) == pytest.approx((matched.estimate, matched.low, matched.high), abs=1e-15)
    # steps-to-target 0.2: heldout at steps 2, 4 is score*s/4: grpo 0.15, 0.3 -> step 4; dapo (0.4) 0.2 -> step 2
    assert summary["arms"]["grpo"]["steps_to_target"]["estimate"] == 4.0
    assert summary["arms"]["dapo"]["steps_to_target"]["estimate"] == 2.0
    # end-of-run entropy: mean of the last 5 steps (all 4 here) of 1 - 0.1 s - 0.01 seed, over seeds 1 and 2
    assert summary["arms"]["grpo"]["end_entropy"]["estimate"] == pytest.approx(1.0 - 0.25 - 0.015, abs=1e-12)
    assert summary["arms"]["dapo"]["monitor_flagged"] == 1 and summary["arms"]["grpo"]["monitor_flagged"] == 0
    # before training, over the finished tuning runs (dapo's three settings, fake eval_before = score / 10)
    assert summary["tuning_before"] == pytest.approx((0.025 + 0.04 + 0.04) / 3, abs=1e-15)
    md = (tmp / "results/report/summary.md").read_text()
    assert "selected" in md and "grpo - dapo" in md and "Before training: 3.5%." in md
    page = (tmp / "results/report/index.html").read_text()
    # the page is committed: it names the results folder relative to where the report was made, not by a machine's path
    assert "from <code>results</code>" in page and str(tmp) not in page
    # a tampered verdict file is caught
    path = tmp / "results/final/grpo-s1/eval_test.json"
    data = json.loads(path.read_text())
    data["verdicts"][0] = not data["verdicts"][0]
    path.write_text(json.dumps(data))
    assert "not the mean of its verdicts" in run("report").stderr


README_WITH_MARKS = """# a project

Text the report leaves alone.

<!-- study:fake:tuning -->
stale
<!-- /study:fake:tuning -->

More text.

<!-- study:fake:pairs --><!-- /study:fake:pairs -->

<!-- study:other:tuning -->another study's block<!-- /study:other:tuning -->
"""


def test_report_rewrites_the_readmes_marked_tables_and_check_catches_a_drifted_figure(fake_study):
    study, run, trained, tmp = fake_study
    readme = tmp / "README.md"
    readme.write_text(README_WITH_MARKS)
    early = run("report", "--readme", str(readme), "--check")
    assert early.returncode == 2 and "no results yet" in early.stderr
    assert run("run").returncode == 0
    stale = run("report", "--readme", str(readme), "--check")
    assert stale.returncode == 1 and "table(s) tuning, pairs" in stale.stderr
    assert readme.read_text() == README_WITH_MARKS and not (tmp / "results/report").exists()  # a check writes nothing
    done = run("report", "--readme", str(readme))
    assert done.returncode == 0, done.stderr
    assert "rewrote table(s) tuning, pairs" in done.stdout
    text = readme.read_text()
    md = (tmp / "results/report/summary.md").read_text()
    for title in ("Tuning: validation accuracy at the last step (%), per setting",
                  "Test accuracy differences (points), paired by problem"):
        assert f"**{title}**" in text
        # the README's rows are the report's rows, character for character
        table = md.split(f"### {title}\n\n", 1)[1].split("\n\n", 1)[0]
        assert table.startswith("| ") and table in text
    assert "Text the report leaves alone." in text and "More text." in text
    assert "<!-- study:other:tuning -->another study's block<!-- /study:other:tuning -->" in text
    assert "Test accuracy (%)" not in text  # only the marked tables
    assert f"Regenerate: `tepo study report {study} --doc {readme}`" in text
    ok = run("report", "--readme", str(readme), "--check")
    assert ok.returncode == 0 and "match the results" in ok.stdout
    # a figure edited by hand (or results that changed under the README) fails the check, by table name
    readme.write_text(text.replace("| dapo | g1 |", "| dapo | g1 (best) |"))
    bad = run("report", "--readme", str(readme), "--check")
    assert bad.returncode == 1 and "table(s) tuning" in bad.stderr and "pairs" not in bad.stderr


def test_study_run_keeps_the_readmes_tables_current_and_commits_them_with_each_run(fake_study):
    study, run, trained, tmp = fake_study
    git = lambda *a: subprocess.run(["git", *a], cwd=tmp, capture_output=True, text=True, check=True).stdout
    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "start")
    readme = tmp / "README.md"
    readme.write_text(README_WITH_MARKS)
    git("add", "README.md")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "readme")
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    out = run("run", "--readme", str(readme), "--commit", "--max_runs", "2", extra_env=env)
    assert out.returncode == 1, out.stderr  # runs left: exit 1
    text = readme.read_text()
    assert "| dapo | g0 |" in text and "| s0: 25.0 |" in text and "| s0: 40.0 |" in text  # the two finished settings
    # each run's commit carries the README as it stood after that run
    for commit_msg, expect in (("tuning/dapo/g0-s0", "s0: 25.0"), ("tuning/dapo/g1-s0", "s0: 40.0")):
        sha = git("log", "--format=%H", f"--grep={commit_msg}").split()[0]
        files = git("show", "--name-only", "--format=", sha).split()
        assert "README.md" in files and f"results/{commit_msg}/DONE.json" in files
        assert expect in git("show", f"{sha}:README.md")
    assert git("status", "--porcelain", "README.md") == ""
    ok = run("report", "--readme", str(readme), "--check")
    assert ok.returncode == 0, ok.stderr


def test_study_run_refuses_a_malformed_readme_before_training(fake_study):
    study, run, trained, tmp = fake_study
    readme = tmp / "README.md"
    readme.write_text("<!-- study:fake:tuning -->\n")
    out = run("run", "--readme", str(readme))
    assert out.returncode == 2 and "never closed" in out.stderr and trained() == []


@pytest.mark.parametrize("text, message", [
    ("<!-- study:fake:tuning -->\n", "never closed"),
    ("<!-- study:fake:nonsense --><!-- /study:fake:nonsense -->", "names no table"),
    ("<!-- study:fake:tuning --><!-- /study:fake:tuning --><!-- study:fake:tuning --><!-- /study:fake:tuning -->",
     "marked twice"),
    ("no markers", "no <!-- study:fake:TABLE --> markers"),
])
def test_readme_marker_errors_name_the_file_and_marker(fake_study, text, message):
    study, run, trained, tmp = fake_study
    readme = tmp / "README.md"
    readme.write_text(text)
    assert run("run", "--max_runs", "1").returncode in (0, 1)
    out = run("report", "--readme", str(readme))
    assert out.returncode == 2 and message in out.stderr and str(readme) in out.stderr
    assert readme.read_text() == text


def test_the_docs_study_tables_match_the_committed_results():
    """docs/results.md's study tables are the committed results' tables: no figure there is typed by hand."""
    doc = ROOT / "docs" / "results.md"
    checked = 0
    for path in sorted((ROOT / "studies").glob("*.yaml")):
        name = load_study(path).name
        if f"<!-- study:{name}:" not in doc.read_text():
            continue
        out = subprocess.run([sys.executable, "-m", "tepo.cli", "study", "report", str(path.relative_to(ROOT)), "--check"],
                             cwd=ROOT, capture_output=True, text=True, timeout=600,
                             env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
        assert out.returncode == 0, out.stderr + out.stdout
        checked += 1
    assert checked, "docs/results.md marks no study's tables"


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.replace("arms:", "arms:\n  bad: {seed: 3}"), "set by the study"),
    (lambda s: s.replace("target: 0.2", ""), "'target'"),
    (lambda s: s.replace("grid:\n    dapo:", "grid:\n    gspo:"), "not in 'arms'"),
    (lambda s: s.replace("seeds: [1, 2]", "seeds: [1, 1]"), "listed twice"),
    (lambda s: s.replace("task: arithmetic, ", ""), "task: arithmetic"),
])
def test_study_file_errors_name_the_problem(tmp_path, edit, message):
    path = tmp_path / "s.yaml"
    path.write_text(edit(STUDY))
    with pytest.raises(StudyError, match=message):
        load_study(path)


def test_shipped_studies_load():
    for path in sorted((ROOT / "studies").glob("*.yaml")):
        study = load_study(path)
        assert study.final_seeds and study.arms


# --------------------------------------------------------------------------------------------
# one run's report
def test_one_run_report_marks_the_monitor_verdicts(fake_study):
    study, run, trained, tmp = fake_study
    assert run("run").returncode == 0
    from tepo.analysis.cli import report_main

    assert report_main([str(tmp / "results/final/dapo-s1")]) == 0
    page = (tmp / "results/final/dapo-s1/report/index.html").read_text()
    assert "entropy_fall" in page and "run.png" in page and (tmp / "results/final/dapo-s1/report/run.png").stat().st_size > 0


# --------------------------------------------------------------------------------------------
# the same on the tiny model, through real `tepo train` runs
KILLING_TRAIN = textwrap.dedent('''
    """`tepo train`, except that the run named in $KILL_STUDY_AT first kills the study (once)."""
    import os, signal, sys
    from pathlib import Path
    out = sys.argv[sys.argv.index("--output_dir") + 1]
    with open(os.environ["TRAIN_CALLS"], "a") as f:
        f.write(out + "\\n")
    marker = Path(os.environ["TRAIN_CALLS"] + ".killed")
    if os.environ.get("KILL_STUDY_AT") and os.environ["KILL_STUDY_AT"] in out and not marker.exists():
        marker.write_text("1")
        os.kill(os.getppid(), signal.SIGKILL)
        sys.exit(1)
    from tepo.cli import main
    sys.exit(main(["train", *sys.argv[1:]]))
''')


def tiny_study(tmp_path: Path, model: Path, name: str, *, final_seeds: str, tuning: str = "") -> Path:
    """A study file on the tiny model: 2 steps a run, grpo and tepo, 4 validation and 6 test problems."""
    study = tmp_path / f"{name}.yaml"
    study.write_text(textwrap.dedent(f'''
        name: {name}
        model: {model}
        base: {{task: arithmetic, levels: "1", num_problems: 32, max_steps: 2, per_device_train_batch_size: 8,
                num_generations: 4, steps_per_generation: 2, max_completion_length: 8, bf16: false,
                report_to: none, learning_rate: 1.0e-3, heldout_eval_steps: 1, save_strategy: "no"}}
        validation_problems: 4
        test_problems: 6
        target: 0.5
        arms:
          grpo: {{objective: grpo}}
          tepo: {{objective: tepo}}
        final:
          seeds: {final_seeds}
        results_dir: {tmp_path / "results"}
        runs_dir: {tmp_path / "runs"}
    ''') + (f"tuning: {tuning}\n" if tuning else ""))
    return study


@pytest.mark.slow
def test_tiny_model_study_killed_resumes_skips_finished_runs_and_reports(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from _tiny_llm import save_tiny

    model = save_tiny(tmp_path / "model")
    (tmp_path / "train.py").write_text(KILLING_TRAIN)
    study = tiny_study(tmp_path, model, "tiny", final_seeds="[1]",
                       tuning="{seeds: [0], grid: {tepo: [{clip_low: 3.0e-4, clip_high: 4.0e-4}, {clip_low: 0.2, clip_high: 0.28}]}}")
    calls = tmp_path / "calls.txt"
    env = dict(os.environ, TRAIN_CALLS=str(calls), KILL_STUDY_AT="tuning/tepo/g1", PYTHONPATH=str(ROOT / "src"))
    command = [sys.executable, "-m", "tepo.cli", "study", "run", str(study), "--train_command", f"{sys.executable} {tmp_path / 'train.py'}"]
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == -signal.SIGKILL, first.stdout + first.stderr
    assert (tmp_path / "results/tuning/tepo/g0-s0/DONE.json").exists()
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr[-3000:]
    trained = [Path(line).relative_to(tmp_path / "runs").as_posix() for line in calls.read_text().splitlines()]
    assert trained[0] == "tuning/tepo/g0-s0" and trained.count("tuning/tepo/g0-s0") == 1  # not retrained
    assert trained[1:3] == ["tuning/tepo/g1-s0", "tuning/tepo/g1-s0"]  # killed, then trained
    assert sorted(trained[3:]) == ["final/grpo-s1", "final/tepo-s1"]
    test = json.loads((tmp_path / "results/final/tepo-s1/eval_test.json").read_text())
    assert len(test["verdicts"]) == 6 and test["ids"] == json.loads(
        (tmp_path / "results/final/grpo-s1/eval_test.json").read_text())["ids"]
    from tepo.analysis.study_report import build_study_report

    index = build_study_report(load_study(study), replicates=200)
    summary = json.loads((index.parent / "summary.json").read_text())
    assert summary["arms"]["tepo"]["test_accuracy"]["estimate"] == pytest.approx(np.mean(test["verdicts"]), abs=1e-15)
    assert not any((tmp_path / "results").rglob("*.safetensors"))


@pytest.mark.slow
def test_tiny_model_two_runners_at_once_train_each_run_once(tmp_path):
    """Two `tepo study run` processes on one study, real `tepo train` runs on the tiny model: the
    per-run lock gives each run to one of them."""
    sys.path.insert(0, str(ROOT / "tests"))
    from _tiny_llm import save_tiny

    model = save_tiny(tmp_path / "model")
    (tmp_path / "train.py").write_text(KILLING_TRAIN)  # with no KILL_STUDY_AT: it only records the runs
    study = tiny_study(tmp_path, model, "tiny2", final_seeds="[1, 2]")
    calls = tmp_path / "calls.txt"
    env = dict(os.environ, TRAIN_CALLS=str(calls), PYTHONPATH=str(ROOT / "src"))
    command = [sys.executable, "-m", "tepo.cli", "study", "run", str(study), "--train_command", f"{sys.executable} {tmp_path / 'train.py'}"]
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-3000:] for o in outputs]
    trained = [Path(line).relative_to(tmp_path / "runs").as_posix() for line in calls.read_text().splitlines()]
    assert sorted(trained) == ["final/grpo-s1", "final/grpo-s2", "final/tepo-s1", "final/tepo-s2"]  # each once
    assert all((tmp_path / "results" / key / "DONE.json").exists() for key in trained)
