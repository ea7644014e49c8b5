"""Data sources for training and evaluation: problems as ``{"id", "problem", "answer"}`` dicts.

- ``load_task(task="arithmetic", ...)``: the built-in generator (:mod:`tepo.tasks.arithmetic`).
- ``load_task(data="path/to/file.jsonl")``: a local JSONL file (:mod:`tepo.tasks.data`).
- ``load_task(data="gsm8k")`` or ``data="hub:gsm8k"``: a registered benchmark
  (:mod:`tepo.tasks.benchmarks`; ``hub:`` forces the Hugging Face hub, a bare name uses the
  offline data folder when one is known).

Nothing here loads a model, so callers read and check their data first.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from tepo.tasks.arithmetic import make_problems
from tepo.tasks.benchmarks import BENCHMARKS, list_benchmarks, load_benchmark
from tepo.tasks.data import DataError, Rows, load_jsonl
from tepo.tasks.prompts import build_messages
from tepo.tasks.splits import check_disjoint

__all__ = [
    "DataError", "build_messages", "check_disjoint", "list_benchmarks", "load_benchmark", "load_jsonl", "load_task",
    "make_problems", "to_prompt_dataset",
]

TASKS = ("arithmetic",)


def load_task(
    *,
    task: str | None = None,
    data: str | os.PathLike | None = None,
    split: str = "train",
    num_problems: int | None = None,
    levels: Iterable[int] = (1, 2),
    seed: int = 0,
    on_error: str = "raise",
    data_dir: str | os.PathLike | None = None,
    reserve_validation: bool = False,
) -> list[dict]:
    """Problems from exactly one source: ``task="arithmetic"`` or ``data=`` (a JSONL path, a
    benchmark name, or ``"hub:<benchmark>"``).

    ``num_problems``: how many arithmetic problems to make (default 1000), or the first N rows of a
    file or benchmark (default all). ``split``, ``levels`` and ``seed`` apply to the arithmetic
    generator (benchmarks have a test split only; the generator has train, validation and test, and
    ``reserve_validation`` keeps its train split off the validation problems). ``on_error`` applies to JSONL files
    (``"raise"`` or ``"skip"``). ``data_dir`` (or ``$TEPO_DATA_DIR``) holds the offline benchmarks.
    """
    if (task is None) == (data is None):
        raise ValueError("give exactly one of task= (e.g. 'arithmetic') or data= (a JSONL path, a benchmark name, or 'hub:<name>')")
    if num_problems is not None and (isinstance(num_problems, bool) or not isinstance(num_problems, int) or num_problems < 1):
        raise ValueError(f"num_problems must be a positive integer, got {num_problems!r}")
    if task is not None:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)} (or pass data=)")
        return make_problems(1000 if num_problems is None else num_problems, levels=tuple(levels), split=split, seed=seed,
                             reserve_validation=reserve_validation)
    source = os.fspath(data)
    if source.startswith("hub:"):
        name = source[len("hub:"):]
        if name not in BENCHMARKS:
            raise ValueError(f"unknown benchmark {name!r} in {source!r}; known: {', '.join(BENCHMARKS)}")
        rows = load_benchmark(name, limit=num_problems, hub=True)
    elif source in BENCHMARKS and not Path(source).is_file():
        rows = load_benchmark(source, data_dir=data_dir, limit=num_problems)
    else:
        path = Path(source)
        if not path.is_file():
            raise DataError(
                f"data {source!r}: no such file, and not a benchmark name (known: {', '.join(BENCHMARKS)}; "
                "prefix with 'hub:' to force the Hugging Face hub)"
            )
        rows = load_jsonl(path, on_error=on_error)
        if num_problems is not None:
            rows = Rows(rows[:num_problems], rows.errors)
    return rows


def to_prompt_dataset(problems: list[dict]):
    """A ``datasets.Dataset`` with the columns TRL's ``GRPOTrainer`` consumes: ``prompt`` (the chat
    messages of :func:`build_messages`), ``answer`` (passed to reward functions as a keyword
    argument) and ``id``."""
    from datasets import Dataset

    if not problems:
        raise DataError("no problems to build a prompt data set from")
    return Dataset.from_dict({
        "prompt": [build_messages(p["problem"]) for p in problems],
        "answer": [str(p["answer"]) for p in problems],
        "id": [str(p["id"]) for p in problems],
    })
