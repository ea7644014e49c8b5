"""Checkpoints are atomic and resuming keeps metrics.jsonl continuous."""

from __future__ import annotations

import json
import os

import pytest
from transformers import Trainer

from tepo.training import TEPOTrainer, last_complete_checkpoint, read_metrics
from tepo.training.trainer import STAGING_DIR

from _tiny_llm import parity_reward, prompt_dataset, small_config, tiny_model, tiny_tokenizer


def run(out, *, resume=None, **overrides):
    tok = tiny_tokenizer()
    args = small_config(out, **{"max_steps": 4, "save_strategy": "steps", "save_steps": 2, **overrides})
    tr = TEPOTrainer(model=tiny_model(tok), reward_funcs=parity_reward, args=args,
                     train_dataset=prompt_dataset(), processing_class=tok)
    tr.train(resume_from_checkpoint=resume)
    return tr


@pytest.mark.slow
def test_resume_after_a_crash_keeps_metrics_continuous(tmp_path):
    out = tmp_path / "run"
    run(out)
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert (out / "checkpoint-2" / "trainer_state.json").exists() and (out / "checkpoint-4").exists()

    # What a crash during step 4's save would have left: rows 1-3 and a torn row, no checkpoint-4,
    # a half-written staged checkpoint, and (from some other tool) a checkpoint folder with no state.
    import shutil

    shutil.rmtree(out / "checkpoint-4")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][: len(lines[3]) // 2])
    (out / STAGING_DIR / "checkpoint-4").mkdir(parents=True)
    (out / STAGING_DIR / "checkpoint-4" / "model.safetensors").write_bytes(b"\0" * 10)
    (out / "checkpoint-5").mkdir()

    resume = last_complete_checkpoint(out)
    assert resume == str(out / "checkpoint-2")
    second = run(out, resume=resume)
    assert second.state.global_step == 4
    resumed = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4], "duplicated or missing steps"
    assert resumed[:2] == rows[:2], "rows up to the checkpoint are kept as they were"
    assert (out / "checkpoint-4" / "trainer_state.json").exists()
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert not (out / STAGING_DIR / "checkpoint-4").exists(), "the stale staged copy was replaced"


@pytest.mark.slow
def test_a_save_interrupted_midway_leaves_no_checkpoint_to_resume_from(tmp_path, monkeypatch):
    out = tmp_path / "run"

    def crash(self, output_dir):
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(Trainer, "_save_rng_state", crash)  # after the model and optimizer files
    with pytest.raises(KeyboardInterrupt):
        run(out, max_steps=2, save_steps=2)
    assert not (out / "checkpoint-2").exists()
    assert (out / STAGING_DIR / "checkpoint-2" / "model.safetensors").exists()  # the partial copy stays staged
    assert last_complete_checkpoint(out) is None
    monkeypatch.undo()
    run(out, max_steps=2, save_steps=2)  # a fresh run saves over the leftover
    assert (out / "checkpoint-2" / "trainer_state.json").exists()
    assert os.listdir(out / STAGING_DIR) == []


@pytest.mark.slow
def test_save_total_limit_rotates_final_checkpoints(tmp_path):
    out = tmp_path / "run"
    run(out, max_steps=4, save_steps=1, save_total_limit=2)
    kept = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))
    assert kept == ["checkpoint-3", "checkpoint-4"]


@pytest.mark.slow
def test_kill_9_then_resume_reaches_max_steps(tmp_path):
    """A real SIGKILL of a running `tepo train` (not a reproduction of the files it leaves), then
    the same command with `--resume_from_checkpoint true`: it reaches max_steps and metrics.jsonl
    holds every step exactly once."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from _tiny_llm import save_tiny, tiny_train_argv

    model = save_tiny(tmp_path / "tiny")
    out = tmp_path / "run"
    max_steps = 8
    cmd = [sys.executable, "-m", "tepo.cli", "train", *tiny_train_argv(
        model, out, num_problems=64, max_steps=max_steps, save_strategy="steps", save_steps=1, save_total_limit=2)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 600
    try:
        # Kill it mid-run: once step 3 is logged, whatever it is doing then (training or saving).
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"finished or failed before it could be killed:\n{(tmp_path / 'first.log').read_text()[-3000:]}"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    killed_at = len(read_metrics(metrics))
    assert 3 <= killed_at < max_steps

    second = subprocess.run(cmd + ["--resume_from_checkpoint", "true"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    steps = [r["step"] for r in read_metrics(metrics)]
    assert steps == list(range(1, max_steps + 1)), f"duplicated or missing steps: {steps}"
    assert last_complete_checkpoint(out) == str(out / f"checkpoint-{max_steps}")
    assert (Path(out) / "eval_after.json").exists()


@pytest.mark.slow
def test_resuming_mid_rollout_scores_a_fresh_rollout_and_its_first_step_is_on_policy(tmp_path):
    """A checkpoint after step 1 of a 2-step rollout: the resumed run has no buffered rollout, so it
    samples and scores a new one, and step 2 (its first optimiser step) takes pi_old from its own
    training pass: ratio exactly 1 although the no-grad scoring pass is made to differ by 1e-3."""
    out = tmp_path / "run"
    run(out, max_steps=2, save_steps=1)
    tok = tiny_tokenizer()
    tr = TEPOTrainer(model=tiny_model(tok), reward_funcs=parity_reward,
                     args=small_config(out, max_steps=2, save_strategy="steps", save_steps=1),
                     train_dataset=prompt_dataset(), processing_class=tok)
    real = tr.score_round
    rounds = []

    def perturbed(inputs):
        batch, rewards, stats = real(inputs)
        rounds.append(tr.state.global_step)
        batch["old_per_token_logps"] = batch["old_per_token_logps"] + 1e-3
        return batch, rewards, stats

    tr.score_round = perturbed
    tr.train(resume_from_checkpoint=str(out / "checkpoint-1"))
    assert rounds == [1]  # a fresh rollout at the resumed step
    row = read_metrics(out / "metrics.jsonl")[1]
    assert row["step"] == 2 and row["ratio_min"] == row["ratio_max"] == 1.0 and row["clip_frac"] == 0.0, row
