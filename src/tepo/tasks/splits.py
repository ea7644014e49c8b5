"""Checking that problem sets (train / validation / test) share no problem.

Ids alone prove nothing (two files can number their rows alike, and the same problem can carry two
ids), so problems are compared by content: the problem text after normalising case and white space,
and, where a problem has one (the arithmetic generator's ``content``: template and operands), its
canonical content, which also catches the same arithmetic told with other names.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

_SPACE = re.compile(r"\s+")


def normalised_text(problem: str) -> str:
    """The problem text as compared across splits: lower case, runs of white space as one space."""
    return _SPACE.sub(" ", problem).strip().lower()


def _keys(problem: Mapping) -> list[tuple[str, str]]:
    keys = [("text", normalised_text(str(problem["problem"])))]
    if problem.get("content"):
        keys.append(("content", str(problem["content"])))
    return keys


def check_disjoint(splits: Mapping[str, Sequence[Mapping]]) -> None:
    """Raise ValueError naming the two splits and a shared problem when any two of `splits`
    (name -> problems) share a problem by normalised text or canonical content."""
    seen: dict[tuple[str, str], tuple[str, str]] = {}  # key -> (split, id) of its first holder
    for name, problems in splits.items():
        mine: dict[tuple[str, str], str] = {}
        for problem in problems:
            for key in _keys(problem):
                holder = seen.get(key)
                if holder is not None:
                    what = "text" if key[0] == "text" else f"content {key[1]!r}"
                    raise ValueError(
                        f"the {holder[0]} and {name} problems overlap: {holder[0]} {holder[1]!r} and {name} "
                        f"{problem.get('id')!r} have the same {what}; use disjoint data"
                    )
                mine.setdefault(key, str(problem.get("id")))
        seen.update({key: (name, pid) for key, pid in mine.items()})
