"""tepo.analysis: entropy-law fit, statistics, loading a comparison, and `tepo compare` planning,
running and skipping with a fake train command (no model is trained here)."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tepo.analysis import compare as cmp
from tepo.analysis.cli import compare_main
from tepo.analysis.entropy_law import fit_entropy_law
from tepo.analysis.runs import accuracy_table, aggregate_over_seeds, load_comparison, moving_average, steps_to_target
from tepo.analysis.stats import mean_std_ci, seed_matched_t
from tepo.run_folder import read_metrics

# ---------------------------------------------------------------------------------------------
# a fake comparison folder: 2 objectives x 2 seeds whose held-out accuracy follows the entropy law
# ---------------------------------------------------------------------------------------------
LAW = {"grpo": (0.1, 0.75, 30.0), "tepo": (0.2, 1.2, 80.0)}  # a, b, entropy decay time
STEPS, EVAL_EVERY, H0, BEFORE = 40, 10, 1.5, 0.30


def fake_entropy(objective: str, seed: int, step: int) -> float:
    return H0 * math.exp(-step / (LAW[objective][2] * (1 + 0.1 * seed)))


def fake_accuracy(objective: str, seed: int, step: int) -> float:
    a, b, _ = LAW[objective]
    return -a * math.exp(fake_entropy(objective, seed, step)) + b


def make_fake_comparison(root: Path, with_results: bool = True) -> Path:
    runs = root / "runs"
    plan = []
    for seed in (0, 1):
        for objective in LAW:
            run = runs / f"{objective}-s{seed}"
            run.mkdir(parents=True)
            rows = []
            for step in range(1, STEPS + 1):
                row = {"step": step, "reward_mean": fake_accuracy(objective, seed, step) - 0.1 + 0.01 * ((step * 7 + seed) % 3 - 1),
                       "entropy_mean": fake_entropy(objective, seed, step), "clip_frac": 0.01 * (1 + seed),
                       "clip_frac_low": 0.004, "clip_frac_high": 0.006, "approx_kl": 0.001 * step ** 0.5,
                       "ratio_max": 1.3, "ratio_min": 0.8, "completion_len_mean": 40.0 - step / 4,
                       "truncated_frac": 0.3, "grad_norm": 1.0, "loss": 0.0, "step_time_s": 2.0 + seed,
                       "zero_var_frac": 0.5, "kl_mask_frac": None}
                if step % EVAL_EVERY == 0:
                    row["heldout_accuracy"] = fake_accuracy(objective, seed, step)
                rows.append(row)
            (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
            (run / "eval_before.json").write_text(json.dumps({"accuracy": BEFORE, "correct": 30, "num_problems": 100}))
            after = fake_accuracy(objective, seed, STEPS)
            (run / "eval_after.json").write_text(json.dumps({"accuracy": after, "correct": round(100 * after), "num_problems": 100}))
            (run / "DONE").write_text("{}")
            if with_results:
                p1 = after - 0.05 + 0.02 * seed
                bench = {"n": 4, "num_problems": 50, "avg@4": p1, "pass@1": p1, "pass@4": p1 + 0.2,
                         "ci": {"avg@4": [p1 - 0.1, p1 + 0.1], "pass@1": [p1 - 0.1, p1 + 0.1], "pass@4": [p1 + 0.1, p1 + 0.3]},
                         "pass_curve": {"1": p1, "2": p1 + 0.1, "3": p1 + 0.15, "4": p1 + 0.2}}
                (run / "eval").mkdir()
                (run / "eval" / "results.json").write_text(json.dumps({"benchmarks": {"math500": bench}, "macro": {}, "config": {}}))
            plan.append({"name": run.name, "objective": objective, "seed": seed, "status": "done"})
    (root / "compare.json").write_text(json.dumps({"objectives": list(LAW), "seeds": [0, 1], "train_args": ["--max_steps", str(STEPS)], "runs": plan}))
    return root


# ---------------------------------------------------------------------------------------------
# entropy law
# ---------------------------------------------------------------------------------------------
def test_entropy_law_research_notes_example():
    h = np.array([1.0, 0.5, 0.1])
    r = -0.3 * np.exp(h) + 0.9
    np.testing.assert_allclose(r, [0.0845, 0.4054, 0.5684], atol=5e-5)  # research-notes §6.6 values
    fit = fit_entropy_law(h, r)
    assert fit.a == pytest.approx(0.3, abs=1e-12) and fit.b == pytest.approx(0.9, abs=1e-12)
    assert fit.ceiling == pytest.approx(0.6, abs=1e-12)
    assert fit.r2 == pytest.approx(1.0) and fit.rmse == pytest.approx(0.0, abs=1e-12) and fit.n == 3
    assert fit.predict(1.0) == pytest.approx(0.0845, abs=5e-5)
    assert fit.predict(0.0) == pytest.approx(fit.ceiling)


def test_entropy_law_noisy_fit_matches_closed_form():
    rng = np.random.default_rng(0)
    h = rng.uniform(0.2, 1.5, 200)
    r = -0.25 * np.exp(h) + 0.95 + rng.normal(0, 0.02, h.size)
    fit = fit_entropy_law(h, r)
    # independent closed form of simple linear regression of r on x = exp(h): slope = -a
    x = np.exp(h)
    slope = ((x - x.mean()) * (r - r.mean())).sum() / ((x - x.mean()) ** 2).sum()
    assert fit.a == pytest.approx(-slope, rel=1e-9)
    assert fit.b == pytest.approx(r.mean() - slope * x.mean(), rel=1e-9)
    assert abs(fit.a - 0.25) < 0.02 and 0.8 < fit.r2 < 1.0


def test_entropy_law_bad_input():
    with pytest.raises(ValueError, match="different entropy"):
        fit_entropy_law([1.0, 1.0, 1.0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="entropy has 2 values but performance has 3"):
        fit_entropy_law([1.0, 2.0], [0.1, 0.2, 0.3])
    fit = fit_entropy_law([0.5, float("nan"), 1.0, 0.2], [0.4, 0.5, 0.1, float("inf")])
    assert fit.n == 2


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, quantile", [(2, 12.706205), (3, 4.302653), (5, 2.776445), (11, 2.228139)])
def test_mean_std_ci_uses_the_t_quantile_of_the_tables(n, quantile):
    values = [0.1 * i * i for i in range(n)]
    stats = mean_std_ci(values)
    half = quantile * statistics.stdev(values) / math.sqrt(n)
    assert stats["ci_high"] - stats["mean"] == pytest.approx(half, rel=1e-6)


def test_seed_matched_t_is_a_t_interval_over_the_per_seed_differences():
    # a and b on 4 problems; per-seed differences of the mean verdicts: s1 +0.5, s2 0, s3 +0.25 (s4 only in a)
    a = {1: np.array([1, 1, 0, 0]), 2: np.array([1, 0, 0, 0]), 3: np.array([1, 1, 1, 0]), 4: np.array([1, 1, 1, 1])}
    b = {1: np.array([0, 0, 0, 0]), 2: np.array([0, 1, 0, 0]), 3: np.array([0, 1, 1, 0])}
    c = {4: np.array([0, 0, 0, 0])}
    pairs = seed_matched_t({"a": a, "b": b, "c": c})
    d = [0.5, 0.0, 0.25]
    half = 4.302653 * statistics.stdev(d) / math.sqrt(3)
    ab = pairs[("a", "b")]
    assert ab.n == 3 and ab.estimate == pytest.approx(0.25)
    assert (ab.low, ab.high) == (pytest.approx(0.25 - half, abs=1e-6), pytest.approx(0.25 + half, abs=1e-6))
    assert pairs[("a", "c")].n == 1 and pairs[("a", "c")].low is None  # one common seed: no spread, no interval
    assert ("b", "c") not in pairs  # no common seed


def test_mean_std_ci():
    values = [0.52, 0.61, 0.58]
    stats = mean_std_ci(values)
    half = 4.302653 * statistics.stdev(values) / math.sqrt(3)
    assert stats["mean"] == pytest.approx(statistics.mean(values))
    assert stats["std"] == pytest.approx(statistics.stdev(values))
    assert stats["ci_low"] == pytest.approx(statistics.mean(values) - half, abs=1e-6)
    assert stats["ci_high"] == pytest.approx(statistics.mean(values) + half, abs=1e-6)
    one = mean_std_ci([0.5])
    assert one["n"] == 1 and math.isnan(one["ci_low"]) and math.isnan(one["std"])


def test_moving_average_and_aggregate():
    np.testing.assert_allclose(moving_average(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1.0, 2.0, 4.0, 6.0])
    band = aggregate_over_seeds([(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0])),
                                     (np.array([2.0, 3.0]), np.array([4.0, 5.0]))])
    np.testing.assert_allclose(band.steps, [1, 2, 3])
    np.testing.assert_allclose(band.mean, [1.0, 3.0, 4.0])
    np.testing.assert_allclose(band.low, [1.0, 2.0, 3.0])
    np.testing.assert_allclose(band.high, [1.0, 4.0, 5.0])
    np.testing.assert_array_equal(band.count, [1, 2, 2])
    assert math.isnan(band.std[0]) and band.std[1] == pytest.approx(math.sqrt(2))


# ---------------------------------------------------------------------------------------------
# loading and summarising a comparison
# ---------------------------------------------------------------------------------------------
def test_load_and_accuracy_table(tmp_path):
    comp = load_comparison(make_fake_comparison(tmp_path))
    assert comp.objectives == ["grpo", "tepo"] and len(comp.runs) == 4
    table = {row["objective"]: row for row in accuracy_table(comp)}
    for objective in LAW:
        finals = [fake_accuracy(objective, s, STEPS) for s in (0, 1)]
        after = table[objective]["after"]
        assert after["mean"] == pytest.approx(statistics.mean(finals))
        assert after["std"] == pytest.approx(statistics.stdev(finals))
        half = 12.706205 * statistics.stdev(finals) / math.sqrt(2)
        assert after["ci_high"] - after["mean"] == pytest.approx(half, rel=1e-6)
        assert table[objective]["before"] == pytest.approx(BEFORE)
        assert table[objective]["gain"]["mean"] == pytest.approx(statistics.mean(finals) - BEFORE)
    # monitor verdicts were replayed from metrics (no monitor.json): grpo's entropy falls fast
    grpo = next(r for r in comp.runs if r.name == "grpo-s0")
    assert grpo.monitor_source.startswith("replayed") and "entropy_fall" in grpo.monitor["first_step"]


def test_steps_to_target_heldout(tmp_path):
    comp = load_comparison(make_fake_comparison(tmp_path))
    result = steps_to_target(comp)
    best = max(statistics.mean(fake_accuracy(o, s, STEPS) for s in (0, 1)) for o in LAW)
    target = (BEFORE + best) / 2
    assert result["metric"] == "held-out accuracy" and result["target"] == pytest.approx(target)
    for objective in LAW:
        for seed in (0, 1):
            expected = next((step for step in range(EVAL_EVERY, STEPS + 1, EVAL_EVERY)
                             if fake_accuracy(objective, seed, step) >= target), None)
            assert result["per_objective"][objective]["per_seed"][seed] == expected
    fixed = steps_to_target(comp, target=0.999)
    assert all(info["reached"] == 0 for info in fixed["per_objective"].values())


def test_unfinished_run_is_left_out_of_final_results(tmp_path):
    # A run still training (as `tepo compare` leaves it while it runs): its last held-out point is
    # not its final accuracy, so it must not enter the accuracy or steps-to-target tables.
    root = make_fake_comparison(tmp_path, with_results=False)
    run = root / "runs" / "grpo-s1"
    for name in ("eval_after.json", "DONE"):
        (run / name).unlink()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][:EVAL_EVERY]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    state = json.loads((root / "compare.json").read_text())
    for record in state["runs"]:
        if record["name"] == "grpo-s1":
            record["status"] = "running"
    (root / "compare.json").write_text(json.dumps(state))

    comp = load_comparison(root)
    assert [r.name for r in comp.runs if r.unfinished] == ["grpo-s1"]
    table = {row["objective"]: row for row in accuracy_table(comp)}
    assert table["grpo"]["seeds"] == [0] and table["grpo"]["per_seed"] == {0: pytest.approx(fake_accuracy("grpo", 0, STEPS))}
    assert table["tepo"]["seeds"] == [0, 1]
    target = steps_to_target(comp)["per_objective"]["grpo"]
    assert target["runs"] == 1 and list(target["per_seed"]) == [0]
    from tepo.analysis.report import _setup_lines

    assert any("left out of the accuracy and steps-to-target tables: grpo-s1 (running" in line for line in _setup_lines(comp))
    # the same folder with the run marked done again counts it (the filter is the status)
    for record in state["runs"]:
        record["status"] = "done"
    (root / "compare.json").write_text(json.dumps(state))
    assert accuracy_table(load_comparison(root))[0]["seeds"] == [0, 1]


def test_no_default_target_when_nothing_improved(tmp_path):
    root = make_fake_comparison(tmp_path, with_results=False)
    for run in root.glob("runs/*"):  # every accuracy, before and during training, at 0
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        for row in rows:
            if "heldout_accuracy" in row:
                row["heldout_accuracy"] = 0.0
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        for name in ("eval_before.json", "eval_after.json"):
            (run / name).write_text(json.dumps({"accuracy": 0.0, "correct": 0, "num_problems": 100}))
    result = steps_to_target(load_comparison(root))
    assert "no default target" in result["problem"] and math.isnan(result["target"])
    assert all(info["per_seed"] == {} for info in result["per_objective"].values())
    given = steps_to_target(load_comparison(root), target=0.0)
    assert given["problem"] == "" and given["per_objective"]["grpo"]["per_seed"] == {0: 0.0, 1: 0.0}


def test_steps_to_target_falls_back_to_reward(tmp_path):
    root = make_fake_comparison(tmp_path, with_results=False)
    for metrics in root.glob("runs/*/metrics.jsonl"):
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        for row in rows:
            row.pop("heldout_accuracy", None)
        metrics.write_text("\n".join(json.dumps(r) for r in rows))
    result = steps_to_target(load_comparison(root), smooth=1)
    assert result["metric"] == "training reward"
    rewards = {(o, s): [fake_accuracy(o, s, t) - 0.1 + 0.01 * ((t * 7 + s) % 3 - 1) for t in range(1, STEPS + 1)] for o in LAW for s in (0, 1)}
    start = statistics.mean(r[0] for r in rewards.values())
    best = max(statistics.mean(rewards[(o, s)][-1] for s in (0, 1)) for o in LAW)
    assert result["target"] == pytest.approx((start + best) / 2)


def test_torn_last_line_is_ignored_but_interior_garbage_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "rew')
    warnings: list[str] = []
    rows = read_metrics(path, warnings)
    assert [r["step"] for r in rows] == [1, 2] and "incomplete" in warnings[0]
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_metrics(path)
    path.write_text('{"loss": 1.0}\n')  # the one rule: every row has an integer step
    with pytest.raises(ValueError, match="integer 'step'"):
        read_metrics(path)


def test_the_run_folder_module_imports_without_torch():
    code = ("import sys, tepo.run_folder, tepo.stability, tepo.analysis.runs, tepo.analysis.study; "
            "heavy = [m for m in ('torch', 'transformers', 'trl') if m in sys.modules]; assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------------------------------------
# tepo compare with a fake train command
# ---------------------------------------------------------------------------------------------
FAKE_TRAIN = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    argv = sys.argv[1:]
    get = lambda name: argv[argv.index(name) + 1]
    out = Path(get("--output_dir"))
    with open(os.environ["FAKE_CALLS"], "a") as calls:
        calls.write(json.dumps(argv) + "\\n")
    print("training", get("--objective"), "seed", get("--seed"))
    if get("--objective") in os.environ.get("FAKE_FAIL", "").split(","):
        print("boom: simulated failure", file=sys.stderr)
        sys.exit(3)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward_mean": 0.5}) + "\\n")
    (out / "eval_after.json").write_text(json.dumps({"accuracy": 0.5, "correct": 5, "num_problems": 10}))
""")


@pytest.fixture
def fake_train(tmp_path, monkeypatch):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    monkeypatch.delenv("FAKE_FAIL", raising=False)
    monkeypatch.setattr(cmp, "registered_objectives", lambda: ["grpo", "dapo", "gspo", "tepo", "clip_cov", "kl_cov"])

    def read_calls():
        return [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []

    return f"{sys.executable} {script}", read_calls


def test_plan_is_seed_major_and_identical_but_for_objective_and_seed(tmp_path):
    study = cmp.plan_comparison(["grpo", "tepo"], [0, 1], tmp_path, ["--max_steps", "5", "--lr", "1e-5"],
                                known_objectives=["grpo", "tepo"])
    assert not study.grid and not study.test_problems  # a study without tuning or test stage
    plan = cmp.run_specs(study, ["train"])
    assert [p.name for p in plan] == ["grpo-s0", "tepo-s0", "grpo-s1", "tepo-s1"]
    for spec in plan:
        cmd = spec.command
        assert cmd[0] == "train"
        assert cmd[cmd.index("--objective") + 1] == spec.objective and cmd[cmd.index("--seed") + 1] == str(spec.seed)
        assert cmd[cmd.index("--output_dir") + 1] == str(tmp_path.resolve() / "runs" / spec.name)
        assert cmd[cmd.index("--seed") + 2:cmd.index("--output_dir")] == ["--max_steps", "5", "--lr", "1e-5"]
    with pytest.raises(ValueError, match="unknown objective.*'ppo'"):
        cmp.plan_comparison(["grpo", "ppo"], [0], tmp_path, [], known_objectives=["grpo", "tepo"])
    with pytest.raises(ValueError, match="--seed is set per run"):
        cmp.plan_comparison(["grpo"], [0], tmp_path, ["--seed", "3"], known_objectives=["grpo"])


def test_each_objective_gets_its_own_advantage_scale_unless_one_is_set(tmp_path):
    def scales(train_args):
        recipe = [a for a in train_args if a.endswith(".yaml")]
        shared = [a for a in train_args if a != "--config" and not a.endswith(".yaml")]
        plan = cmp.run_specs(cmp.plan_comparison(["grpo", "dr_grpo"], [0], tmp_path, shared,
                                                 recipe=recipe[0] if recipe else None), ["train"])
        return [(p.objective, p.scale_rewards) for p in plan], [p.command for p in plan]

    own, commands = scales(["--max_steps", "5"])
    assert own == [("grpo", "group"), ("dr_grpo", "none")]  # Dr. GRPO: no division by the group std
    assert not any("--scale_rewards" in c for c in commands)  # left unset: each run resolves its objective's
    assert scales(["--scale_rewards=group"])[0] == [("grpo", "group"), ("dr_grpo", "group")]  # set for all
    recipe = tmp_path / "r.yaml"
    recipe.write_text("scale_rewards: batch\n")
    assert scales(["--config", str(recipe)])[0] == [("grpo", "batch"), ("dr_grpo", "batch")]


def test_compare_runs_then_skips_finished_runs(tmp_path, fake_train, capsys):
    command, calls = fake_train
    out = tmp_path / "cmp"
    argv = ["--objectives", "grpo,tepo", "--seeds", "0,1", "--max_steps", "3", "--output_dir", str(out),
            "--train_command", command, "--heldout_eval_steps", "2", "--", "--learning_rate", "1e-5"]
    assert compare_main(argv) == 0
    made = calls()
    assert len(made) == 4
    common = [c[c.index("--seed") + 2:c.index("--output_dir")] for c in made]
    assert all(c == ["--max_steps", "3", "--heldout_eval_steps", "2", "--learning_rate", "1e-5"] for c in common)
    state = json.loads((out / "compare.json").read_text())
    assert [r["status"] for r in state["runs"]] == ["done"] * 4
    assert state["train_args"] == common[0]
    for r in state["runs"]:
        run_dir = Path(r["run_dir"])
        assert (run_dir / "DONE.json").exists() and "training" in (run_dir / "train.log").read_text()
    printed = capsys.readouterr().out
    assert "[runs 1/4] runs/grpo-s0: training" in printed and "4 runs done, 0 failed, 0 to train" in printed

    assert compare_main(argv) == 0  # rerun: nothing to do
    assert len(calls()) == 4
    assert "runs 4/4 done, 0 failed, 0 to train" in capsys.readouterr().out

    argv_more = [a if a != "0,1" else "0,1,2" for a in argv]  # a third seed: only its runs are new
    assert compare_main(argv_more) == 0
    assert [c[c.index("--seed") + 1] for c in calls()[4:]] == ["2", "2"]


def test_compare_failure_is_reported_and_rerun_starts_clean(tmp_path, fake_train, monkeypatch, capsys):
    command, calls = fake_train
    out = tmp_path / "cmp"
    argv = ["--objectives", "grpo,tepo", "--seeds", "0", "--output_dir", str(out), "--train_command", command]
    monkeypatch.setenv("FAKE_FAIL", "tepo")
    assert compare_main(argv) == 1
    state = json.loads((out / "compare.json").read_text())
    assert {r["name"]: r["status"] for r in state["runs"]} == {"grpo-s0": "done", "tepo-s0": "failed"}
    assert state["runs"][1]["returncode"] == 3
    assert not (out / "runs" / "tepo-s0" / "DONE.json").exists()
    printed = capsys.readouterr().out
    assert "FAILED (exit status 3)" in printed and "boom: simulated failure" in printed
    assert len(calls()) == 2  # nothing retried within the run

    monkeypatch.delenv("FAKE_FAIL")
    assert compare_main(argv) == 1  # a failed run is a result: not retried unless asked
    assert len(calls()) == 2
    assert "not retrying runs/tepo-s0" in capsys.readouterr().out
    assert compare_main([*argv, "--retry_failed"]) == 0
    assert [c[c.index("--objective") + 1] for c in calls()[2:]] == ["tepo"]
    assert "boom" in (out / "failed" / "tepo-s0.1" / "train.log").read_text()
    assert "moved them to" in capsys.readouterr().out
    state = json.loads((out / "compare.json").read_text())
    assert state["runs"][1]["status"] == "done" and state["runs"][1]["returncode"] == 0


def test_compare_resume_keeps_the_attempt_in_place(tmp_path, fake_train, monkeypatch, capsys):
    command, calls = fake_train
    out = tmp_path / "cmp"
    argv = ["--objectives", "tepo", "--seeds", "0", "--output_dir", str(out), "--train_command", command]
    monkeypatch.setenv("FAKE_FAIL", "tepo")
    assert compare_main(argv) == 1
    monkeypatch.delenv("FAKE_FAIL")
    assert compare_main([*argv, "--retry_failed", "--resume"]) == 0
    assert not (out / "failed").exists()
    assert calls()[-1][-2:] == ["--resume_from_checkpoint", "true"]
    log = (out / "runs" / "tepo-s0" / "train.log").read_text()
    assert "boom" in log and log.count("$ ") == 2  # both attempts, in one log
    assert len(calls()) == 2


def test_compare_refuses_bad_input_before_launching(tmp_path, fake_train, capsys):
    command, calls = fake_train
    base = ["--output_dir", str(tmp_path / "cmp"), "--train_command", command]
    assert compare_main(["--objectives", "grpo,nonsense", *base]) == 2
    assert "unknown objective(s) 'nonsense'" in capsys.readouterr().err
    assert compare_main(["--objectives", "grpo", "--seeds", "0,x", *base]) == 2
    assert compare_main(["--objectives", "grpo,grpo", *base]) == 2
    assert compare_main(["--objectives", "grpo", "--seed", "1", *base]) == 2  # not an abbreviation of --seeds
    assert "--seed is set per run" in capsys.readouterr().err
    assert compare_main(["--objectives", "grpo", "--config", str(tmp_path / "missing.yaml"), *base]) == 2
    assert calls() == [] and not (tmp_path / "cmp").exists()


def test_compare_refuses_to_mix_setups(tmp_path, fake_train, capsys):
    command, calls = fake_train
    base = ["--objectives", "grpo", "--seeds", "0", "--output_dir", str(tmp_path / "cmp"), "--train_command", command]
    assert compare_main([*base, "--max_steps", "3"]) == 0
    assert compare_main([*base, "--max_steps", "4"]) == 2
    assert "other training arguments" in capsys.readouterr().err
    assert compare_main([*base, "--max_steps", "4", "--allow_setup_change"]) == 0
    assert len(calls()) == 1


def test_dry_run_prints_plan(tmp_path, fake_train, capsys):
    command, calls = fake_train
    assert compare_main(["--objectives", "grpo,dapo", "--seeds", "3", "--output_dir", str(tmp_path / "c"),
                         "--train_command", command, "--dry_run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [l.split(":")[0] for l in lines] == ["grpo-s3", "dapo-s3"] and calls() == []


def test_registry_knows_the_compared_objectives():
    from tepo.objectives import list_objectives  # a broken import fails here, it is not skipped

    assert set(cmp.registered_objectives()) == set(list_objectives())
    assert {"grpo", "dapo", "dr_grpo", "gspo", "gspo_token", "tepo", "clip_cov", "kl_cov"} <= set(cmp.registered_objectives())


def test_compare_trains_from_the_recipes_copy_and_refuses_a_changed_one(tmp_path, fake_train, capsys):
    command, calls = fake_train
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rate: 1.0e-5\n")
    out = tmp_path / "cmp"
    argv = ["--objectives", "grpo", "--seeds", "0", "--output_dir", str(out), "--train_command", command, "--config", str(recipe)]
    assert compare_main(argv) == 0
    made = calls()[0]
    assert made[made.index("--config") + 1] == str((out / "recipe.yaml").resolve())
    assert (out / "recipe.yaml").read_text() == recipe.read_text()
    recipe.write_text("learning_rate: 2.0e-5\n")  # edited after a run finished
    assert compare_main(argv) == 2
    assert "another recipe" in capsys.readouterr().err
    assert (out / "recipe.yaml").read_text() == "learning_rate: 1.0e-5\n"  # the finished run's recipe stays
    assert compare_main([*argv, "--allow_setup_change"]) == 0
    assert (out / "recipe.yaml").read_text() == "learning_rate: 2.0e-5\n" and len(calls()) == 1
