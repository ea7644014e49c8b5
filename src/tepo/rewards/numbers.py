"""Plain numbers, decided exactly with :class:`fractions.Fraction` in this process, and the rule for
digits with separators between them.

Digit grouping (both the answer and the gold follow it; see docs/reliability.md):

* Digits separated by spacing (a space, a thin or no-break space, ``\\,``, ``\\ ``, ``~``, ...)
  are one number only when they form a thousands grouping: 1 to 3 digits, no leading zero, then
  groups of exactly 3 (``1 000``, ``12\\,345\\,678``). Any other spacing between digits (``0 5``,
  ``12 34``) makes the answer ambiguous: it is read as no number at all (math-verify would read
  ``1 000`` as 1*000 = 0 and ``2 3`` as 5), so it can never be a false positive.
* A comma between digits (``,`` or ``{,}``) is a thousands separator under the same grouping
  rule and only outside brackets (``58,500`` = 58500, but ``(312,123,231)`` is a triple; brackets
  are ``()``, ``[]`` and the set braces ``\\{\\}``, not a TeX group ``{...}``:
  ``\\frac{1}{29,\\!322}`` = ``\\frac{1}{29322}``). Any other comma between digits separates
  items of a list: ``0,111`` is the pair 0, 111, never 111 and never the decimal 0.111 (a decimal
  comma is not read: a false negative for writers who use one, never a false positive).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction


@dataclass(frozen=True)
class Number:
    value: Fraction
    inexact: bool  # written as a decimal or in scientific notation
    percent: bool


# --------------------------------------------------------------------------------------------
# digit grouping

_SPACE_SEP = r"(?:[ \t\u00a0\u2009\u202f]|\\[,;:!> ]|~|\\quad|\\qquad|\\thinspace)"
_COMMA_SEP = r"(?:,\\!|\{,\}|,)"  # MATH writes 29,\!322
_RE_DIGIT_RUN = re.compile(r"(?<![0-9])[0-9]+(?:(?:%s+|%s)[0-9]+)+" % (_SPACE_SEP, _COMMA_SEP))
_RE_GAP = re.compile(r"%s+|%s" % (_SPACE_SEP, _COMMA_SEP))
_RE_ARGUMENTS = re.compile(r"(?:\\[dt]?frac|\\binom|\^|_)\s*$")  # "\frac 3 8": two arguments, no grouping
_RE_GROUPED = re.compile(r"[1-9][0-9]{0,2}(?:\|[0-9]{3})+")  # groups joined by "|" below


def _depths(s: str) -> list[int]:
    """Bracket depth before each character: ``(``, ``[`` and the set brace ``\\{`` open; ``)``,
    ``]``, ``\\}`` close. A TeX group ``{...}`` (the argument of ``\\frac``, ``\\sqrt``, ``^``,
    ``_``...) is no bracket: ``\\frac{1}{29,322,216}`` holds one number."""
    out, depth = [], 0
    for i, c in enumerate(s):
        out.append(depth)
        set_brace = i > 0 and s[i - 1] == "\\"
        depth += (c in "([" or (c == "{" and set_brace)) - (c in ")]" or (c == "}" and set_brace))
    return out


def group_digits(s: str) -> str | None:
    """``s`` with thousands groupings joined (``1 000`` -> ``1000``, ``58,500`` -> ``58500``) and
    other commas between digits written as list commas (``0,111`` -> ``0, 111``); None when
    digits are separated by spacing that is no grouping (see the module doc)."""
    if not any(c.isdigit() for c in s):
        return s
    depth = None
    out, last = [], 0
    for m in _RE_DIGIT_RUN.finditer(s):
        run = m.group(0)
        if _RE_ARGUMENTS.search(s, 0, m.start()):
            continue
        groups = re.split(_RE_GAP.pattern, run)
        gaps = _RE_GAP.findall(run)
        spaced = [not re.fullmatch(_COMMA_SEP, g) for g in gaps]
        grouped = bool(_RE_GROUPED.fullmatch("|".join(groups))) and len(set(spaced)) == 1
        if grouped and not spaced[0]:
            depth = depth or _depths(s)
            grouped = depth[m.start()] == 0  # inside brackets a comma separates items
        out.append(s[last : m.start()])
        if grouped:
            out.append("".join(groups))
        elif any(spaced):
            return None  # "0 5", "12 34": spaced digits in no grouping
        else:
            out.append(", ".join(groups))
        last = m.end()
    out.append(s[last:])
    return "".join(out)


# --------------------------------------------------------------------------------------------
# plain numbers

_WRAPPERS = [
    re.compile(r"^\$\$(.*)\$\$$", re.S),
    re.compile(r"^\$(.*)\$$", re.S),
    re.compile(r"^\\\((.*)\\\)$", re.S),
    re.compile(r"^\\\[(.*)\\\]$", re.S),
    re.compile(r"^\\(?:boxed|fbox|text|textbf|mathrm|mathbf|displaystyle)\s*\{(.*)\}$", re.S),
    re.compile(r"^\\displaystyle\s+(.*)$", re.S),
    re.compile(r"^\{(.*)\}$", re.S),
]
SPACING = re.compile(r"\\[,!;:> ]|~|\\quad|\\qquad")
_LHS = re.compile(r"^[A-Za-z](?:_\{?[A-Za-z0-9]+\}?)?\s*=\s*", re.A)
_DEGREES = re.compile(r"\s*(?:\^\s*\{?\\circ\}?|\\circ|°|\\degree)$")
_PERCENT = re.compile(r"\s*(?:\\%|%|\\text\{\s*\\?%\s*\}|\s*percent)$")
# trailing units: "18 dollars", "5 \text{ apples}", "3\mathrm{cm}" (words only: "5 x" stays a product;
# "2\mathrm{e}" is twice Euler's number)
_UNITS = re.compile(
    r"(?:\s*\\(?:text|mathrm|textrm|mbox)\s*\{\s*(?!e\s*\})[A-Za-z][A-Za-z .]*\}|\s+[A-Za-z]{2,}(?:\s+[A-Za-z]{2,}){0,2})$", re.A
)
_DOLLAR = re.compile(r"^(?:\\\$|\$|\\text\{\s*\\\$\s*\})\s*")

_DEC = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_SIGNED_DEC = r"[+-]?\s*" + _DEC
_RE_PLAIN = re.compile(_DEC, re.A)
_RE_SCI = re.compile(r"(" + _DEC + r")\s*[eE]\s*([+-]?[0-9]{1,3})", re.A)
_RE_TIMES10 = re.compile(
    r"(" + _DEC + r")\s*(?:\\times|\\cdot|\*|x)\s*10\s*\^\s*(?:\{\s*([+-]?[0-9]{1,3})\s*\}|([+-]?[0-9]{1,3}))", re.A
)
_RE_POW10 = re.compile(r"10\s*\^\s*(?:\{\s*([+-]?[0-9]{1,3})\s*\}|([0-9]))", re.A)
_RE_FRAC = re.compile(
    r"\\[dt]?frac\s*(?:\{\s*(" + _SIGNED_DEC + r")\s*\}|([0-9]))\s*(?:\{\s*(" + _SIGNED_DEC + r")\s*\}|([0-9]))", re.A
)
_RE_SLASH = re.compile(r"(" + _SIGNED_DEC + r")\s*/\s*(" + _SIGNED_DEC + r")", re.A)


def _dec(text: str) -> Fraction:
    return Fraction(text.replace(" ", ""))


def unwrap(s: str) -> str:
    """``s`` without the math delimiters and text/box wrappers around all of it."""
    for _ in range(8):  # a few layers at most: "$\boxed{\text{5}}$"
        before = s
        for rx in _WRAPPERS:
            m = rx.match(s)
            if m and balanced(m.group(1)):
                s = m.group(1).strip()
        if s == before:
            break
    return s


def balanced(s: str) -> bool:
    depth = 0
    i = 0
    while i < len(s):
        c = s[i]
        if c == "\\":
            i += 2
            continue
        depth += (c == "{") - (c == "}")
        if depth < 0:
            return False
        i += 1
    return depth == 0


def plain_number(text: str) -> Number | None:
    """``text`` as a plain number, or None when it is anything else (the exact fast path)."""
    try:
        return _parse_plain_number(text)
    except (ValueError, ZeroDivisionError, OverflowError):
        return None


def _parse_plain_number(text: str) -> Number | None:
    s = text.strip()
    if not s or len(s) > 200:
        return None
    s = group_digits(unwrap(s))
    if s is None:
        return None
    s = SPACING.sub("", s).strip()
    s = unwrap(s)
    m = _LHS.match(s)
    if m:
        s = s[m.end() :]
    if "=" in s:
        return None
    if s.endswith(".") and not s.endswith(".."):
        s = s[:-1].rstrip()  # the sentence's full stop
    percent = False
    m = _PERCENT.search(s)
    if m:
        percent, s = True, s[: m.start()]
    s = _DEGREES.sub("", s)
    s = _UNITS.sub("", s)
    s = _DOLLAR.sub("", s)
    s = unwrap(s.strip())
    sign = 1
    if s and s[0] in "+-":
        sign = -1 if s[0] == "-" else 1
        s = unwrap(s[1:].strip())
    if not s:
        return None
    value: Fraction | None = None
    inexact = False
    if m := _RE_PLAIN.fullmatch(s):
        value, inexact = _dec(s), "." in s
    elif m := _RE_SCI.fullmatch(s):
        value, inexact = _dec(m.group(1)) * Fraction(10) ** int(m.group(2)), True
    elif m := _RE_TIMES10.fullmatch(s):
        value, inexact = _dec(m.group(1)) * Fraction(10) ** int(m.group(2) or m.group(3)), True
    elif m := _RE_POW10.fullmatch(s):
        value = Fraction(10) ** int(m.group(1) or m.group(2))
    elif m := _RE_FRAC.fullmatch(s):
        num, den = _dec(m.group(1) or m.group(2)), _dec(m.group(3) or m.group(4))
        value = num / den if den else None
    elif m := _RE_SLASH.fullmatch(s):
        num, den = _dec(m.group(1)), _dec(m.group(2))
        value = num / den if den else None
    if value is None:
        return None
    return Number(sign * value, inexact, percent)


def _close(pred: Fraction, gold: Number, pred_inexact: bool) -> bool:
    if pred == gold.value:
        return True
    # A decimal that rounds to a non-integer gold at 6 places counts (0.333333 for 1/3), as
    # math-verify does; an integer gold must be hit exactly.
    if (pred_inexact or gold.inexact) and gold.value.denominator != 1:
        return round(pred, 6) == round(gold.value, 6)
    return False


def numbers_equal(pred: Number, gold: Number) -> bool:
    """Equal as numbers; a percentage on one side matches either N or N/100 on the other."""
    if pred.percent == gold.percent:
        return _close(pred.value, gold, pred.inexact)
    if pred.percent:
        return any(_close(v, gold, pred.inexact) for v in (pred.value, pred.value / 100))
    scaled = [gold, Number(gold.value / 100, True, False)]
    return any(_close(pred.value, g, pred.inexact) for g in scaled)


def format_fraction(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"
