"""The math benchmarks: where each lives on the Hugging Face hub and offline.

Offline (the default when a data folder is known): ``<data_dir>/<name>/test.jsonl`` with ``id``,
``problem``, ``answer`` (see the data folder's README). ``data_dir`` comes from the argument, else
the environment variable ``TEPO_DATA_DIR``. Without either, the hub copy is loaded with
``datasets.load_dataset`` and its fields are mapped to ``id``/``problem``/``answer``.

Hub sources (repo, config, split, problem field, answer field), as open evaluation code on GitHub
loads them (lighteval, rLLM and others; not checked against the live hub from here, which is offline):

- gsm8k: ``openai/gsm8k``, config ``main``, split ``test``, ``question``, ``answer`` (the text after
  ``####``, thousands commas removed)
- math500: ``HuggingFaceH4/MATH-500``, ``test``, ``problem``, ``answer`` (id: ``unique_id``)
- aime24: ``HuggingFaceH4/aime_2024``, ``train``, ``problem``, ``answer``
- aime25: ``math-ai/aime25``, ``test``, ``problem``, ``answer``
- amc23: ``math-ai/amc23``, ``test``, ``question``, ``answer`` (floats such as ``27.0`` -> ``27``)
- minerva_math: ``math-ai/minervamath``, ``test``, ``question``, ``answer``
- olympiadbench: ``Hothan/OlympiadBench``, config ``OE_TO_maths_en_COMP``, split ``train``,
  ``question``, ``final_answer`` (a list, joined with ``", "``)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tepo.tasks.data import DataError, check_row, load_jsonl

DATA_DIR_ENV = "TEPO_DATA_DIR"


def _gsm8k_answer(value: Any) -> str:
    """GSM8K's answer field is the worked solution; the answer is the text after ``####``."""
    text = str(value)
    if "####" not in text:
        raise DataError(f"GSM8K answer without '####': {text[-80:]!r}")
    return text.rsplit("####", 1)[1].strip().replace(",", "")


def _float_to_int_text(value: Any) -> str:
    """``27.0`` -> ``"27"``; anything else as text."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    return re.sub(r"^(-?\d+)\.0+$", r"\1", text)


def _join_list(value: Any) -> str:
    """OlympiadBench's ``final_answer`` is a list of strings (one element per row in practice)."""
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v).strip() for v in value)
    return str(value)


@dataclass(frozen=True)
class HubSource:
    repo: str
    split: str
    problem_field: str
    answer_field: str
    config: str | None = None
    answer_fn: Callable[[Any], str] = str
    id_field: str | None = None


@dataclass(frozen=True)
class Benchmark:
    name: str
    hub: HubSource
    description: str


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("gsm8k", HubSource("openai/gsm8k", "test", "question", "answer", config="main", answer_fn=_gsm8k_answer),
                  "GSM8K grade-school word problems (1319 test)"),
        Benchmark("math500", HubSource("HuggingFaceH4/MATH-500", "test", "problem", "answer", id_field="unique_id"),
                  "MATH-500, the PRM800K subset of the MATH test set (500)"),
        Benchmark("aime24", HubSource("HuggingFaceH4/aime_2024", "train", "problem", "answer", answer_fn=_float_to_int_text, id_field="id"),
                  "AIME 2024 I and II (30)"),
        Benchmark("aime25", HubSource("math-ai/aime25", "test", "problem", "answer", answer_fn=_float_to_int_text, id_field="id"),
                  "AIME 2025 I and II (30)"),
        Benchmark("amc23", HubSource("math-ai/amc23", "test", "question", "answer", answer_fn=_float_to_int_text, id_field="id"),
                  "AMC 2023, 12A and 12B (40)"),
        Benchmark("minerva_math", HubSource("math-ai/minervamath", "test", "question", "answer"),
                  "Minerva MIT OCW STEM problems (272)"),
        Benchmark("olympiadbench", HubSource("Hothan/OlympiadBench", "train", "question", "final_answer",
                                             config="OE_TO_maths_en_COMP", answer_fn=_join_list, id_field="id"),
                  "OlympiadBench open-ended text-only English competition maths (675)"),
    )
}


def list_benchmarks() -> list[str]:
    """The known benchmark names."""
    return list(BENCHMARKS)


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def data_dir_from_env(data_dir: str | os.PathLike | None = None) -> Path | None:
    """``data_dir`` if given, else ``$TEPO_DATA_DIR`` if set, else None (meaning: the hub)."""
    if data_dir is not None:
        return Path(data_dir)
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env) if env else None


def benchmark_path(name: str, data_dir: str | os.PathLike | None = None, split: str = "test") -> Path | None:
    """The offline file ``<data_dir>/<name>/<split>.jsonl``; None when no data folder is known
    (neither ``data_dir`` nor ``$TEPO_DATA_DIR``), i.e. the hub would be used."""
    get_benchmark(name)
    root = data_dir_from_env(data_dir)
    return None if root is None else root / name / f"{split}.jsonl"


def load_benchmark(
    name: str, *, data_dir: str | os.PathLike | None = None, limit: int | None = None, hub: bool = False
) -> list[dict]:
    """The problems of benchmark ``name`` as ``{"id", "problem", "answer"}`` dicts (offline rows keep
    their other fields), the first ``limit`` only if given.

    From ``<data_dir>/<name>/test.jsonl`` when a data folder is known (argument or
    ``$TEPO_DATA_DIR``) and ``hub`` is false, else from the hub via ``datasets.load_dataset``."""
    bench = get_benchmark(name)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    path = None if hub else benchmark_path(name, data_dir)
    if path is not None:
        if not path.is_file():
            raise DataError(f"benchmark {name!r}: {path} not found (expected <data_dir>/{name}/test.jsonl)")
        rows = list(load_jsonl(path))
    else:
        rows = _load_from_hub(bench, limit)
    return rows[:limit] if limit is not None else rows


def _load_from_hub(bench: Benchmark, limit: int | None) -> list[dict]:
    src = bench.hub
    try:
        from datasets import load_dataset

        ds = load_dataset(src.repo, src.config, split=src.split)
    except Exception as err:  # noqa: BLE001 - offline, no such repo, gated...: one clear message
        where = f"{src.repo}" + (f" (config {src.config})" if src.config else "") + f", split {src.split}"
        raise DataError(
            f"benchmark {bench.name!r}: could not load {where} from the Hugging Face hub "
            f"({type(err).__name__}: {str(err)[:200]}). Offline, pass --data_dir (or set {DATA_DIR_ENV}) "
            f"to a folder holding {bench.name}/test.jsonl"
        ) from err
    rows = []
    for i, record in enumerate(ds):
        if limit is not None and i >= limit:
            break
        where = f"{src.repo} {src.split} row {i}"
        try:
            default_id = f"{bench.name}-{i:04d}"
            rid = record.get(src.id_field) if src.id_field else None
            row = {
                "id": default_id if rid is None else f"{bench.name}-{rid}" if src.id_field == "id" else str(rid),
                "problem": record[src.problem_field],
                "answer": src.answer_fn(record[src.answer_field]),
            }
            rows.append(check_row(row, default_id))
        except (KeyError, DataError) as err:
            raise DataError(f"benchmark {bench.name!r}, {where}: {err}") from err
    if len({r["id"] for r in rows}) != len(rows):  # the hub's ids are not unique: number the rows
        for i, row in enumerate(rows):
            row["id"] = f"{bench.name}-{i:04d}"
    return rows
