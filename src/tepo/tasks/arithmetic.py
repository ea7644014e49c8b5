"""Arithmetic word problems: a small, fully offline training and held-out task.

Levels: 1 = one addition or subtraction, operands under 20; 2 = one multiplication with factors
under 12, or one addition with operands under 100; 3 = two operations. Problems come from
templates with names and objects, deterministic per seed.

Splits never share a problem: each problem is assigned to a region by a hash of its canonical
content (template and operands, not the names or objects): test (20% of the space), validation
(the next 10%), train (the rest). So the splits are disjoint for any ``n`` and ``seed``, and no
test problem is a train problem with other names. ``split="train"`` draws from the train and the
validation regions unless ``reserve_validation=True`` (then from the train region only): the
default keeps the training problems every run so far was measured on; a study that tunes on the
validation split reserves it.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Callable

SPLITS = ("train", "validation", "test")
TEST_FRACTION = 0.2  # share of the (template, operands) space that belongs to the test split
VALIDATION_FRACTION = 0.1  # the next share: the validation split (inside the old train region)
LEVELS = (1, 2, 3)

NAMES = ("Ava", "Ben", "Chloe", "Diego", "Emma", "Farah", "Gabe", "Hana", "Ivan", "Jia",
         "Kofi", "Lena", "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara")
OBJECTS = ("marbles", "stickers", "pencils", "books", "cookies", "stamps", "shells", "cards",
           "balloons", "coins", "oranges", "toy cars", "flowers", "beads", "crayons")


@dataclass(frozen=True)
class Template:
    id: str
    level: int
    text: str  # placeholders: {name}, {other}, {objs}, {a}, {b}, {c}
    draw: Callable[[random.Random], tuple[int, ...]]  # the operands
    answer: Callable[..., int]


def _pair(lo: int, hi: int) -> Callable[[random.Random], tuple[int, int]]:
    return lambda rng: (rng.randint(lo, hi), rng.randint(lo, hi))


def _ordered_pair(lo: int, hi: int) -> Callable[[random.Random], tuple[int, int]]:
    def draw(rng: random.Random) -> tuple[int, int]:
        a = rng.randint(lo + 1, hi)
        return a, rng.randint(lo, a - 1)  # a > b: the answer is positive

    return draw


def _add_then_sub(rng: random.Random) -> tuple[int, int, int]:
    a, b = rng.randint(1, 19), rng.randint(1, 19)
    return a, b, rng.randint(1, a + b - 1)


def _mul_then_add(rng: random.Random) -> tuple[int, int, int]:
    return rng.randint(2, 11), rng.randint(2, 11), rng.randint(1, 19)


def _mul_then_sub(rng: random.Random) -> tuple[int, int, int]:
    a, b = rng.randint(2, 11), rng.randint(2, 11)
    return a, b, rng.randint(1, a * b - 1)


TEMPLATES: tuple[Template, ...] = (
    # level 1: + or -, operands under 20
    Template("add-find", 1, "{name} has {a} {objs}. {name} finds {b} more. How many {objs} does {name} have now?",
             _pair(1, 19), lambda a, b: a + b),
    Template("add-total", 1, "There are {a} {objs} in a box and {b} {objs} on the table. How many {objs} are there in total?",
             _pair(1, 19), lambda a, b: a + b),
    Template("add-picked", 1, "{name} collected {a} {objs} in the morning and {b} {objs} in the afternoon. "
             "How many {objs} did {name} collect in all?", _pair(1, 19), lambda a, b: a + b),
    Template("sub-gave", 1, "{name} had {a} {objs} and gave {b} of them to {other}. How many {objs} does {name} have left?",
             _ordered_pair(1, 19), lambda a, b: a - b),
    Template("sub-basket", 1, "A basket holds {a} {objs}. {name} takes out {b} of them. How many {objs} are still in the basket?",
             _ordered_pair(1, 19), lambda a, b: a - b),
    Template("sub-need", 1, "{name} needs {a} {objs} and already has {b}. How many more {objs} does {name} need?",
             _ordered_pair(1, 19), lambda a, b: a - b),
    # level 2: x with factors under 12, or + with operands under 100
    Template("mul-bags", 2, "{name} has {a} bags with {b} {objs} in each bag. How many {objs} does {name} have?",
             _pair(2, 11), lambda a, b: a * b),
    Template("mul-rows", 2, "There are {a} rows of {objs} with {b} {objs} in each row. How many {objs} are there?",
             _pair(2, 11), lambda a, b: a * b),
    Template("mul-boxes", 2, "Each box holds {b} {objs}. How many {objs} are in {a} boxes?",
             _pair(2, 11), lambda a, b: a * b),
    Template("add-shelves", 2, "One shelf holds {a} {objs} and another holds {b} {objs}. How many {objs} are on both shelves?",
             _pair(10, 99), lambda a, b: a + b),
    Template("add-saved", 2, "{name} saved {a} {objs} last month and {b} {objs} this month. How many {objs} has {name} saved?",
             _pair(10, 99), lambda a, b: a + b),
    # level 3: two operations
    Template("add-sub", 3, "{name} has {a} {objs}, buys {b} more, and then gives {c} to {other}. "
             "How many {objs} does {name} have now?", _add_then_sub, lambda a, b, c: a + b - c),
    Template("mul-add", 3, "{name} buys {a} packs with {b} {objs} in each pack and already had {c} {objs}. "
             "How many {objs} does {name} have now?", _mul_then_add, lambda a, b, c: a * b + c),
    Template("mul-sub", 3, "{name} has {a} bags with {b} {objs} in each bag and gives away {c} {objs}. "
             "How many {objs} does {name} have left?", _mul_then_sub, lambda a, b, c: a * b - c),
)
_BY_LEVEL = {level: [t for t in TEMPLATES if t.level == level] for level in LEVELS}


def content_key(template_id: str, operands: tuple[int, ...]) -> str:
    """A problem's canonical content: its template and operands (names and objects left out)."""
    return f"{template_id}|{','.join(map(str, operands))}"


def split_of(template_id: str, operands: tuple[int, ...]) -> str:
    """The region a problem belongs to, from its canonical content only: test, validation or train.

    The test region is the same as before the validation split existed (hash bucket < 0.2)."""
    bucket = int.from_bytes(hashlib.sha256(content_key(template_id, operands).encode()).digest()[:8], "big") / 2**64
    if bucket < TEST_FRACTION:
        return "test"
    return "validation" if bucket < TEST_FRACTION + VALIDATION_FRACTION else "train"


def _regions(split: str, reserve_validation: bool) -> tuple[str, ...]:
    if split == "train" and not reserve_validation:
        return ("train", "validation")  # the training problems of every run measured before the validation split
    return (split,)


def make_problems(n: int, levels: tuple[int, ...] | list[int] = (1, 2), split: str = "train", seed: int = 0,
                  *, reserve_validation: bool = False) -> list[dict]:
    """``n`` distinct problems ``{"id", "problem", "answer", "level", "content"}`` from ``split``
    (``content``: :func:`content_key`; ``reserve_validation``: see the module doc).

    Levels take turns (1, 2, 1, 2, ...), so the first ``k`` problems of a bigger request are the
    same as a request for ``k``. Within one call no two problems share their text, and operands
    repeat only once a level's share of the split is used up. ``answer`` is a string.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    levels = tuple(levels)
    bad = [lv for lv in levels if lv not in LEVELS]
    if not levels or bad:
        raise ValueError(f"levels must be a non-empty selection of {LEVELS}, got {levels!r}")
    regions = _regions(split, reserve_validation)
    rng = random.Random(f"tepo-arithmetic:{seed}:{split}")  # str seeds are hashed stably (sha512)
    problems: list[dict] = []
    seen_text: set[str] = set()
    seen_content: set[tuple] = set()
    for i in range(n):
        level = levels[i % len(levels)]
        for attempt in range(20_000):
            template = rng.choice(_BY_LEVEL[level])
            operands = template.draw(rng)
            if split_of(template.id, operands) not in regions:
                continue
            if (template.id, operands) in seen_content and attempt < 500:
                continue  # prefer fresh arithmetic while there is some left
            name, other = rng.sample(NAMES, 2)
            names = dict(zip("abc", operands))
            text = template.text.format(name=name, other=other, objs=rng.choice(OBJECTS), **names)
            if text in seen_text:
                continue
            break
        else:
            raise ValueError(f"could not make {n} distinct level-{level} problems for the {split} split; ask for fewer")
        seen_text.add(text)
        seen_content.add((template.id, operands))
        problems.append({
            "id": f"arith-{split}-s{seed}-{i:05d}",
            "problem": text,
            "answer": str(template.answer(*operands)),
            "level": level,
            "content": content_key(template.id, operands),
        })
    return problems
