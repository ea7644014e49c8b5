"""Completion-level verdicts: the reward functions TRL and the evaluator call."""

from __future__ import annotations

from typing import Any, NamedTuple

from tepo.rewards.extraction import completion_text, final_answer
from tepo.rewards.gold import GoldError, check_gold, clean, prepare_gold
from tepo.rewards.stats import stats, warn_once
from tepo.rewards.verify import verify_answer


class Judgement(NamedTuple):
    answer: str | None  # what was judged (the parts of a final run of boxes, joined with ", ")
    correct: bool


def judge(text: str | None, gold: str) -> Judgement:
    """The final answer of ``text`` and whether it equals ``gold``.

    The answer stated last counts (:func:`tepo.rewards.extraction.final_answer`). When the gold
    answer lists several parts and the completion ends with a run of several boxes (one a part),
    the boxes are judged together, joined by commas; otherwise the last answer alone.
    """
    found = final_answer(text)
    if found is None:
        return Judgement(None, False)
    answer = found.text
    if len(found.parts) > 1 and prepare_gold(clean(check_gold(gold)), parse=False).parts > 1:
        stats["several_boxes"] += 1
        answer = ", ".join(found.parts)
    return Judgement(answer, verify_answer(answer, gold))


def math_reward(completion: Any, gold: str) -> float:
    """1.0 if the completion's final answer (see :func:`judge`) equals ``gold``, else 0.0.

    Never raises on any completion; a bad gold (not a string, empty, or one math-verify cannot
    parse) raises a clear error.
    """
    gold = check_gold(gold)
    try:
        text = completion_text(completion)
        return 1.0 if text is not None and judge(text, gold).correct else 0.0
    except GoldError:
        raise
    except Exception as err:  # noqa: BLE001 - a bug on our side must not stop training: count it, score 0
        stats["reward_error"] += 1
        warn_once(f"err:{type(err).__name__}", f"math_reward failed on a completion ({type(err).__name__}); scored 0")
        return 0.0


def math_reward_func(completions: list, answer: list, **kwargs: Any) -> list[float]:
    """TRL reward function: ``completions`` (strings, or lists of ``{"role", "content"}`` messages
    for conversational prompts) against the dataset column ``answer``; other columns are ignored."""
    if isinstance(answer, str):
        answer = [answer] * len(completions)
    if len(answer) != len(completions):
        raise ValueError(f"math_reward: {len(completions)} completions but {len(answer)} answers")
    return [math_reward(c, a) for c, a in zip(completions, answer)]


math_reward_func.__name__ = "math_reward"
