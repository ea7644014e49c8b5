"""The README's main job with `shared_prefix` on (the default) and off, from the committed runs.

The runs are made by `bench/main_job_shared_prefix.sh` (one at a time under the CPU lock, `/usr/bin/time
-v`), and their small files committed under `results/main-job/<shared|plain>-s<seed>/`. This writes the
`main_job_shared_prefix` section of docs/benchmarks.md: one row per run (wall time, peak memory, mean
time of a generating step and of the others, held-out accuracy before and after), and the difference
in held-out accuracy after training, shared minus plain: per seed, its t-interval over the seeds
(seed-matched, the primary interval; df = seeds - 1) and the paired bootstrap over problems and seeds
that the vLLM comparison used. Nothing is trained here.

    .venv/bin/python bench/main_job_shared_prefix.py
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import write_section  # noqa: E402
from main_job_backends import RESULTS, read_runs, run_rows  # noqa: E402

from tepo.analysis.stats import paired_bootstrap, seed_matched_t  # noqa: E402

VARIANTS = {"shared": "shared_prefix: true (default)", "plain": "shared_prefix: false (the plain path)"}
RUN_DIR = re.compile(r"^(shared|plain)-s(\d+)$")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--no_write", action="store_true", help="print the section; leave docs/benchmarks.md as it is")
    args = parser.parse_args(argv)
    runs = read_runs(args.results, RUN_DIR, VARIANTS)
    if not all(runs.values()):
        raise SystemExit(f"main_job_shared_prefix: need runs of both variants under {args.results}")
    lines = [
        "## The main job with shared_prefix on and off (CPU, 2026-12-07)",
        "",
        "Machine: 2-core CPU, x86_64 with AVX-512 and AMX (torch 2.13.0+cpu, transformers 5.19, TRL 1.16). The README's",
        "main job (`recipes/quickstart.yaml`: TEPO, fp32, 32 optimiser steps, greedy held-out evaluation of 150",
        "problems before and after) run as a user runs it, one at a time under the CPU lock; `/usr/bin/time -v`",
        "for wall time and peak memory. The held-out evaluation follows the trainer's setting (shared-prefix",
        "decoding with it on, plain `generate` with it off), computed in every run (no `cached_from`). Small files:",
        "`results/main-job/`; written by `bench/main_job_shared_prefix.py` (runs: `bench/main_job_shared_prefix.sh`).",
        "The plain runs were made in the morning session (committed in 3b4fbb5; issue 28's verifier work was",
        "then uncommitted in the working tree, and arithmetic answers are plain integers); `shared_prefix: false` runs",
        "TRL's own path, which nothing since has changed. The shared runs were remade after the cascade decoding",
        "and the CPU LM head (later the same day, same machine, each with an empty baseline-eval cache).",
        "",
        "| variant | seed | wall time | generating step (s, mean) | other step (s, mean) | peak RSS | held-out greedy accuracy | token entropy (first 5 -> last 5 steps) |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    lines += run_rows(runs, VARIANTS, digits=1)
    verdicts = {v: {s: r["verdicts"] for s, r in by_seed.items()} for v, by_seed in runs.items()}
    t = seed_matched_t(verdicts)[("shared", "plain")]
    boot = paired_bootstrap({v: np.stack([r["verdicts"] for _, r in sorted(by_seed.items())]) for v, by_seed in runs.items()})
    diff = boot.pairs[("shared", "plain")]
    per_seed = ", ".join(f"seed {s}: {100 * (runs['shared'][s]['after'] - runs['plain'][s]['after']):+.1f}"
                         for s in sorted(set(runs["shared"]) & set(runs["plain"])))
    same = sum(int(np.array_equal(runs["shared"][s]["verdicts"], runs["plain"][s]["verdicts"]))
               for s in set(runs["shared"]) & set(runs["plain"]))
    t_text = (f"95% t-interval over the {t.n} seeds {100 * t.low:+.1f} to {100 * t.high:+.1f}" if t.low is not None
              else "no t-interval (one seed)")
    lines += [
        "",
        f"Held-out accuracy after training, shared minus plain: {100 * t.estimate:+.1f} points ({per_seed}; {t_text}, "
        f"the primary interval; paired bootstrap over the {len(runs['shared'][min(runs['shared'])]['ids'])} problems "
        f"and the seeds, {boot.n_replicates} replicates: {100 * diff.low:+.1f} to {100 * diff.high:+.1f}). "
        f"In {same} of {t.n} seeds the two variants gave the same verdict on every held-out problem.",
    ]
    section = "\n".join(lines)
    print(section)
    if not args.no_write:
        write_section("main_job_shared_prefix", section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
