"""A tiny chat model for trainer tests: a character-level tokenizer with a ChatML template and a
randomly initialised 2-layer Llama (hidden 32). Builds in well under a second; no files needed."""

from __future__ import annotations

import string
from pathlib import Path

import torch
from datasets import Dataset

SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable))
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<|im_end|>",
        bos_token="<|im_start|>", additional_special_tokens=SPECIALS[1:],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_model(tokenizer, seed: int = 0, **shape):
    """A 2-layer Llama with tied embedding and LM head; `shape` overrides its LlamaConfig sizes."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    sizes.update(shape)
    config = LlamaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=512, **sizes,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return model


def save_tiny(path: Path, seed: int = 0) -> Path:
    """Save the tiny model and tokenizer as a model folder (for `--model PATH`)."""
    tok = tiny_tokenizer()
    tiny_model(tok, seed).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_train_argv(model: Path, out: Path, **options) -> list[str]:
    """`tepo train` arguments for a few seconds of training of the tiny model on arithmetic;
    `options` (name=value) replace or add options."""
    settings = {
        "model": model, "objective": "tepo", "task": "arithmetic", "levels": "1", "num_problems": 32,
        "max_steps": 2, "output_dir": out, "per_device_train_batch_size": 8, "num_generations": 4,
        "steps_per_generation": 2, "max_completion_length": 8, "heldout_num_problems": 4, "bf16": "false",
        "report_to": "none", "learning_rate": "1e-3", **options,
    }
    return [arg for name, value in settings.items() for arg in (f"--{name}", str(value))]


def prompt_dataset(n: int = 16) -> Dataset:
    """Chat prompts with an `answer` column; `parity_reward` below gives them reward variance."""
    rows = [
        {"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}], "answer": str(2 * i), "id": f"p{i}"}
        for i in range(n)
    ]
    return Dataset.from_list(rows)


def text_parity(text: str) -> float:
    """0 or 1, about evenly for random text (the parity of the sum of character codes)."""
    return float(sum(map(ord, text)) % 2)


def parity_reward(completions, **kwargs):
    """A reward that random completions get about half the time, so most groups vary."""
    return [text_parity(c[0]["content"]) for c in completions]


def small_config(output_dir, **overrides):
    """A TEPOConfig sized for seconds-long CPU tests: 8 completions per step, 2 steps per rollout."""
    from tepo.training import TEPOConfig

    kwargs = dict(
        output_dir=str(output_dir), per_device_train_batch_size=8, num_generations=4, steps_per_generation=2,
        max_completion_length=8, max_steps=2, learning_rate=1e-2, use_cpu=True, bf16=False,
        report_to=[], save_strategy="no", gradient_checkpointing=False, seed=0, disable_tqdm=True,
        lr_scheduler_type="constant",
    )
    kwargs.update(overrides)
    return TEPOConfig(**kwargs)
