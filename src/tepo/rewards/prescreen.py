"""The pre-screen: refuse an answer whose evaluation could explode before it reaches sympy."""

from __future__ import annotations

import math
import re

from tepo.rewards.extraction import MAX_ANSWER_CHARS, braced_group
from tepo.rewards.numbers import balanced, plain_number

_HEAVY_COMMANDS = re.compile(r"\\(?:int|iint|iiint|oint|sum|prod|lim|limsup|liminf|partial|Gamma|zeta)(?![A-Za-z])")
_BIG_EXPONENT = 10_000  # |exponent| above this is refused
_BIG_RESULT_DIGITS = 10_000  # an integer power with more digits than this is refused
_BIG_FACTORIAL = 5_000
_BIG_BINOMIAL = 100_000
_MAX_NESTING = 60
_MAX_POWERS = 40


def _operand_after(s: str, i: int) -> str:
    """The exponent that starts at ``s[i]`` (after ``^`` or ``**``): a brace/paren group or a token."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        return ""
    if s[i] in "{(":
        close = "}" if s[i] == "{" else ")"
        depth = 0
        for j in range(i, len(s)):
            depth += (s[j] == s[i]) - (s[j] == close)
            if depth == 0:
                return s[i + 1 : j]
        return s[i + 1 :]
    m = re.compile(r"[+-]?[0-9]+|\\?[A-Za-z]+|.", re.A).match(s, i)
    return m.group(0) if m else ""


def _operand_before(s: str, i: int) -> str:
    """The base or factorial argument that ends just before ``s[i]``: a group or a number/name."""
    j = i - 1
    while j >= 0 and s[j] == " ":
        j -= 1
    if j < 0:
        return ""
    if s[j] in "})":
        open_ = "{" if s[j] == "}" else "("
        depth = 0
        for k in range(j, -1, -1):
            depth += (s[k] == s[j]) - (s[k] == open_)
            if depth == 0:
                return s[k + 1 : j]
        return s[: j]
    m = re.compile(r"([0-9]+|[A-Za-z]+|!+)$", re.A).search(s, 0, j + 1)
    return m.group(1) if m else s[j]


def _int_literal(s: str) -> int | None:
    """``s`` as an integer when it is a plain number (``12``, ``{10^{6}}``, ``1,000``), else None."""
    s = s.strip()
    while len(s) >= 2 and s[0] + s[-1] in ("{}", "()") and balanced(s[1:-1]):
        s = s[1:-1].strip()
    number = plain_number(s) if len(s) <= 60 else None
    if number is None or number.percent or number.value.denominator != 1:
        return None
    return int(number.value)


def _has_tower(s: str) -> bool:
    for m in re.finditer(r"\^|\*\*", s):
        if re.search(r"\^|\*\*", _operand_after(s, m.end())):
            return True
    return False


def refusal_reason(pred: str, gold: str) -> str | None:
    """Why ``pred`` must not reach math-verify (its evaluation could explode), or None.

    Structural features (power towers, integrals, sums, limits...) are refused only when the gold
    answer does not use them too; size limits (huge exponents, factorials, binomials) always apply.
    """
    if len(pred) > MAX_ANSWER_CHARS:
        return "answer too long"
    depth = max_depth = 0
    for c in pred:
        if c in "{([":
            depth += 1
            max_depth = max(max_depth, depth)
        elif c in "})]":
            depth -= 1
    if max_depth > _MAX_NESTING:
        return "nested too deeply"
    powers = [m for m in re.finditer(r"\^|\*\*", pred)]
    if len(powers) > _MAX_POWERS:
        return "too many powers"
    for m in powers:
        exponent = _operand_after(pred, m.end())
        if re.search(r"\^|\*\*", exponent) and not _has_tower(gold):
            return "power tower"
        e = _int_literal(exponent)
        if e is None:
            continue
        if abs(e) > _BIG_EXPONENT:
            return "huge exponent"
        base = _int_literal(_operand_before(pred, m.start()))
        if base is not None and abs(base) > 1 and abs(e) * math.log10(abs(base)) > _BIG_RESULT_DIGITS:
            return "huge power"
        if base is None and abs(e) > 1000 and pred[: m.start()].rstrip()[-1:] in ")}]":
            return "huge power of an expression"
    for m in re.finditer(r"(?<!\\)!+", pred):
        if pred[m.end() : m.end() + 1] == "=":
            continue  # "!=": not a factorial
        if len(m.group(0)) > 2:
            return "factorial chain"
        arg = _operand_before(pred, m.start())
        if "!" in arg:
            return "nested factorial"
        n = _int_literal(arg)
        if n is not None and n > _BIG_FACTORIAL:
            return "huge factorial"
    for m in re.finditer(r"\\[dt]?binom\s*(?=\{)", pred):
        group = braced_group(pred, m.end(), MAX_ANSWER_CHARS)
        n = _int_literal(group[0]) if group else None
        if n is not None and abs(n) > _BIG_BINOMIAL:
            return "huge binomial"
    gold_heavy = {m.group(0) for m in _HEAVY_COMMANDS.finditer(gold)}
    for m in _HEAVY_COMMANDS.finditer(pred):
        if m.group(0) not in gold_heavy:
            return f"{m.group(0)} (not in the gold answer)"
    return None
