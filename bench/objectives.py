"""Forward + backward time of every objective, as a ratio to plain `grpo` measured in the same run.

B = 64 completions of up to T = 4096 tokens, fp32, a realistic mask (lengths uniform in [T/8, T]),
old_logp ~ -Exponential(mean 0.3), an off-policy log-ratio (logp = old_logp + N(0, 0.05)),
per-sequence group advantages (G = 8) of 0/1 rewards.
Each case is timed next to a grpo call (random order); the figure is the median of the paired ratios.
Targets: every objective <= 1.5x grpo, tepo <= 1.2x.

    flock /tmp/tepo-cpu.lock .venv/bin/python bench/objectives.py [--repeats 61] [--threads N]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, write_section  # noqa: E402

from tepo.advantages import group_advantages  # noqa: E402
from tepo.objectives import list_objectives, policy_loss  # noqa: E402

B, T, GROUP = 64, 4096, 8


def make_inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(T // 8, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    # token log-probs: mostly near 0 with a long tail (mean -0.3), as sampled text has
    old = -torch.empty(B, T).exponential_(1 / 0.3, generator=g)
    logp = old + 0.05 * torch.randn(B, T, generator=g)
    rewards = (torch.rand(B, generator=g) < 0.4).float()
    entropy = torch.rand(B, T, generator=g) * 2
    return dict(
        logp=logp,
        old_logp=old,
        advantages=group_advantages(rewards, GROUP),
        mask=mask,
        ref_logp=old + 0.1 * torch.randn(B, T, generator=g),
        entropy=entropy,
        old_entropy=entropy + 0.2 * torch.randn(B, T, generator=g),
    )


# name shown -> (objective, extra hyper-parameters, which optional tensors it gets)
CASES = {name: (name, {}, ()) for name in list_objectives()}
CASES["tepo + KL mask"] = ("tepo", {"tepo_kl_coef": 0.1}, ("entropy", "old_entropy"))
CASES["grpo + beta_kl"] = ("grpo", {"beta_kl": 0.04}, ("ref_logp",))


def time_once(inputs: dict, name: str, hp: dict, optional: tuple) -> float:
    logp = inputs["logp"].clone().requires_grad_(True)
    args = {k: inputs[k] for k in ("old_logp", "advantages", "mask", *optional)}
    start = time.perf_counter()
    out = policy_loss(name, logp=logp, generator=torch.Generator().manual_seed(0), **args, **hp)
    out.loss.backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=61)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    inputs = make_inputs()
    labels = list(CASES)
    for label in labels:  # warm-up
        time_once(inputs, *CASES[label])
    # Paired design: each case is timed right next to a grpo call (in random order) and the ratio
    # of the pair is kept, so that load from other processes, which drifts over seconds, cancels.
    times: dict[str, list[float]] = {label: [] for label in labels}
    ratios: dict[str, list[float]] = {label: [] for label in labels}
    rng = random.Random(0)
    for _ in range(args.repeats):
        rng.shuffle(labels)
        for label in labels:
            pair = [("grpo", CASES["grpo"]), (label, CASES[label])]
            rng.shuffle(pair)
            measured = {which: time_once(inputs, *case) for which, case in pair} if label != "grpo" else None
            if measured is None:  # grpo against itself: two calls, the spread shows the noise
                first, second = time_once(inputs, *CASES["grpo"]), time_once(inputs, *CASES["grpo"])
                measured = {"grpo": first}
                ratios[label].append(second / first)
                times[label].append(first)
                continue
            times[label].append(measured[label])
            ratios[label].append(measured[label] / measured["grpo"])

    rows = []
    for label in sorted(labels, key=lambda k: (k != "grpo", k)):
        ratio = statistics.median(ratios[label])
        q1, _, q3 = statistics.quantiles(ratios[label], n=4)
        target = 1.2 if label == "tepo" else (1.5 if label in list_objectives() and label != "grpo" else None)
        verdict = "" if target is None else ("meets" if ratio <= target else "MISSES") + f" <= {target}x"
        shown = "grpo (against itself)" if label == "grpo" else label
        rows.append(
            f"| {shown} | {statistics.median(times[label]) * 1e3:.1f} | {ratio:.2f}x | {q1:.2f}-{q3:.2f} | {verdict} |"
        )
    valid = int(inputs["mask"].sum())
    table = "\n".join(
        [
            "## Objectives: forward + backward time relative to grpo",
            "",
            f"Machine: {machine()}. "
            f"B={B}, T={T}, fp32, {valid} valid tokens ({valid / (B * T):.0%}), {args.repeats} repeats. "
            "Each case is timed next to a grpo call (random order) and the figure is the median of those "
            "paired ratios (the interquartile range beside it; 'grpo against itself' shows the noise of "
            "this shared machine). Includes input checks and metrics (everything `policy_loss` does). "
            "Targets: every objective <= 1.5x grpo, tepo <= 1.2x; the rows without a target are options "
            "(TEPO's KL mask on, a KL-to-reference term).",
            "",
            "| objective | median ms | vs grpo | IQR | target |",
            "|---|---:|---:|---:|---|",
            *rows,
            "",
            "Rerun: `flock /tmp/tepo-cpu.lock .venv/bin/python bench/objectives.py`",
        ]
    )
    print(table)
    if not args.no_write:
        write_section("objectives", table)


if __name__ == "__main__":
    main()
