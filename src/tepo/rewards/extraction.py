"""The final answer of a completion: bounded work on any text, never raises on a string.

A completion states its answer in a box (``\\boxed{...}``, ``\\fbox{...}``, ``\\boxed X``), after
"The final answer is", or after ``####``. The one stated last is the final answer, whatever its
form. Several boxes in a row at the end (``\\boxed{1}, \\boxed{2}`` or ``x = \\boxed{2} or x =
\\boxed{3}``) are kept together as the answer's parts, for a gold answer that has several parts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterator

MAX_ANSWER_CHARS = 1000  # a longer extracted answer is treated as no answer
MAX_BOXES_TRIED = 8  # boxes tried from the end when the last one is unclosed, empty or too long
MAX_PARTS = 8  # boxes in the final run that are kept as parts

_BOX_NEEDLES = ("\\boxed", "\\fbox")


@dataclass(frozen=True)
class FinalAnswer:
    """``text``: the answer stated last; ``parts``: the boxes of the final run of boxes, in order
    (one element when the answer is not a run of several boxes)."""

    text: str
    parts: tuple[str, ...]


@dataclass(frozen=True)
class _Box:
    start: int  # index of the backslash
    content: str
    end: int  # index after the closing brace or token


def _box_starts(text: str, limit: int) -> Iterator[tuple[int, int]]:
    """(start, index after the command name) of the last ``limit`` ``\\boxed``/``\\fbox``
    commands, rightmost first. Successive ``rfind`` calls scan each character at most once per
    needle: linear in ``text``."""
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
        yield pos, after


def braced_group(text: str, start: int, limit: int) -> tuple[str, int] | None:
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


def _box_at(text: str, start: int, after: int) -> _Box | None:
    i = after
    while i < len(text) and i < after + 16 and text[i] in " \t":
        i += 1
    if i < len(text) and text[i] == "{":
        group = braced_group(text, i, MAX_ANSWER_CHARS)
        return None if group is None else _Box(start, group[0], group[1])
    if i == after:
        return None  # "\boxed5" is not a LaTeX form we accept
    # "\boxed 5": the argument is one token, up to whitespace or a math delimiter
    m = _RE_BOX_TOKEN.match(text, i)
    return _Box(start, m.group(0), m.end()) if m else None


def _usable(box: _Box | None) -> bool:
    return box is not None and bool(box.content.strip()) and len(box.content) <= MAX_ANSWER_CHARS


# What may stand between two boxes of one final run: spacing, math delimiters, commas, "and"/"or",
# and a short left-hand side ("x = \boxed{2} or x = \boxed{3}").
_RE_CONNECTOR = re.compile(
    r"(?:\s|\$|,|;|&|\\\\|\\[,;:!]|\\quad|\\qquad|\\[()\[\]]|\\text\s*\{\s*(?:and|or|,)?\s*\}|\band\b|\bor\b"
    r"|[A-Za-z](?:_\{?[A-Za-z0-9]{1,3}\}?)?\s*=)*",
    re.A,
)
_MAX_CONNECTOR_CHARS = 40


def _final_run(text: str, last: _Box) -> list[_Box]:
    """The last box and the boxes right before it that only connectors separate from the next."""
    run = [last]
    for start, after in _box_starts(text[: last.start], MAX_PARTS - 1):
        box = _box_at(text, start, after)
        if not _usable(box) or box.end > run[-1].start:
            break  # unusable, or nested in the next one
        gap = text[box.end : run[-1].start]
        if len(gap) > _MAX_CONNECTOR_CHARS or not _RE_CONNECTOR.fullmatch(gap):
            break
        run.append(box)
    return run[::-1]


def _last_box(text: str) -> _Box | None:
    for start, after in _box_starts(text, MAX_BOXES_TRIED):
        box = _box_at(text, start, after)
        if _usable(box):
            return box
    return None


def _line_after(text: str, start: int) -> str:
    end = text.find("\n", start, start + MAX_ANSWER_CHARS + 64)
    return text[start : end if end >= 0 else start + MAX_ANSWER_CHARS + 64]


_RE_FINAL = re.compile(r"final answer is", re.I)
_RE_SENTENCE_END = re.compile(r"\.(\s|$)")


def _final_answer_phrase(text: str) -> tuple[int, str] | None:
    last = None
    for last in _RE_FINAL.finditer(text):  # linear; only the last one matters
        pass
    if last is None:
        return None
    line = _line_after(text, last.end()).lstrip(" \t:")
    for open_, close in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if line.startswith(open_):
            end = line.find(close, len(open_))
            return last.start(), line[len(open_) : end] if end >= 0 else line[len(open_) :]
    m = _RE_SENTENCE_END.search(line)  # end of the sentence ("... is 3.5. I hope it is correct.")
    if m:
        line = line[: m.start()]
    return last.start(), line.strip().rstrip(".,;!")


def _hash_answer(text: str) -> tuple[int, str] | None:
    pos = text.rfind("####")
    if pos < 0:
        return None
    return pos, _line_after(text, pos + 4).lstrip("# \t").strip().rstrip(".")


_RE_MATHS = re.compile(r"[0-9$\\^_=()\[\]{}+*/<>-]")


def _looks_like_an_answer(text: str) -> bool:
    """A phrase's text that may override a box: mathematics, or a single word ("... the final
    answer is indeed correct" after a box is a comment, not an answer)."""
    return bool(_RE_MATHS.search(text)) or len(text.split()) == 1


def final_answer(text: Any) -> FinalAnswer | None:
    """The final answer of a completion (see :func:`extract_answer`) with the parts of a final run
    of several boxes; None when there is none."""
    if not isinstance(text, str) or not text:
        return None
    candidates: list[tuple[int, str, _Box | None]] = []
    box = _last_box(text)
    if box is not None:
        candidates.append((box.start, box.content.strip(), box))
    for finder in (_final_answer_phrase, _hash_answer):
        found = finder(text)
        if found is not None and found[1].strip() and (box is None or _looks_like_an_answer(found[1])):
            candidates.append((found[0], found[1].strip(), None))
    if not candidates:
        return None
    _, answer, chosen = max(candidates, key=lambda c: c[0])  # the one stated last
    if len(answer) > MAX_ANSWER_CHARS:
        return None
    if chosen is None:
        return FinalAnswer(answer, (answer,))
    return FinalAnswer(answer, tuple(b.content.strip() for b in _final_run(text, chosen)))


def extract_answer(text: Any) -> str | None:
    """The final answer of a completion, or None.

    Candidates: the last ``\\boxed{...}`` / ``\\fbox{...}`` / ``\\boxed X`` (balanced braces; when
    the last box is unclosed, empty or too long, up to :data:`MAX_BOXES_TRIED` earlier boxes are
    tried), the text after the last "The final answer is" (up to the end of the sentence, or the
    ``$...$`` that follows), and the rest of the line after the last ``####``; the one that starts
    last in the text wins. An answer longer than :data:`MAX_ANSWER_CHARS` counts as none. Bounded
    work on any input; never raises on a string.
    """
    found = final_answer(text)
    return None if found is None else found.text


def completion_text(completion: Any) -> str | None:
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
