"""Evaluation throughput: problems/s, generated tokens/s, and the share of time spent verifying.

Runs `tepo.evaluation.runner.evaluate_problems` on the first GSM8K test problems with the offline
SmolLM2 model and writes the `eval_throughput` section of docs/benchmarks.md. Target: verifying
takes at most 5% of evaluation time. Heavy: run it under the CPU lock on the 2-core box:

    flock /tmp/tepo-cpu.lock .venv/bin/python bench/eval_throughput.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from _report import machine, write_section  # noqa: E402


def busy_cpu_s() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, CPU seconds this process has used), from /proc/stat
    and os.times. Their difference over a run is what the rest of the machine took meanwhile."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    mine = os.times()
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), mine.user + mine.system


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: the offline SmolLM2-135M-Instruct")
    p.add_argument("--benchmark", default="gsm8k")
    p.add_argument("--data_dir", default=os.environ.get("TEPO_DATA_DIR", str(REPO.parent / "shared" / "data")),
                   help="folder holding <benchmark>/test.jsonl (default: $TEPO_DATA_DIR, else ../shared/data)")
    p.add_argument("--limit", type=int, default=16)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--batch_sizes", default="16,32", help="comma-separated HF batch sizes to time")
    p.add_argument("--dtypes", default="auto", help="comma-separated dtypes (auto = bf16 autocast on CPU, bf16 on GPU)")
    p.add_argument("--backend", default="hf")
    p.add_argument("--no_write", action="store_true", help="print the section instead of writing docs/benchmarks.md")
    args = p.parse_args(argv)

    from tepo.evaluation.generation import load_backend
    from tepo.evaluation.runner import evaluate_problems
    from tepo.models import resolve_model
    from tepo.tasks.benchmarks import load_benchmark

    model = resolve_model(args.model)
    problems = load_benchmark(args.benchmark, data_dir=args.data_dir, limit=args.limit)
    from tepo.rewards import verify_answer

    verify_answer("1", "1")  # import the verifier before timing
    rows = []
    configs = [(d, int(b)) for d in args.dtypes.split(",") for b in args.batch_sizes.split(",")]
    for index, (dtype, batch_size) in enumerate(configs):
        backend = load_backend(model, backend=args.backend, dtype=dtype, batch_size=batch_size)
        backend.generate([[{"role": "user", "content": "Hi"}]], n=1, temperature=0.0, max_new_tokens=4)  # warm-up
        (busy0, mine0), t0 = busy_cpu_s(), time.perf_counter()
        # a seed per configuration: the verifier caches verdicts, so repeating the same samples would time nothing
        r = evaluate_problems(
            backend, problems, benchmark=args.benchmark, n=args.n, ks=[1, args.n], temperature=args.temperature,
            max_new_tokens=args.max_new_tokens, seed=index,
        )
        (busy1, mine1), wall = busy_cpu_s(), time.perf_counter() - t0
        others = max(0.0, (busy1 - busy0) - (mine1 - mine0))  # the verifier's worker process counts here too (small)
        tokens = r["mean_completion_tokens"] * r["num_problems"] * args.n
        rows.append((dtype, batch_size, wall, r, tokens, others))
        print(f"dtype {dtype} batch {batch_size}: {wall:.1f} s, {tokens / r['generate_s']:.0f} tok/s, "
              f"verify {100 * r['verify_s'] / wall:.2f}%, other processes {others:.1f} CPU s", flush=True)

    lines = [
        "## Evaluation throughput",
        "",
        f"Machine: {machine()}. Model: `{Path(model).name}`, {args.benchmark} first {args.limit} problems, "
        f"n={args.n} samples each at temperature {args.temperature}, at most {args.max_new_tokens} new tokens, "
        f"backend {args.backend}. Command: `python bench/eval_throughput.py {' '.join(argv if argv is not None else sys.argv[1:])}`.",
        "",
        "| dtype | batch | wall s | problems/s | samples/s | generated tok/s | mean tokens | truncated | verify s | verify share | avg@n | other processes, CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for dtype, batch_size, wall, r, tokens, others in rows:
        lines.append(
            f"| {dtype} | {batch_size} | {wall:.1f} | {r['num_problems'] / wall:.3f} | {r['num_problems'] * args.n / wall:.2f} | "
            f"{tokens / r['generate_s']:.0f} | {r['mean_completion_tokens']:.0f} | {100 * r['truncation_rate']:.0f}% | "
            f"{r['verify_s']:.2f} | {100 * r['verify_s'] / wall:.2f}% | {r[f'avg@{args.n}']:.3f} | {others:.1f} |"
        )
    worst = max(r["verify_s"] / wall for _, _, wall, r, _, _ in rows)
    lines += [
        "",
        f"Verification share of wall time, worst row: {100 * worst:.2f}% (target: at most 5%) -> "
        f"{'met' if worst <= 0.05 else 'NOT met'}. Generated tok/s counts every generated token "
        "(end-of-sequence included) over generation time only; a batch runs until its longest row ends, so rows that "
        "finish early idle (HF `generate` has no continuous batching). Each row uses its own sampling seed. "
        "\"Other processes\" is the CPU time the rest of the machine used meanwhile: well above zero means the row is slowed by a neighbour.",
    ]
    section = "\n".join(lines)
    if args.no_write:
        print(section)
    else:
        write_section("eval_throughput", section)
        print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
