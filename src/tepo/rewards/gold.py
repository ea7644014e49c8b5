"""Gold answers: trusted input, prepared once each, when the data is loaded.

A gold answer is parsed (math-verify, as a whole: :func:`tepo.rewards.parsing.parse_whole`) once,
in this process, with a budget far above any parse of a real answer (:data:`GOLD_PARSE_TIMEOUT_S`;
the answers' own budget is 1 s of CPU time and must stay short, since they are untrusted). The
result is cached for the process's life. A gold that cannot be parsed even so raises :class:`GoldError`: from
:func:`prepare_golds`, with the data source, row and problem id, before any model is loaded; from
:func:`prepare_gold` (and so from the reward functions) when a caller skipped that step. It never
turns into a silent 0. The worker process parses its own copy with the same budget (sympy objects
do not survive pickling intact), outside the answers' time limit.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable

from tepo.rewards.forms import count_parts, math_verify_form
from tepo.rewards.numbers import Number, plain_number
from tepo.rewards.parsing import parse_whole
from tepo.rewards.stats import stats
from tepo.tasks.data import DataError

GOLD_PARSE_TIMEOUT_S = 60  # math-verify's budget for one gold answer (trusted; parsed once)


class GoldError(DataError):
    """A gold answer that cannot be used (not a string, empty, or unparseable): a data error."""


@dataclass(frozen=True)
class Gold:
    """A prepared gold answer. ``text``: as given (cleaned); ``number``: its value when it is a
    plain number; ``latex``: the form math-verify gets (:func:`math_verify_form`); ``parts``: how
    many parts it lists (:func:`count_parts`); ``parsed``: math-verify's parse in this process
    (None until needed: a plain number needs none to be judged against a plain number)."""

    text: str
    number: Number | None
    latex: str
    parts: int
    parsed: list | None = field(default=None, compare=False)


_cache: dict[str, Gold] = {}
_lock = threading.Lock()


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


def clean(text: str) -> str:
    """No NUL/control characters or lone surrogates (they break parsers and encoders)."""
    return _CONTROL.sub("", text)


def check_gold(gold: Any) -> str:
    """The gold answer as a stripped string; a clear error when it is not one or is empty."""
    if isinstance(gold, bool) or not isinstance(gold, (str, int)):
        raise TypeError(f"gold answer must be a string (or an int), got {type(gold).__name__}: {gold!r:.80}")
    gold = str(gold).strip()
    if not gold:
        raise ValueError("gold answer is empty")
    return gold


def _parse(latex: str) -> list:
    # math-verify's timeout is a signal alarm: only on the main thread; elsewhere no limit (trusted).
    on_main = threading.current_thread() is threading.main_thread()
    return parse_whole(latex, GOLD_PARSE_TIMEOUT_S if on_main else None)


def prepare_gold(gold: str, *, parse: bool = True) -> Gold:
    """The prepared form of a cleaned gold answer (cached). With ``parse``, math-verify's parse is
    made now unless the gold is a plain number; raises :class:`GoldError` when there is none."""
    found = _cache.get(gold)
    if found is not None and (found.parsed is not None or not parse or found.number is not None):
        return found
    with _lock:
        found = _cache.get(gold)
        if found is None:
            latex = math_verify_form(gold)
            if latex is None:
                raise GoldError(f"gold answer {gold!r}: digits separated by spaces that are no thousands grouping")
            found = Gold(gold, plain_number(gold), latex, count_parts(gold))
        if parse and found.parsed is None and found.number is None:
            found = parsed_gold(found)
        _cache[gold] = found
    return found


def parsed_gold(gold: Gold) -> Gold:
    """``gold`` with math-verify's parse (made now if missing; cached by :func:`prepare_gold`)."""
    if gold.parsed is not None:
        return gold
    parsed = _parse(gold.latex)
    stats["gold_parsed"] += 1
    if not parsed:
        raise GoldError(f"math-verify cannot parse the gold answer {gold.text!r} (as {gold.latex!r})")
    gold = Gold(gold.text, gold.number, gold.latex, gold.parts, parsed)
    _cache[gold.text] = gold
    return gold


def prepare_golds(problems: Iterable[dict], *, source: str, field_name: str = "answer") -> int:
    """Prepare the gold answer of every problem (dicts with ``id`` and ``answer``) once, now, so a
    gold that cannot be used is reported before any model is loaded. Raises :class:`GoldError`
    naming ``source``, the row (1-based) and the problem id of each bad gold (the first 5).
    Returns how many distinct gold answers were prepared."""
    bad: list[str] = []
    seen: set[str] = set()
    count = 0
    for row_number, problem in enumerate(problems, start=1):
        where = f"{source}, row {row_number} (id {str(problem.get('id', '?'))!r})"
        try:
            gold = clean(check_gold(problem.get(field_name)))
            if gold not in seen:
                seen.add(gold)
                prepare_gold(gold)
                count += 1
        except (TypeError, ValueError) as err:
            bad.append(f"{where}: {err}")
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise GoldError(f"{len(bad)} gold answer(s) cannot be judged: " + "; ".join(bad[:5]) + more)
    return count
