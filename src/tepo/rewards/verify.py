"""Whether an extracted answer equals a gold answer.

Plain numbers on both sides are decided exactly in this process (:mod:`tepo.rewards.numbers`).
Everything else is rewritten into math-verify's form (:mod:`tepo.rewards.forms`), passes the
pre-screen (:mod:`tepo.rewards.prescreen`) and goes to math-verify in a worker process under a
CPU-time budget (:mod:`tepo.rewards.worker`), against the gold answer prepared once
(:mod:`tepo.rewards.gold`).
"""

from __future__ import annotations

from functools import lru_cache

from tepo.rewards.extraction import MAX_ANSWER_CHARS
from tepo.rewards.forms import math_verify_form
from tepo.rewards.gold import GoldError, check_gold, clean, prepare_gold
from tepo.rewards.numbers import group_digits, numbers_equal, plain_number
from tepo.rewards.prescreen import refusal_reason
from tepo.rewards.stats import stats, warn_once
from tepo.rewards.worker import VERIFY_CPU_S, guarded_math_verify


def verify_answer(pred: str, gold: str, *, timeout: float | None = None) -> bool:
    """Whether the extracted answer ``pred`` equals the ``gold`` answer.

    Plain numbers on both sides are compared exactly in this process (``0.5`` = ``\\frac{1}{2}`` =
    ``1/2``, ``1,000`` = ``1 000`` = ``1000``, ``x = 5`` = ``5``, ``25\\%`` = ``25`` or ``0.25``,
    ``\\$5`` = ``5``; a decimal matches a non-integer gold when both round alike at 6 places; digit
    grouping follows :mod:`tepo.rewards.numbers`). Anything else goes to math-verify after
    :func:`refusal_reason` (a refused answer is wrong), in a worker process, under a budget of
    ``timeout`` seconds of the CPU time the verification itself uses (default
    :data:`VERIFY_CPU_S`; not the wall clock, so the machine's load does not change a verdict) and
    a wall-clock backstop many times longer; an answer over either is wrong.
    Raises only on a bad gold: not a string, empty (TypeError/ValueError), or one math-verify
    cannot parse (:class:`GoldError`).
    """
    gold = clean(check_gold(gold))
    if not isinstance(pred, str):
        return False
    pred = clean(pred).strip()
    if not pred or len(pred) > MAX_ANSWER_CHARS:
        return False
    try:
        return _verify_clean(pred, gold, VERIFY_CPU_S if timeout is None else float(timeout))
    except GoldError:
        raise
    except Exception as err:  # noqa: BLE001 - a bug on our side must not crash on a completion
        stats["verify_error"] += 1
        warn_once(f"verify:{type(err).__name__}", f"verify_answer failed ({type(err).__name__}: {err}); counted wrong")
        return False


@lru_cache(maxsize=1 << 16)
def _verify_clean(pred: str, gold_text: str, cpu_s: float) -> bool:
    # Cached: in RL the same answer to the same problem comes back many times, and a refused or
    # overrun answer should cost its time once only. The gold's parse never counts against it.
    gold = prepare_gold(gold_text, parse=False)
    if group_digits(pred) is None:
        stats["ambiguous"] += 1
        return False
    p = plain_number(pred)
    if gold.number is not None and p is not None:
        stats["plain"] += 1
        return numbers_equal(p, gold.number)
    pred_latex = math_verify_form(pred)
    if pred_latex is None or refusal_reason(pred_latex, gold.latex) is not None:
        stats["refused"] += 1
        return False
    return guarded_math_verify(pred_latex, prepare_gold(gold_text), cpu_s)


def clear_cache() -> None:
    """Forget cached verdicts (for tests that change how verdicts are made)."""
    _verify_clean.cache_clear()
