"""Local JSONL problem files: one JSON object a line with ``problem`` and ``answer`` (and ``id``).

Every row is checked before anything else happens (no model is loaded by this module, so the
trainer and the evaluator read their data first and refuse a bad file early). Errors name the
file and the line.

Rules: ``problem`` must be a non-empty string. ``answer`` must be a non-empty string; an integer
or a finite float is accepted and turned into a string (``27`` -> ``"27"``, ``27.0`` -> ``"27"``,
``0.5`` -> ``"0.5"``), because several public sets store numeric answers; booleans, lists, null
and objects are refused. ``id`` is optional (a string or an integer); a missing id becomes
``<file stem>-<line number>``; ids must be unique. Blank lines are skipped. Other fields are kept.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

ON_ERROR = ("raise", "skip")


class DataError(ValueError):
    """A data file, or a row in it, that cannot be used."""


class Rows(list):
    """The rows of a data file (a plain list of dicts) plus what was skipped.

    ``skipped``: how many bad rows ``on_error="skip"`` dropped; ``errors``: their messages."""

    def __init__(self, rows=(), errors: list[str] | None = None):
        super().__init__(rows)
        self.errors: list[str] = list(errors or [])

    @property
    def skipped(self) -> int:
        return len(self.errors)


def _answer_text(value: Any) -> str:
    if isinstance(value, bool) or value is None or not isinstance(value, (str, int, float)):
        raise DataError(f"'answer' must be a string (or a number), got {type(value).__name__}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise DataError(f"'answer' must be finite, got {value}")
        value = int(value) if value.is_integer() else repr(value)
    text = str(value).strip()
    if not text:
        raise DataError("'answer' is empty")
    return text


def check_row(row: Any, default_id: str) -> dict:
    """One row, validated and normalised (``id``/``problem``/``answer`` as strings)."""
    if not isinstance(row, dict):
        raise DataError(f"a row must be a JSON object, got {type(row).__name__}")
    if "problem" not in row:
        raise DataError("missing field 'problem'")
    if "answer" not in row:
        raise DataError("missing field 'answer'")
    problem = row["problem"]
    if not isinstance(problem, str):
        raise DataError(f"'problem' must be a string, got {type(problem).__name__}")
    if not problem.strip():
        raise DataError("'problem' is empty")
    answer = _answer_text(row["answer"])
    rid = row.get("id", default_id)
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise DataError(f"'id' must be a string or an integer, got {type(rid).__name__}")
    rid = str(rid).strip()
    if not rid:
        raise DataError("'id' is empty")
    return {**row, "id": rid, "problem": problem, "answer": answer}


def load_jsonl(path: str | os.PathLike, *, on_error: str = "raise") -> Rows:
    """The rows of a JSONL problem file (a list of dicts; see the module doc for the rules).

    ``on_error="raise"`` (default): the first bad row raises :class:`DataError` naming the file and
    line. ``on_error="skip"``: bad rows are dropped and counted (``rows.skipped``, ``rows.errors``);
    a file with no usable row still raises. A missing, unreadable or empty file always raises.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err})") from err
    rows, errors = Rows(), []
    first_line_of: dict[str, int] = {}
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            try:
                text = raw.decode("utf-8")
                obj = json.loads(text)
            except UnicodeDecodeError as err:
                raise DataError(f"not UTF-8 ({err.reason} at byte {err.start})") from None
            except json.JSONDecodeError as err:
                raise DataError(f"not valid JSON ({err.msg}, column {err.colno})") from None
            row = check_row(obj, default_id=f"{path.stem}-{number}")
            if row["id"] in first_line_of:
                raise DataError(f"duplicate id {row['id']!r} (first on line {first_line_of[row['id']]})")
        except DataError as err:
            message = f"{path}, line {number}: {err}"
            if on_error == "raise":
                raise DataError(message) from None
            errors.append(message)
            continue
        first_line_of[row["id"]] = number
        rows.append(row)
    rows.errors = errors
    if not rows:
        why = f"all {len(errors)} rows are bad (first: {errors[0]})" if errors else "the file has no rows"
        raise DataError(f"{path}: no usable problems: {why}")
    return rows
