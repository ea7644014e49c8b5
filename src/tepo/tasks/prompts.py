"""Chat prompts: one worked example, then the problem, each asking for a boxed answer.

SmolLM2-135M-Instruct never writes ``\\boxed{}`` zero-shot. With the worked example alone
("... The final answer is \\boxed{7}.") it still left most arithmetic answers unboxed under greedy
decoding; with the one-line instruction in both user turns it boxed nearly all of them, which is
what the reward reads.
"""

from __future__ import annotations

INSTRUCTION = "Put your final answer in \\boxed{}."
EXAMPLE_PROBLEM = "Tom has 3 red apples and 4 green apples. How many apples does Tom have?"
EXAMPLE_SOLUTION = "Tom has 3 + 4 = 7 apples. The final answer is \\boxed{7}."


def build_messages(problem: str) -> list[dict]:
    """Chat messages for ``problem``: the worked example (user, assistant), then the problem (user).

    Feed them to ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)``."""
    if not isinstance(problem, str) or not problem.strip():
        raise ValueError(f"problem must be a non-empty string, got {problem!r:.80}")
    return [
        {"role": "user", "content": f"{EXAMPLE_PROBLEM}\n{INSTRUCTION}"},
        {"role": "assistant", "content": EXAMPLE_SOLUTION},
        {"role": "user", "content": f"{problem}\n{INSTRUCTION}"},
    ]
