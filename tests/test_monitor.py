"""StabilityMonitor on synthetic metric streams: each detector fires on its pattern, a healthy run stays quiet."""

from __future__ import annotations

import json
import math
import random

import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from tepo.stability import KINDS, StabilityMonitor, replay_metrics
from tepo.training.monitor import StabilityMonitorCallback


def healthy_stream(steps: int = 120, seed: int = 0) -> list[dict]:
    """A run that learns: reward rises with noise, entropy eases down by a third, everything else calm."""
    rng = random.Random(seed)
    rows = []
    for t in range(1, steps + 1):
        progress = t / steps
        rows.append({
            "step": t,
            "reward_mean": min(1.0, max(0.0, 0.1 + 0.4 * progress + rng.gauss(0, 0.08))),
            "entropy_mean": 1.5 * (1 - 0.3 * progress) + rng.gauss(0, 0.05),
            "clip_frac": abs(rng.gauss(0.02, 0.01)),
            "ratio_max": 1.0 + abs(rng.gauss(0.3, 0.2)),
            "ratio_min": 1.0 - abs(rng.gauss(0.2, 0.1)),
            "approx_kl": abs(rng.gauss(0.002, 0.001)),
            "completion_len_mean": 40 + rng.gauss(0, 3),
            "truncated_frac": max(0.0, 0.4 - 0.3 * progress + rng.gauss(0, 0.05)),
            "loss": rng.gauss(0, 0.1),
            "grad_norm": abs(rng.gauss(1.0, 0.3)),
            "repetition_frac": abs(rng.gauss(0.05, 0.02)),
        })
    return rows


def run(rows, **kw) -> StabilityMonitor:
    return replay_metrics(rows, **kw)


def test_healthy_run_is_quiet():
    for seed in range(5):
        monitor = run(healthy_stream(seed=seed))
        assert monitor.healthy, monitor.summary()["verdicts"]
        assert monitor.summary()["verdicts"] == []


def test_entropy_collapse_fires_below_fraction_of_initial():
    rows = healthy_stream()
    for row in rows:  # exponential decay to ~5% of 1.5 by the end
        row["entropy_mean"] = 1.5 * math.exp(-3.0 * row["step"] / len(rows))
    monitor = run(rows)
    v = monitor.verdicts["entropy_collapse"]
    # smoothed (trailing mean of 5) entropy first below 0.25 * initial (mean of the first 5 values)
    initial = sum(r["entropy_mean"] for r in rows[:5]) / 5
    expected = next(r["step"] for i, r in enumerate(rows)
                    if i >= 4 and sum(x["entropy_mean"] for x in rows[i - 4:i + 1]) / 5 < 0.25 * initial)
    assert v.first_step == expected
    assert v.severity == "critical"
    assert "entropy_fall" in monitor.verdicts  # a 95% fall over 120 steps is also a sustained fall


def test_entropy_fall_fires_on_sustained_fall_not_on_a_dip():
    rows = healthy_stream()
    for row in rows:  # flat at 1.5 until step 60, then linear fall to 0.6 at step 90, then flat
        t = row["step"]
        row["entropy_mean"] = 1.5 if t <= 60 else max(0.6, 1.5 - 0.03 * (t - 60))
    monitor = run(rows)
    assert "entropy_fall" in monitor.verdicts
    assert 60 < monitor.verdicts["entropy_fall"].first_step <= 90
    assert "entropy_collapse" not in monitor.verdicts  # 0.6 is 40% of initial, above the 25% line

    dip = healthy_stream()
    dip[70]["entropy_mean"] = 0.05  # one bad step
    assert "entropy_fall" not in run(dip).verdicts


def test_reward_crash_after_rise():
    rows = healthy_stream()
    for row in rows:  # rises to 0.6 by step 60, then drops to 0.05
        t = row["step"]
        row["reward_mean"] = 0.1 + 0.5 * t / 60 if t <= 60 else 0.05
    monitor = run(rows)
    v = monitor.verdicts["reward_crash"]
    assert 65 < v.first_step <= 75 and v.severity == "critical"

    never_rose = healthy_stream()
    for row in never_rose:
        row["reward_mean"] = 0.05
    assert "reward_crash" not in run(never_rose).verdicts


def test_non_finite_fires_immediately():
    rows = healthy_stream(30)
    rows[12]["loss"] = float("nan")
    rows[20]["grad_norm"] = float("inf")
    monitor = run(rows)
    v = monitor.verdicts["non_finite"]
    assert v.first_step == 13 and v.episodes == 2 and v.steps_active == 2
    assert "loss" in v.message


def test_non_finite_from_the_trainers_skip_count():
    rows = healthy_stream(30)
    for row in rows:
        row["nonfinite_skipped"] = 0 if row["step"] < 9 else (1 if row["step"] < 20 else 2)
    v = run(rows).verdicts["non_finite"]
    assert (v.first_step, v.steps_active, v.episodes) == (9, 2, 2)


def test_length_blowup_and_truncation():
    rows = healthy_stream()
    for row in rows[50:]:
        row["completion_len_mean"] = 150.0
    monitor = run(rows)
    assert monitor.verdicts["length_blowup"].first_step in range(51, 55)

    rows = healthy_stream()
    for row in rows[50:]:
        row["truncated_frac"] = 0.95
    assert "length_blowup" in run(rows).verdicts


def test_repetition_only_when_logged():
    rows = healthy_stream()
    for row in rows[40:]:
        row["repetition_frac"] = 0.9
    assert "repetition" in run(rows).verdicts
    rows = [{k: v for k, v in r.items() if k != "repetition_frac"} for r in healthy_stream()]
    monitor = run(rows)
    monitor.update(999, rows[-1])
    assert "monitor/repetition" not in monitor.last_flags


def test_clip_and_ratio_explosions():
    rows = healthy_stream()
    for row in rows[30:]:
        row["clip_frac"] = 0.8
    assert "clip_explosion" in run(rows).verdicts

    rows = healthy_stream()
    rows[40]["ratio_max"] = 50.0  # one spike: under the patience of 2
    assert "ratio_explosion" not in run(rows).verdicts
    rows[41]["ratio_max"] = 60.0
    v = run(rows).verdicts["ratio_explosion"]
    assert v.first_step == 42

    rows = healthy_stream()
    for row in rows[80:]:
        row["approx_kl"] = 2.0
    assert run(rows).verdicts["ratio_explosion"].first_step == 82


def test_trl_log_names_are_understood():
    rows = []
    for r in healthy_stream():
        rows.append({"step": r["step"], "reward": r["reward_mean"], "entropy": 1.5 * math.exp(-4 * r["step"] / 120),
                     "clip_ratio/region_mean": 0.0, "completions/mean_length": 40.0})
    monitor = run(rows)
    assert "entropy_collapse" in monitor.verdicts


def test_summary_and_flags():
    rows = healthy_stream()
    rows[12]["loss"] = float("nan")
    monitor = run(rows)
    summary = monitor.summary()
    assert summary["first_step"] == {"non_finite": 13}
    json.dumps(summary, allow_nan=False)  # the file must be strict JSON
    monitor.update(1000, rows[-1])
    assert set(monitor.last_flags) <= {f"monitor/{k}" for k in KINDS}
    assert monitor.last_flags["monitor/non_finite"] == 0.0


def test_bad_thresholds_are_refused():
    with pytest.raises(ValueError, match="entropy_collapse_ratio"):
        StabilityMonitor(entropy_collapse_ratio=0.0)
    with pytest.raises(ValueError, match="smooth_window"):
        StabilityMonitor(smooth_window=0)
    with pytest.raises(ValueError, match="stop_on"):
        StabilityMonitorCallback(stop_on=["nonsense"])


def _drive(callback, rows, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    state, control = TrainerState(), TrainerControl()
    seen = []
    for row in rows:
        state.global_step = row["step"]
        logs = {k: v for k, v in row.items() if k != "step"}
        callback.on_log(args, state, control, logs=logs)
        seen.append(logs)
        if control.should_training_stop:
            break
    callback.on_train_end(args, state, control)
    return seen, control


def test_callback_adds_flags_writes_file_and_stops(tmp_path):
    rows = healthy_stream(60)
    for row in rows[30:]:
        row["reward_mean"] = 0.0
    for row in rows[:30]:
        row["reward_mean"] = 0.1 + 0.6 * row["step"] / 30
    callback = StabilityMonitorCallback(early_stop=True)
    seen, control = _drive(callback, rows, tmp_path)
    assert control.should_training_stop
    last = seen[-1]
    assert last["monitor/reward_crash"] == 1.0
    assert any("reward_crash" in w for w in last["monitor_warnings"])
    assert len(seen) < len(rows)
    saved = json.loads((tmp_path / "monitor.json").read_text())
    assert saved["verdicts"][0]["kind"] == "reward_crash"
    assert saved["first_step"]["reward_crash"] == callback.stopped_at == len(seen)
    assert saved["stop_reason"] == "reward_crash"


def test_callback_without_early_stop_never_stops_and_ignores_eval_logs(tmp_path):
    rows = healthy_stream(60)
    rows[10]["loss"] = float("nan")
    callback = StabilityMonitorCallback()
    seen, control = _drive(callback, rows, tmp_path)
    assert not control.should_training_stop and len(seen) == 60
    assert seen[10]["monitor_warnings"] and "monitor_warnings" not in seen[11]
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    before = callback.monitor.steps_seen
    callback.on_log(args, TrainerState(), TrainerControl(), logs={"eval_loss": 1.0, "eval_reward": 0.3})
    callback.on_log(args, TrainerState(), TrainerControl(), logs={"train_runtime": 3.0, "train_loss": 0.1})
    assert callback.monitor.steps_seen == before
    saved = json.loads((tmp_path / "monitor.json").read_text())
    assert saved["verdicts"][0]["kind"] == "non_finite" and saved["stopped_early_at"] is None
