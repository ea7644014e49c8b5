"""The evaluation runner: problems -> samples -> verdicts -> avg@n, pass@k, maj@k, greedy accuracy.

Every sample is written to ``samples.jsonl`` with its verdict before any estimate is made, and
the estimates are computed from those rows only, so they can always be recomputed from the file.
The file is append-only: a rerun into the same output directory reads it back, skips what is
already scored and generates only the rest (a torn last line from a crash is dropped).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from tepo.evaluation.estimators import avg_at_n, bootstrap_ci, maj_at_k, pass_at_k
from tepo.evaluation.generation import GenerationBackend, HFBackend, cpu_has_native_bf16, derive_seed, load_backend
from tepo.rewards import canonical_answer, judge, prepare_golds
from tepo.tasks.prompts import build_messages

GREEDY = "greedy"  # the `sample` field of a greedy row; sampled rows carry 0..n-1
# What decides which samples a run draws; a rerun into the same directory must agree on all of them.
SAMPLE_DEFINING_KEYS = ("model", "n", "temperature", "top_p", "max_new_tokens", "seed", "prompt")


class ConfigMismatchError(ValueError):
    """A rerun into an output directory whose samples were drawn with other settings."""


# --------------------------------------------------------------------------------------------
# verdicts


def score_completion(completion: str, gold: str) -> dict[str, Any]:
    """The extracted answer, its canonical form (what maj@k votes on) and the verdict."""
    answer, correct = judge(completion, gold)  # several final boxes count together for a gold with several parts
    return {"answer": answer, "canonical": canonical_answer(completion) if answer is not None else None, "correct": correct}


def prompt_fingerprint(messages_fn: Callable[[str], list] = build_messages) -> str:
    """A short hash of the prompt format (the messages built for a placeholder problem)."""
    return f"{derive_seed(json.dumps(messages_fn('<PROBLEM>'), sort_keys=True)):016x}"


# --------------------------------------------------------------------------------------------
# samples.jsonl


def read_samples(path: str | os.PathLike, *, repair: bool = False) -> list[dict]:
    """All rows of a samples file. A last line that is not valid JSON (a crash mid-write) is
    skipped, and cut off the file when ``repair`` is true; a bad line elsewhere is an error."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    rows, offset = [], 0
    lines = data.split(b"\n")
    for number, line in enumerate(lines, start=1):
        is_last = number == len(lines) or (number == len(lines) - 1 and lines[-1] == b"")
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                if not is_last:
                    raise ValueError(f"{path}, line {number}: not a JSON object ({err}); fix or remove that line") from None
                if repair:
                    with open(path, "r+b") as f:
                        f.truncate(offset)
                break
        offset += len(line) + 1
    else:
        if repair and data and not data.endswith(b"\n"):  # a whole last row whose newline was lost
            with open(path, "ab") as f:
                f.write(b"\n")
    return rows


def _append_rows(path: Path, rows: Iterable[dict]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------------------------
# estimates


def metrics_from_rows(rows: Sequence[dict], problem_ids: Sequence[str], *, n: int, ks: Sequence[int], greedy: bool, ci_seed: int = 0) -> dict[str, Any]:
    """avg@n, pass@k, maj@k (k in ks), greedy accuracy and their 95% bootstrap CIs over problems,
    from scored rows alone. Every problem must have samples 0..n-1 (and a greedy row when asked)."""
    if not problem_ids:
        raise ValueError("no problems to summarise")
    by_problem: dict[str, dict[Any, dict]] = {pid: {} for pid in problem_ids}
    for r in rows:
        if r["id"] in by_problem:
            by_problem[r["id"]].setdefault(r["sample"], r)
    names = ([f"avg@{n}"] + [f"pass@{k}" for k in ks] + [f"maj@{k}" for k in ks] if n else []) + ([GREEDY] if greedy else [])
    per_problem: dict[str, list[float]] = {name: [] for name in names}  # in the order they are reported
    counts: list[int] = []
    sampled: list[dict] = []
    greedy_rows: list[dict] = []
    for pid, got in by_problem.items():
        missing = [j for j in range(n) if j not in got] + ([GREEDY] if greedy and GREEDY not in got else [])
        if missing:
            raise ValueError(f"problem {pid!r} has no scored row for sample(s) {missing}")
        if n:
            samples = [got[j] for j in range(n)]
            correct = [bool(s["correct"]) for s in samples]
            counts.append(sum(correct))
            sampled += samples
            per_problem[f"avg@{n}"].append(counts[-1] / n)
            for k in ks:
                per_problem[f"pass@{k}"].append(pass_at_k(n, counts[-1], k))
                per_problem[f"maj@{k}"].append(maj_at_k([s["canonical"] for s in samples], correct, k))
        if greedy:
            greedy_rows.append(got[GREEDY])
            per_problem[GREEDY].append(float(bool(got[GREEDY]["correct"])))

    out: dict[str, Any] = {"n": n, "num_problems": len(by_problem)}
    for name, values in per_problem.items():
        out[name] = avg_at_n(counts, n) if name == f"avg@{n}" else sum(values) / len(values)
    if n:
        out["pass_curve"] = {k: sum(pass_at_k(n, c, k) for c in counts) / len(counts) for k in range(1, n + 1)}
    out["ci"] = {name: list(bootstrap_ci(values, seed=ci_seed)) for name, values in per_problem.items()}
    out.update(_length_stats(sampled, ""))
    if greedy:
        out.update(_length_stats(greedy_rows, "greedy_"))
    return out


def _length_stats(rows: list[dict], prefix: str) -> dict[str, float]:
    if not rows:
        return {}
    return {
        f"{prefix}mean_completion_tokens": sum(r["num_tokens"] for r in rows) / len(rows),
        f"{prefix}truncation_rate": sum(bool(r["truncated"]) for r in rows) / len(rows),
        f"{prefix}no_answer_rate": sum(r["answer"] is None for r in rows) / len(rows),
    }


# --------------------------------------------------------------------------------------------
# one benchmark


def _check_ks(n: int, ks: Sequence[int], greedy: bool) -> list[int]:
    ks = sorted(set(int(k) for k in ks))
    if n < 0 or (n == 0 and not greedy):
        raise ValueError(f"n must be >= 1 (or 0 with greedy, for greedy accuracy only), got {n}")
    bad = [k for k in ks if not 1 <= k <= n]
    if bad:
        raise ValueError(f"every k must satisfy 1 <= k <= n={n}; got k={bad}")
    return ks


def evaluate_problems(
    backend: GenerationBackend,
    problems: Sequence[dict],
    *,
    benchmark: str,
    n: int = 4,
    ks: Sequence[int] = (1,),
    temperature: float = 0.6,
    top_p: float = 1.0,
    greedy: bool = False,
    max_new_tokens: int = 256,
    seed: int = 0,
    samples_path: str | os.PathLike | None = None,
    messages_fn: Callable[[str], list] = build_messages,
    progress: bool = False,
) -> dict[str, Any]:
    """Sample, score and summarise one benchmark's problems (dicts with id, problem, answer).

    With ``samples_path``, rows already there for this benchmark are reused and new rows are
    appended as each batch is scored. Timings cover only the work done in this call.
    """
    ks = _check_ks(n, ks, greedy)
    if n and temperature <= 0:
        raise ValueError("sampling needs temperature > 0; for greedy decoding use greedy=True (and n=0 for greedy only)")
    ids = [str(p["id"]) for p in problems]
    if not ids:
        raise ValueError(f"{benchmark}: no problems to evaluate")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{benchmark}: problem ids are not unique")
    path = Path(samples_path) if samples_path is not None else None
    rows = [r for r in (read_samples(path, repair=True) if path else []) if r.get("benchmark") == benchmark]
    done = {(r["id"], r["sample"]) for r in rows}

    # (problem, sample indices still to draw); a problem is handed over whole, so its seed decides its samples
    todo = [(p, [j for j in range(n) if (str(p["id"]), j) not in done]) for p in problems]
    todo = [(p, js) for p, js in todo if js]
    greedy_todo = [p for p in problems if greedy and (str(p["id"]), GREEDY) not in done]
    timing = {"generate_s": 0.0, "verify_s": 0.0}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(js) for _, js in todo) + len(greedy_todo), desc=benchmark, unit="sample", dynamic_ncols=True)

    def run(chunk: list[tuple[dict, list[int]]], sample_n: int, temp: float) -> None:
        t0 = time.perf_counter()
        outs = backend.generate(
            [messages_fn(p["problem"]) for p, _ in chunk], n=sample_n, temperature=temp, top_p=top_p,
            max_new_tokens=max_new_tokens, seed=[derive_seed(seed, benchmark, p["id"]) for p, _ in chunk],
        )
        t1 = time.perf_counter()
        new = []
        for (p, js), samples in zip(chunk, outs):
            for j in js:
                s = samples[0 if j == GREEDY else j]
                new.append({
                    "benchmark": benchmark, "id": str(p["id"]), "sample": j, "completion": s.text,
                    **score_completion(s.text, str(p["answer"])), "gold": str(p["answer"]),
                    "num_tokens": s.num_tokens, "truncated": s.truncated,
                })
        t2 = time.perf_counter()
        timing["generate_s"] += t1 - t0
        timing["verify_s"] += t2 - t1
        rows.extend(new)
        if path is not None:
            _append_rows(path, new)
        if bar is not None:
            bar.update(len(new))

    try:
        per_call = max(1, backend.batch_size // max(n, 1))  # problems per call: about one batch of rows
        for start in range(0, len(todo), per_call):
            run(todo[start : start + per_call], n, temperature)
        for start in range(0, len(greedy_todo), backend.batch_size):
            run([(p, [GREEDY]) for p in greedy_todo[start : start + backend.batch_size]], 1, 0.0)
    finally:
        if bar is not None:
            bar.close()

    result = metrics_from_rows(rows, ids, n=n, ks=ks, greedy=greedy)
    spent = timing["generate_s"] + timing["verify_s"]
    result.update(
        new_samples=sum(len(js) for _, js in todo) + len(greedy_todo),
        reused_samples=len(done & {(i, j) for i in ids for j in [*range(n), *([GREEDY] if greedy else [])]}),
        generate_s=timing["generate_s"], verify_s=timing["verify_s"],
        verify_share=timing["verify_s"] / spent if spent > 0 else None,  # None: nothing new was generated
    )
    return result


# --------------------------------------------------------------------------------------------
# many benchmarks, one output directory


def _check_config(output_dir: Path, config: dict) -> None:
    path = output_dir / "config.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), config.get(k)) for k in SAMPLE_DEFINING_KEYS if old.get(k) != config.get(k)}
        if diff:
            lines = ", ".join(f"{k}: was {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ConfigMismatchError(
                f"{output_dir} holds samples drawn with other settings ({lines}); "
                "rerun with the same settings to resume, or choose another --output_dir"
            )
    output_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2) + "\n")


def macro_average(per_benchmark: dict[str, dict]) -> dict[str, float]:
    """The unweighted mean over benchmarks of each estimate that every benchmark has."""
    if not per_benchmark:
        return {}
    names = [k for k, v in next(iter(per_benchmark.values())).items() if _is_estimate(k) and isinstance(v, float)]
    names = [k for k in names if all(k in r for r in per_benchmark.values())]
    return {k: sum(r[k] for r in per_benchmark.values()) / len(per_benchmark) for k in names}


def _is_estimate(name: str) -> bool:
    return name == GREEDY or ("@" in name and name.split("@")[0] in ("avg", "pass", "maj"))


def results_markdown(results: dict) -> str:
    """The results as a Markdown table: estimates in percent, with their 95% CIs."""
    benches = results["benchmarks"]
    if not benches:
        return "(no benchmarks)\n"
    names = [k for k in next(iter(benches.values())) if _is_estimate(k)]
    head = ["benchmark", "problems", *names, "mean tokens", "truncated"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for name, r in benches.items():
        cells = [name, str(r["num_problems"])]
        for k in names:
            lo, hi = r["ci"].get(k, [float("nan")] * 2)
            cells.append(f"{100 * r[k]:.1f} ({100 * lo:.1f}-{100 * hi:.1f})" if k in r else "")
        tokens = r.get("mean_completion_tokens", r.get("greedy_mean_completion_tokens", float("nan")))
        trunc = r.get("truncation_rate", r.get("greedy_truncation_rate", float("nan")))
        cells += [f"{tokens:.0f}", f"{100 * trunc:.1f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    if len(benches) > 1:
        macro = results.get("macro", {})
        lines.append("| " + " | ".join(["macro", ""] + [f"{100 * macro[k]:.1f}" if k in macro else "" for k in names] + ["", ""]) + " |")
    cfg = results.get("config", {})
    note = (
        f"\n{cfg.get('model', '?')}: n={cfg.get('n')}, temperature {cfg.get('temperature')}, top-p {cfg.get('top_p')}, "
        f"max {cfg.get('max_new_tokens')} new tokens, seed {cfg.get('seed')}. In percent; 95% bootstrap CI over problems in parentheses.\n"
    )
    return "\n".join(lines) + "\n" + note


def evaluate(
    model: str | os.PathLike | GenerationBackend | None = None,
    *,
    benchmarks: Sequence[str],
    n: int = 4,
    ks: Sequence[int] = (1,),
    temperature: float = 0.6,
    top_p: float = 1.0,
    greedy: bool = False,
    limit: int | None = None,
    data_dir: str | os.PathLike | None = None,
    max_new_tokens: int = 256,
    output_dir: str | os.PathLike,
    backend: str = "auto",
    batch_size: int | None = None,
    dtype: str = "auto",
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate a model (path, hub id, ``None`` for the offline default, or a ready backend) on
    benchmarks; write ``results.json``, ``results.md`` and ``samples.jsonl`` under ``output_dir``.

    The benchmark files are read and the output directory checked before the model is loaded.
    """
    from tepo.models import resolve_model
    from tepo.tasks.benchmarks import load_benchmark

    ks = _check_ks(n, ks, greedy)
    problems = {name: load_benchmark(name, data_dir=data_dir, limit=limit) for name in benchmarks}
    for name, probs in problems.items():  # gold answers parsed once, now: a bad one is reported before the model loads
        prepare_golds(probs, source=f"benchmark {name}")
    is_backend = isinstance(model, GenerationBackend)
    model_id = model.name if is_backend else resolve_model(model)
    config = {
        "model": model_id, "n": n, "ks": ks, "temperature": temperature, "top_p": top_p, "greedy": greedy,
        "max_new_tokens": max_new_tokens, "seed": seed, "prompt": prompt_fingerprint(), "benchmarks": list(benchmarks),
        "limit": limit, "data_dir": None if data_dir is None else str(data_dir),
    }
    output_dir = Path(output_dir)
    _check_config(output_dir, config)
    gen = model if is_backend else load_backend(model_id, backend=backend, dtype=dtype, batch_size=batch_size)
    config["backend"] = gen.name

    results: dict[str, Any] = {"benchmarks": {}, "macro": {}, "config": config}
    for name, probs in problems.items():
        results["benchmarks"][name] = evaluate_problems(
            gen, probs, benchmark=name, n=n, ks=ks, temperature=temperature, top_p=top_p, greedy=greedy,
            max_new_tokens=max_new_tokens, seed=seed, samples_path=output_dir / "samples.jsonl", progress=progress,
        )
        results["macro"] = macro_average(results["benchmarks"])
        (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (output_dir / "results.md").write_text(results_markdown(results))
    return results


# --------------------------------------------------------------------------------------------
# held-out accuracy for the trainer and the comparison


def greedy_accuracy(
    backend_or_model_and_tokenizer: GenerationBackend | tuple,
    problems: Sequence[dict],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    messages_fn: Callable[[str], list] = build_messages,
    autocast: str = "auto",
    shared_prefix: bool = True,
) -> dict[str, Any]:
    """Greedy accuracy on problems (dicts with id, problem, answer).

    Accepts a backend or an in-memory ``(model, tokenizer)`` pair (wrapped without copying).
    ``autocast`` for a pair: ``"auto"`` runs an fp32 model on a CPU with native bf16 under bf16
    autocast (about twice as fast there; without native bf16 it would be slower, so fp32);
    ``"bf16"`` runs under bf16 autocast on the model's device (how ``bf16: true`` trains);
    ``"none"`` keeps the model's own precision. ``shared_prefix``: `HFBackend`'s shared-prefix
    decoding for a pair (False: plain `generate`). Returns accuracy, correct, num_problems,
    per-problem ``ids``/``verdicts``/``answers`` (for paired comparisons), no_answer, truncated,
    mean_completion_tokens and seconds spent.
    """
    import torch

    if not problems:
        raise ValueError("greedy_accuracy: no problems given")
    if isinstance(backend_or_model_and_tokenizer, tuple):
        model, tokenizer = backend_or_model_and_tokenizer
        dtype = None
        if autocast == "auto":
            param = next(model.parameters())
            native = param.device.type == "cpu" and param.dtype == torch.float32 and cpu_has_native_bf16()
            dtype = torch.bfloat16 if native else None
        elif autocast == "bf16":
            dtype = torch.bfloat16
        elif autocast != "none":
            raise ValueError(f"autocast must be 'auto', 'bf16' or 'none', got {autocast!r}")
        backend = HFBackend.from_model(model, tokenizer, batch_size=batch_size, autocast_dtype=dtype,
                                       shared_prefix=shared_prefix)
    else:
        backend = backend_or_model_and_tokenizer
    t0 = time.perf_counter()
    samples = []
    for start in range(0, len(problems), backend.batch_size):
        chunk = problems[start : start + backend.batch_size]
        samples += [s[0] for s in backend.generate([messages_fn(p["problem"]) for p in chunk], n=1, temperature=0.0, max_new_tokens=max_new_tokens)]
    t1 = time.perf_counter()
    scored = [score_completion(s.text, str(p["answer"])) for s, p in zip(samples, problems)]
    t2 = time.perf_counter()
    correct = sum(v["correct"] for v in scored)
    num = len(problems)
    return {
        "accuracy": correct / num,
        "correct": correct,
        "num_problems": num,
        "ids": [str(p["id"]) for p in problems],
        "verdicts": [v["correct"] for v in scored],
        "answers": [v["answer"] for v in scored],
        "no_answer": sum(v["answer"] is None for v in scored),
        "truncated": sum(s.truncated for s in samples),
        "mean_completion_tokens": sum(s.num_tokens for s in samples) / num,
        "generate_s": t1 - t0,
        "verify_s": t2 - t1,
    }
