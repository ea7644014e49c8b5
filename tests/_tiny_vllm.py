"""The tiny chat model of `_tiny_llm`, shaped for vLLM's CPU engine (its attention kernels take head
sizes of 32 and up; `_tiny_llm`'s has 8): hidden 64, 2 heads of 32, tied input embedding and LM head
(as SmolLM2), saved as a model folder that both vLLM and transformers load."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from _tiny_llm import tiny_model, tiny_tokenizer

VLLM_IMPORTABLE = importlib.util.find_spec("vllm") is not None


def tiny_vllm_model(tokenizer, seed: int = 0):
    return tiny_model(tokenizer, seed, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=32)


def save_tiny_vllm(path: Path, seed: int = 0) -> Path:
    tok = tiny_tokenizer()
    tiny_vllm_model(tok, seed).save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)
