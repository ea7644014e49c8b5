"""Plain-text prompts of an exact token count, for the benchmarks' fixed batch shapes.

Cutting token ids and decoding them is not enough: re-tokenizing the text merges or splits tokens
at the cut and where the text repeats (SmolLM2's tokenizer gives 116-125 tokens for 128 ids), and
unequal prompts change the padded shape from batch to batch, which torch.compile recompiles for.
"""

from __future__ import annotations


def exact_length_prompt(tokenizer, text: str, num_tokens: int, filler: str = " the") -> str:
    """`text`, repeated and cut, then trimmed or padded with `filler` until TRL's tokenization of it
    (`tokenizer(text=...)`, special tokens included) is exactly `num_tokens` long."""

    def count(s: str) -> int:
        return len(tokenizer(text=s)["input_ids"])

    ids = tokenizer(text + " ", add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"exact_length_prompt: {text!r} tokenizes to nothing")
    ids = (ids * (num_tokens // len(ids) + 1))[:num_tokens]
    s = tokenizer.decode(ids)
    for _ in range(4 * num_tokens + 64):
        n = count(s)
        if n == num_tokens:
            return s
        s = s[:-1] if n > num_tokens else s + filler
    raise ValueError(f"exact_length_prompt: could not reach {num_tokens} tokens from {text[:40]!r} "
                     f"(now {count(s)}); try another filler than {filler!r}")


def fixed_length_rows(tokenizer, problems, num_tokens: int) -> list[dict]:
    """Dataset rows (prompt, answer, id) for `problems`, each prompt exactly `num_tokens` long."""
    return [{"prompt": exact_length_prompt(tokenizer, p["problem"], num_tokens), "answer": p["answer"], "id": p["id"]}
            for p in problems]
