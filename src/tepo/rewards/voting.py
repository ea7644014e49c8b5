"""A normalised form of a completion's final answer, for majority voting."""

from __future__ import annotations

import re

from tepo.rewards.extraction import extract_answer
from tepo.rewards.gold import clean
from tepo.rewards.numbers import SPACING, format_fraction, plain_number, unwrap


def canonical_answer(text: str) -> str | None:
    """A normalised form of the completion's final answer, for majority voting: equal plain numbers
    map to one string (``0.5``, ``\\frac{1}{2}``, ``1/2`` -> ``"1/2"``; ``1,000`` -> ``"1000"``; a
    percentage sign and degrees are dropped); other answers lose spacing, ``\\left``/``\\right`` and
    ``\\dfrac``/``\\tfrac`` differences. None when there is no answer."""
    answer = extract_answer(text)
    if answer is None:
        return None
    answer = clean(answer)
    number = plain_number(answer)
    if number is not None:
        return format_fraction(number.value)
    s = unwrap(answer)
    s = re.sub(r"\\left(?![A-Za-z])|\\right(?![A-Za-z])|\\displaystyle", "", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = SPACING.sub("", s)
    s = re.sub(r"\s+", "", s).rstrip(".")
    return s or None
