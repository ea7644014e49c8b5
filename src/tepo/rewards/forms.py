"""Rewriting an answer into the form handed to math-verify, the same way for answers and golds.

* Euler's number: ``\\mathrm{e}``, ``\\text{e}``, ``{\\rm e}``... become ``e``, which math-verify
  reads as Euler's number (math-verify 0.9 drops ``\\mathrm{e}``, so ``1 - \\frac{1}{\\mathrm{e}}``
  reads as 1).
* Intervals: an inequality in one variable (``-2 \\le x \\le 7``, ``x > 3``, ``x < -1 \\text{ or }
  x > 2``) and a membership (``x \\in [-2, 7]``) become the interval (``[-2, 7]``), so both forms
  compare equal in both directions.
* Digit grouping: :func:`tepo.rewards.numbers.group_digits`.
* A leading ``\\approx`` is dropped (``\\approx 8.24 \\text{ mph}`` states the value 8.24):
  math-verify reads the answer as a whole or not at all (:mod:`tepo.rewards.parsing`), and
  cannot read a value that starts with a relation.
"""

from __future__ import annotations

import re

from tepo.rewards.numbers import group_digits

_RE_EULER = re.compile(
    r"\\(?:mathrm|mathit|mathup|text|textrm|textit|operatorname)\s*\{\s*e\s*\}|\\mathrm\s+e(?![A-Za-z])"
    r"|\{\s*\\rm\s+e\s*\}|\\rm\s+e(?![A-Za-z])"
)


def euler(s: str) -> str:
    """Every upright ``e`` written as a plain ``e`` (Euler's number)."""
    return _RE_EULER.sub("e", s)


_REL = {
    "<": ("<", True), "\\lt": ("<", True), "\\le": ("<", False), "\\leq": ("<", False), "\\leqslant": ("<", False),
    "<=": ("<", False), "≤": ("<", False),
    ">": (">", True), "\\gt": (">", True), "\\ge": (">", False), "\\geq": (">", False), "\\geqslant": (">", False),
    ">=": (">", False), "≥": (">", False),
}
_REL_PATTERN = r"(<=|>=|\\leqslant|\\geqslant|\\leq|\\geq|\\le|\\ge|\\lt|\\gt|<|>|≤|≥)(?![A-Za-z])"
_VAR = r"[A-Za-z](?:_\{?[A-Za-z0-9]{1,3}\}?)?"
_RE_CHAIN = re.compile(r"^(.+?)\s*" + _REL_PATTERN + r"\s*(" + _VAR + r")\s*" + _REL_PATTERN + r"\s*(.+)$", re.S)
_RE_VAR_FIRST = re.compile(r"^(" + _VAR + r")\s*" + _REL_PATTERN + r"\s*(.+)$", re.S)
_RE_VAR_LAST = re.compile(r"^(.+?)\s*" + _REL_PATTERN + r"\s*(" + _VAR + r")$", re.S)
_RE_MEMBER = re.compile(r"^" + _VAR + r"\s*\\in\s*(.+)$", re.S)
_RE_OR = re.compile(r"\\text\s*\{\s*or\s*\}|\\lor(?![A-Za-z])|\\vee(?![A-Za-z])|\s+or\s+")
_INF = "\\infty"


def _bound(s: str) -> str | None:
    """``s`` when it is a constant bound: no relation, no ``=`` and no letter outside a command."""
    s = s.strip()
    if not s or re.search(_REL_PATTERN + r"|=|\\in(?![A-Za-z])", s):
        return None
    if re.search(r"[A-Za-z]", re.sub(r"\\[A-Za-z]+", "", s)):
        return None
    return s


def _interval(lo: str, lo_open: bool, hi: str, hi_open: bool) -> str:
    return ("(" if lo_open or lo == "-" + _INF else "[") + f"{lo}, {hi}" + (")" if hi_open or hi == _INF else "]")


def _one_interval(piece: str) -> str | None:
    piece = piece.strip()
    if m := _RE_MEMBER.match(piece):
        return m.group(1).strip()
    if m := _RE_CHAIN.match(piece):
        a, (d1, s1), (d2, s2), b = _bound(m.group(1)), _REL[m.group(2)], _REL[m.group(4)], _bound(m.group(5))
        if a is None or b is None or d1 != d2:
            return None
        return _interval(a, s1, b, s2) if d1 == "<" else _interval(b, s2, a, s1)
    if m := _RE_VAR_FIRST.match(piece):
        (d, strict), b = _REL[m.group(2)], _bound(m.group(3))
        if b is None:
            return None
        return _interval("-" + _INF, True, b, strict) if d == "<" else _interval(b, strict, _INF, True)
    if m := _RE_VAR_LAST.match(piece):
        a, (d, strict) = _bound(m.group(1)), _REL[m.group(2)]
        if a is None:
            return None
        return _interval(a, strict, _INF, True) if d == "<" else _interval("-" + _INF, True, a, strict)
    return None


def inequality_as_interval(s: str) -> str | None:
    """The interval (or union) that an inequality or membership in one variable describes, as
    LaTeX; None when ``s`` is not one."""
    if not re.search(_REL_PATTERN + r"|\\in(?![A-Za-z])", s):
        return None
    pieces = _RE_OR.split(s)
    intervals = [_one_interval(p) for p in pieces]
    if any(i is None for i in intervals):
        return None
    return " \\cup ".join(intervals)


_RE_APPROX = re.compile(r"^(?:\\approx|\\simeq|≈)(?![A-Za-z])\s*")


def math_verify_form(answer: str) -> str | None:
    """``answer`` as one ``$...$`` span for math-verify: Euler's ``e``, intervals and digit grouping
    rewritten, dollar signs inside (``$69$,$84$``, ``\\$5``), a leading ``\\approx`` and a final
    full stop dropped. None when its digits are spaced in no grouping (ambiguous: no verdict can be
    right)."""
    s = answer.replace("\\$", "").replace("$", "").strip().rstrip(".").strip()
    s = _RE_APPROX.sub("", s)
    s = group_digits(euler(s))
    if s is None:
        return None
    s = inequality_as_interval(s) or s
    return "$" + s + "$"


_RE_PART_WORD = re.compile(r"\\text\s*\{\s*(?:and|or)\s*\}|\s+(?:and|or)\s+|;")


def count_parts(gold: str) -> int:
    """How many parts a gold answer lists: top-level commas (outside brackets) and "and"/"or"
    separate parts; an outer set ``\\{...\\}`` counts its elements; ``\\pm`` makes two."""
    s = group_digits(gold.replace("$", "").strip())
    if s is None:
        return 1
    s = s.strip()
    if s.startswith("\\{") and s.endswith("\\}"):
        s = s[2:-2]
    s = _RE_PART_WORD.sub(",", s)
    parts, depth, current = 0, 0, 0
    for c in s:
        depth += (c in "([{") - (c in ")]}")
        if c == "," and depth == 0:
            parts += current > 0
            current = 0
        elif not c.isspace():
            current += 1
    parts += current > 0
    return max(parts, 2) if "\\pm" in s or "\\mp" in s else parts
