"""Answer extraction and verification, safe with untrusted model output.

Completions arrive by the million and some are hostile (by accident or not), so:

* :func:`extract_answer` does bounded work on any text: a few reverse scans, one brace scan per
  candidate box (capped at :data:`MAX_ANSWER_CHARS`), and an over-long answer counts as no answer.
* :func:`verify_answer` decides plain numbers (integers, decimals, fractions, thousands separators,
  percentages, ``x = 5``, ``\\dfrac{3}{4}``, ``\\$5``, ``4.5 \\times 10^{33}``) exactly with
  :class:`fractions.Fraction`, in this process. Everything else goes to math-verify, after a
  pre-screen that refuses answers whose evaluation could explode (power towers, huge powers,
  factorial chains, huge binomials, integrals/sums/limits the gold answer does not have, deep
  nesting), and then only inside a worker process that is killed and replaced when a call overruns
  :data:`VERIFY_TIMEOUT_S` (math-verify's own ``signal.alarm`` timeouts cannot interrupt one long
  C-level operation, such as a huge integer power, and work only on the main thread).
* Nothing here evaluates completion text as code or reads files it names.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

logger = logging.getLogger(__name__)

MAX_ANSWER_CHARS = 1000  # a longer extracted answer is treated as no answer
MAX_BOXES_TRIED = 8  # boxes tried from the end when the last one is unclosed, empty or too long
VERIFY_TIMEOUT_S = 1.5  # wall-clock limit of one math-verify call (the worker is killed after it)
WORKER_START_TIMEOUT_S = 120.0  # importing sympy on a loaded 2-core box can take a while
WORKER_MEMORY_BYTES = 4 << 30  # address-space limit of the worker (a huge power fails fast)

# What the verifier did, for monitoring (read with verifier_stats()).
_stats: Counter = Counter()


def verifier_stats() -> dict[str, int]:
    """Counts of what :func:`verify_answer` did in this process (repeated pairs are answered from a
    cache and not counted): ``plain`` (decided as numbers), ``math_verify`` (worker calls),
    ``refused`` (pre-screen), ``timeout`` (worker killed), ``worker_error`` (math-verify raised),
    ``worker_restart``, ``in_process`` (no worker could start), ``verify_error``/``reward_error``
    (a bug of ours, scored 0)."""
    return dict(_stats)


# --------------------------------------------------------------------------------------------
# extraction

_BOX_NEEDLES = ("\\boxed", "\\fbox")


def _box_positions(text: str, limit: int) -> Iterable[int]:
    """End positions of the last ``limit`` ``\\boxed``/``\\fbox`` commands, rightmost first.

    Successive ``rfind`` calls scan each character at most once per needle: linear in ``text``."""
    found = {n: text.rfind(n) for n in _BOX_NEEDLES}
    for _ in range(limit):
        needle = max(found, key=lambda n: found[n])
        pos = found[needle]
        if pos < 0:
            return
        after = pos + len(needle)
        found[needle] = text.rfind(needle, 0, pos)
        if after < len(text) and text[after].isalpha() and text[after].isascii():
            continue  # \boxeds, \fboxed...: another command
        yield after


def _braced_group(text: str, start: int, limit: int) -> tuple[str, int] | None:
    """Content of the brace group opening at ``text[start] == "{"`` and the index after it; None
    when it does not close within ``limit`` characters. ``\\{`` and ``\\}`` do not count."""
    depth = 0
    i = start
    end = min(len(text), start + limit + 2)
    while i < end:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
        i += 1
    return None


_RE_BOX_TOKEN = re.compile(r"[^\s$]{1,%d}" % (MAX_ANSWER_CHARS + 1))  # one more: to see an overlong one


def _boxed_content(text: str, after: int) -> str | None:
    i = after
    while i < len(text) and i < after + 16 and text[i] in " \t":
        i += 1
    if i < len(text) and text[i] == "{":
        group = _braced_group(text, i, MAX_ANSWER_CHARS)
        return None if group is None else group[0]
    if i == after:
        return None  # "\boxed5" is not a LaTeX form we accept
    # "\boxed 5": the argument is one token, up to whitespace or a math delimiter
    m = _RE_BOX_TOKEN.match(text, i)
    return m.group(0) if m else None


def _line_after(text: str, start: int) -> str:
    end = text.find("\n", start, start + MAX_ANSWER_CHARS + 64)
    return text[start : end if end >= 0 else start + MAX_ANSWER_CHARS + 64]


_RE_FINAL = re.compile(r"final answer is", re.I)


def _final_answer_phrase(text: str) -> str | None:
    last = None
    for last in _RE_FINAL.finditer(text):  # linear; only the last one matters
        pass
    if last is None:
        return None
    line = _line_after(text, last.end()).lstrip(" \t:")
    for open_, close in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if line.startswith(open_):
            end = line.find(close, len(open_))
            return line[len(open_) : end] if end >= 0 else line[len(open_) :]
    m = re.search(r"\.(\s|$)", line)  # end of the sentence ("... is 3.5. I hope it is correct.")
    if m:
        line = line[: m.start()]
    return line.strip().rstrip(".,;!")


def _hash_answer(text: str) -> str | None:
    pos = text.rfind("####")
    if pos < 0:
        return None
    return _line_after(text, pos + 4).lstrip("# \t").strip().rstrip(".")


def extract_answer(text: str) -> str | None:
    """The final answer of a completion, or None.

    In order: the last ``\\boxed{...}`` / ``\\fbox{...}`` / ``\\boxed X`` (balanced braces; when the
    last box is unclosed, empty or too long, up to :data:`MAX_BOXES_TRIED` earlier boxes are tried),
    else the text after the last "The final answer is" (up to the end of the sentence, or the
    ``$...$`` that follows), else the rest of the line after the last ``####``. An answer longer than
    :data:`MAX_ANSWER_CHARS` counts as none. Bounded work on any input; never raises on a string.
    """
    if not isinstance(text, str) or not text:
        return None
    for after in _box_positions(text, MAX_BOXES_TRIED):
        content = _boxed_content(text, after)
        if content is not None and content.strip() and len(content) <= MAX_ANSWER_CHARS:
            return content.strip()
    for finder in (_final_answer_phrase, _hash_answer):
        answer = finder(text)
        if answer:
            return answer.strip() if len(answer) <= MAX_ANSWER_CHARS else None
    return None


# --------------------------------------------------------------------------------------------
# plain numbers: exact, in process


@dataclass(frozen=True)
class _Number:
    value: Fraction
    inexact: bool  # written as a decimal or in scientific notation
    percent: bool


_WRAPPERS = [
    re.compile(r"^\$\$(.*)\$\$$", re.S),
    re.compile(r"^\$(.*)\$$", re.S),
    re.compile(r"^\\\((.*)\\\)$", re.S),
    re.compile(r"^\\\[(.*)\\\]$", re.S),
    re.compile(r"^\\(?:boxed|fbox|text|textbf|mathrm|mathbf|displaystyle)\s*\{(.*)\}$", re.S),
    re.compile(r"^\\displaystyle\s+(.*)$", re.S),
    re.compile(r"^\{(.*)\}$", re.S),
]
_SPACING = re.compile(r"\\[,!;:> ]|~|\\quad|\\qquad")
_LHS = re.compile(r"^[A-Za-z](?:_\{?[A-Za-z0-9]+\}?)?\s*=\s*", re.A)
_DEGREES = re.compile(r"\s*(?:\^\s*\{?\\circ\}?|\\circ|°|\\degree)$")
_PERCENT = re.compile(r"\s*(?:\\%|%|\\text\{\s*\\?%\s*\}|\s*percent)$")
# trailing units: "18 dollars", "5 \text{ apples}", "3\mathrm{cm}" (words only: "5 x" stays a product)
_UNITS = re.compile(
    r"(?:\s*\\(?:text|mathrm|textrm|mbox)\s*\{\s*[A-Za-z][A-Za-z .]*\}|\s+[A-Za-z]{2,}(?:\s+[A-Za-z]{2,}){0,2})$", re.A
)
_DOLLAR = re.compile(r"^(?:\\\$|\$|\\text\{\s*\\\$\s*\})\s*")

_DEC = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_SIGNED_DEC = r"[+-]?\s*" + _DEC
_RE_PLAIN = re.compile(r"(?:[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?|" + _DEC + r")", re.A)
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
    return Fraction(text.replace(" ", "").replace(",", ""))


def _unwrap(s: str) -> str:
    for _ in range(8):  # a few layers at most: "$\boxed{\text{5}}$"
        before = s
        for rx in _WRAPPERS:
            m = rx.match(s)
            if m and _balanced(m.group(1)):
                s = m.group(1).strip()
        if s == before:
            break
    return s


def _balanced(s: str) -> bool:
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


def _plain_number(text: str) -> _Number | None:
    """``text`` as a plain number, or None when it is anything else (the exact fast path)."""
    try:
        return _parse_plain_number(text)
    except (ValueError, ZeroDivisionError, OverflowError):
        return None


def _parse_plain_number(text: str) -> _Number | None:
    s = text.strip()
    if not s or len(s) > 200:
        return None
    s = _unwrap(s)
    s = s.replace("{,}", ",")
    s = _SPACING.sub("", s).strip()
    s = _unwrap(s)
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
    s = _unwrap(s.strip())
    sign = 1
    if s and s[0] in "+-":
        sign = -1 if s[0] == "-" else 1
        s = _unwrap(s[1:].strip())
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
    return _Number(sign * value, inexact, percent)


def _close(pred: Fraction, gold: _Number, pred_inexact: bool) -> bool:
    if pred == gold.value:
        return True
    # A decimal that rounds to a non-integer gold at 6 places counts (0.333333 for 1/3), as
    # math-verify does; an integer gold must be hit exactly.
    if (pred_inexact or gold.inexact) and gold.value.denominator != 1:
        return round(pred, 6) == round(gold.value, 6)
    return False


def _numbers_equal(pred: _Number, gold: _Number) -> bool:
    """Equal as numbers; a percentage on one side matches either N or N/100 on the other."""
    if pred.percent == gold.percent:
        return _close(pred.value, gold, pred.inexact)
    if pred.percent:
        return any(_close(v, gold, pred.inexact) for v in (pred.value, pred.value / 100))
    scaled = [gold, _Number(gold.value / 100, True, False)]
    return any(_close(pred.value, g, pred.inexact) for g in scaled)


def _format_fraction(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


# --------------------------------------------------------------------------------------------
# pre-screen: refuse what could explode before it reaches sympy

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
    while len(s) >= 2 and s[0] + s[-1] in ("{}", "()") and _balanced(s[1:-1]):
        s = s[1:-1].strip()
    number = _plain_number(s) if len(s) <= 60 else None
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
        group = _braced_group(pred, m.end(), MAX_ANSWER_CHARS)
        n = _int_literal(group[0]) if group else None
        if n is not None and abs(n) > _BIG_BINOMIAL:
            return "huge binomial"
    gold_heavy = {m.group(0) for m in _HEAVY_COMMANDS.finditer(gold)}
    for m in _HEAVY_COMMANDS.finditer(pred):
        if m.group(0) not in gold_heavy:
            return f"{m.group(0)} (not in the gold answer)"
    return None


# --------------------------------------------------------------------------------------------
# math-verify, in this process (worker side) or behind the worker guard


def _as_latex(answer: str) -> str:
    """One ``$...$`` math span: dollar signs inside (``$69$,$84$``, ``\\$5``) and a final full stop go."""
    return "$" + answer.replace("\\$", "").replace("$", "").strip().rstrip(".").strip() + "$"


def _math_verify(pred: str, gold: str, timeout_s: int | None) -> tuple[bool, bool]:
    """(verdict, gold parsed) with math-verify. ``timeout_s`` None disables its signal timeouts
    (needed off the main thread). Gold in LaTeX is wrapped in ``$...$``, as math-verify wants."""
    from math_verify import parse, verify

    gold_parsed = _parse_gold(gold, timeout_s)
    if not gold_parsed:
        return False, False
    pred_parsed = parse(_as_latex(pred), parsing_timeout=timeout_s)
    if not pred_parsed:
        return False, True
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout_s)), True


_gold_cache: dict[str, list] = {}


def _parse_gold(gold: str, timeout_s: int | None) -> list:
    from math_verify import parse

    if gold not in _gold_cache:
        if len(_gold_cache) > 4096:
            _gold_cache.clear()
        _gold_cache[gold] = parse(_as_latex(gold), parsing_timeout=timeout_s)
    return _gold_cache[gold]


def _worker_main() -> None:
    """The worker's loop: one JSON request a line on stdin, one JSON verdict a line back."""
    proto = os.fdopen(os.dup(1), "w", encoding="ascii", newline="\n")
    os.dup2(2, 1)  # anything a library prints goes to stderr, not into the protocol
    _die_with_parent()
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, WORKER_MEMORY_BYTES))
    except (ImportError, ValueError, OSError):
        pass
    logging.disable(logging.CRITICAL)  # math-verify logs every timeout as a warning
    import warnings

    warnings.simplefilter("ignore")
    _math_verify("x+1", "1+x", 5)  # import and warm up sympy and the parsers before "ready"
    proto.write("ready\n")
    proto.flush()
    for line in sys.stdin.buffer:
        try:
            request = json.loads(line)
            ok, gold_ok = _math_verify(request["pred"], request["gold"], request.get("t"))
            reply = {"ok": ok, "gold_ok": gold_ok}
        except Exception as err:  # noqa: BLE001 - a verdict, never a crash
            reply = {"ok": False, "gold_ok": True, "error": type(err).__name__}
        proto.write(json.dumps(reply) + "\n")
        proto.flush()


def _die_with_parent() -> None:
    """Linux: ask for SIGKILL when the parent dies, so a worker stuck in C never outlives it."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort only
        pass


class _Worker:
    """One math-verify child process, spoken to over pipes."""

    def __init__(self) -> None:
        src = str(Path(__file__).resolve().parent.parent)
        boot = f"import sys; sys.path.insert(0, {src!r}); from tepo.rewards import _worker_main; _worker_main()"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", boot],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
        )
        self.ready = False
        self._buf = b""

    def _readline(self, deadline: float) -> bytes | None:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            readable, _, _ = select.select([fd], [], [], left)
            if not readable:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError("math-verify worker exited")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def wait_ready(self, timeout: float) -> bool:
        if not self.ready:
            line = self._readline(time.monotonic() + timeout)
            self.ready = line == b"ready"
        return self.ready

    def call(self, pred: str, gold: str, timeout: float) -> dict | None:
        """The reply, or None when the call overran ``timeout`` (the worker is then useless)."""
        request = json.dumps({"pred": pred, "gold": gold, "t": max(1, int(timeout))}) + "\n"
        self.proc.stdin.write(request.encode("ascii"))
        self.proc.stdin.flush()
        line = self._readline(time.monotonic() + timeout)
        return None if line is None else json.loads(line)

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except Exception:  # noqa: BLE001
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except Exception:  # noqa: BLE001
                pass


class _Guard:
    """Runs math-verify in a worker process with a hard wall-clock limit.

    A warm spare waits beside the active worker, so replacing a killed worker costs the next call
    nothing; a new spare starts at once. Calls are serialised (one lock per process); a forked child
    process starts its own workers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._active: _Worker | None = None
        self._spare: _Worker | None = None
        self.unavailable: str | None = None

    def after_fork_in_child(self) -> None:
        """A forked child must not talk to its parent's workers (or inherit a held lock)."""
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._active = self._spare = None

    def _ensure(self) -> _Worker:
        if self._pid != os.getpid():  # forked without the hook (should not happen)
            self.after_fork_in_child()
        if self._active is None:
            self._active, self._spare = (self._spare or _Worker()), None
        if self._spare is None:
            self._spare = _Worker()
        if not self._active.wait_ready(WORKER_START_TIMEOUT_S):
            raise RuntimeError("math-verify worker did not start")
        return self._active

    def _retire_active(self) -> None:
        if self._active is not None:
            self._active.kill()
        self._active = None
        _stats["worker_restart"] += 1

    def verify(self, pred: str, gold: str, timeout: float) -> dict | None:
        with self._lock:
            try:
                worker = self._ensure()
            except (OSError, RuntimeError, EOFError, ValueError) as err:
                self.close()
                self.unavailable = f"{type(err).__name__}: {err}"
                raise
            try:
                reply = worker.call(pred, gold, timeout)
            except (OSError, EOFError, ValueError):
                reply = {"ok": False, "gold_ok": True, "error": "worker died"}
                self._retire_active()
                return reply
            if reply is None:
                self._retire_active()
                if self._spare is not None:  # promote the spare now; its replacement warms up
                    self._active, self._spare = self._spare, _Worker()
            return reply

    def close(self) -> None:
        if self._pid != os.getpid():
            return
        for w in (self._active, self._spare):
            if w is not None:
                w.kill()
        self._active = self._spare = None


_guard = _Guard()
atexit.register(_guard.close)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_guard.after_fork_in_child)
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


def _guarded_math_verify(pred: str, gold: str, timeout: float) -> bool:
    if _guard.unavailable is None and os.name == "posix" and sys.executable:
        try:
            reply = _guard.verify(pred, gold, timeout)
        except (OSError, RuntimeError, EOFError, ValueError):
            _warn_once("worker", f"math-verify worker unavailable ({_guard.unavailable}); verifying in process")
        else:
            if reply is None:
                _stats["timeout"] += 1
                return False
            _stats["math_verify"] += 1
            if reply.get("error"):
                _stats["worker_error"] += 1
            if not reply.get("gold_ok", True):
                _warn_once(f"gold:{gold}", f"math-verify cannot parse the gold answer {gold!r}; every answer scores 0")
            return bool(reply["ok"])
    # No worker: math-verify here, with its signal timeouts only where they work (main thread).
    _stats["in_process"] += 1
    on_main = threading.current_thread() is threading.main_thread()
    try:
        return _math_verify(pred, gold, max(1, int(timeout)) if on_main else None)[0]
    except Exception:  # noqa: BLE001
        return False


# --------------------------------------------------------------------------------------------
# public entry points

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


def _clean(text: str) -> str:
    """No NUL/control characters or lone surrogates (they break parsers and encoders)."""
    return _CONTROL.sub("", text)


def _check_gold(gold: Any) -> str:
    if isinstance(gold, bool) or not isinstance(gold, (str, int)):
        raise TypeError(f"gold answer must be a string (or an int), got {type(gold).__name__}: {gold!r:.80}")
    gold = str(gold).strip()
    if not gold:
        raise ValueError("gold answer is empty")
    return gold


def verify_answer(pred: str, gold: str, *, timeout: float | None = None) -> bool:
    """Whether the extracted answer ``pred`` equals the ``gold`` answer.

    Plain numbers on both sides are compared exactly in this process (``0.5`` = ``\\frac{1}{2}`` =
    ``1/2``, ``1,000`` = ``1000``, ``x = 5`` = ``5``, ``25\\%`` = ``25`` or ``0.25``, ``\\$5`` = ``5``; a
    decimal matches a non-integer gold when both round alike at 6 places). Anything else goes to
    math-verify after :func:`refusal_reason` (a refused answer is wrong), in a worker process killed
    after ``timeout`` seconds (default :data:`VERIFY_TIMEOUT_S`; an overrun answer is wrong).
    Raises only on a malformed gold (not a string, or empty).
    """
    gold = _check_gold(gold)
    if not isinstance(pred, str):
        return False
    pred = _clean(pred).strip()
    if not pred or len(pred) > MAX_ANSWER_CHARS:
        return False
    try:
        return _verify_clean(pred, _clean(gold), VERIFY_TIMEOUT_S if timeout is None else float(timeout))
    except Exception as err:  # noqa: BLE001 - a bug on our side must not crash on a completion
        _stats["verify_error"] += 1
        _warn_once(f"verify:{type(err).__name__}", f"verify_answer failed ({type(err).__name__}: {err}); counted wrong")
        return False


@lru_cache(maxsize=1 << 16)
def _verify_clean(pred: str, gold: str, timeout: float) -> bool:
    # Cached: in RL the same answer to the same problem comes back many times, and a refused or
    # overrun answer should cost its time once only.
    g = _plain_number(gold)
    p = _plain_number(pred)
    if g is not None and p is not None:
        _stats["plain"] += 1
        return _numbers_equal(p, g)
    reason = refusal_reason(pred, gold)
    if reason is not None:
        _stats["refused"] += 1
        return False
    return _guarded_math_verify(pred, gold, timeout)


def _completion_text(completion: Any) -> str | None:
    """The text of a completion: a string, or TRL's conversational form (a list of messages)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, (list, tuple)):
        parts = []
        for message in completion:
            content = message.get("content") if isinstance(message, dict) else message
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):  # content parts: [{"type": "text", "text": ...}]
                parts.extend(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
        return "\n".join(parts)
    return None


def math_reward(completion: Any, gold: str) -> float:
    """1.0 if the completion's final answer (see :func:`extract_answer`) equals ``gold``, else 0.0.

    Never raises on any completion; a malformed gold (not a string, or empty) raises a clear error.
    """
    gold = _check_gold(gold)
    try:
        text = _completion_text(completion)
        answer = extract_answer(text) if text is not None else None
        return 1.0 if answer is not None and verify_answer(answer, gold) else 0.0
    except Exception as err:  # noqa: BLE001 - a bug on our side must not stop training: count it, score 0
        _stats["reward_error"] += 1
        _warn_once(f"err:{type(err).__name__}", f"math_reward failed on a completion ({type(err).__name__}); scored 0")
        return 0.0


def canonical_answer(text: str) -> str | None:
    """A normalised form of the completion's final answer, for majority voting: equal plain numbers
    map to one string (``0.5``, ``\\frac{1}{2}``, ``1/2`` -> ``"1/2"``; ``1,000`` -> ``"1000"``; a
    percentage sign and degrees are dropped); other answers lose spacing, ``\\left``/``\\right`` and
    ``\\dfrac``/``\\tfrac`` differences. None when there is no answer."""
    answer = extract_answer(text)
    if answer is None:
        return None
    answer = _clean(answer)
    number = _plain_number(answer)
    if number is not None:
        return _format_fraction(number.value)
    s = _unwrap(answer)
    s = re.sub(r"\\left(?![A-Za-z])|\\right(?![A-Za-z])|\\displaystyle", "", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = _SPACING.sub("", s)
    s = re.sub(r"\s+", "", s).rstrip(".")
    return s or None


def math_reward_func(completions: list, answer: list, **kwargs: Any) -> list[float]:
    """TRL reward function: ``completions`` (strings, or lists of ``{"role", "content"}`` messages
    for conversational prompts) against the dataset column ``answer``; other columns are ignored."""
    if isinstance(answer, str):
        answer = [answer] * len(completions)
    if len(answer) != len(completions):
        raise ValueError(f"math_reward: {len(completions)} completions but {len(answer)} answers")
    return [math_reward(c, a) for c, a in zip(completions, answer)]


math_reward_func.__name__ = "math_reward"
