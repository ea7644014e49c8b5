"""fp32 vs bf16 autocast on this CPU, for the two things the main job spends its time on.

- update: one forward + backward of SmolLM2-135M-Instruct on the main job's optimiser-step shape
  (16 sequences of 140 tokens: a one-shot prompt and 48 completion tokens), as the trainer runs it
  (fp32 weights; `torch.autocast("cpu", bfloat16)` is what `bf16: true` turns on);
- greedy: Hugging Face generate on the main job's held-out problems (64 of them, one batch, 48 new
  tokens), through tepo's own evaluation backend (fp32 weights, plain or under bf16 autocast).

The two precisions alternate (fp32, bf16, fp32, bf16, ...) so a slow patch of a shared machine hits
both; the first round is warm-up. Whether bf16 is fast depends on the CPU having it natively
(AVX512-BF16 or AMX); the section names which this machine has. Writes the `cpu_precision` section
of docs/benchmarks.md:

    flock /tmp/tepo-cpu.lock .venv/bin/python bench/cpu_precision.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, write_section  # noqa: E402

PRECISIONS = ("fp32", "bf16")


def cpu_bf16_support() -> str:
    avx = torch.cpu._is_avx512_bf16_supported()
    amx = torch.cpu._is_amx_tile_supported()
    return f"AVX512-BF16 {'yes' if avx else 'no'}, AMX {'yes' if amx else 'no'}"


def time_updates(model_path: str, rounds: int, seqs: int, tokens: int) -> dict[str, list[float]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.config.use_cache = False
    ids = torch.randint(0, model.config.vocab_size, (seqs, tokens), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    for r in range(rounds + 1):
        for precision in PRECISIONS:
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = model(input_ids=ids).logits.float()
            logits.logsumexp(-1).mean().backward()
            model.zero_grad(set_to_none=True)
            if r:  # round 0 is warm-up
                times[precision].append(time.perf_counter() - t)
    return times


def time_greedy(model_path: str, rounds: int, problems: int, max_new_tokens: int) -> dict[str, list[float]]:
    from tepo.evaluation.generation import HFBackend
    from tepo.tasks.arithmetic import make_problems
    from tepo.tasks.prompts import build_messages

    messages = [build_messages(p["problem"]) for p in make_problems(problems, levels=(1, 2), split="test", seed=0)]
    fp32 = HFBackend.from_pretrained(model_path, dtype="float32", device="cpu", batch_size=problems)
    backends = {"fp32": fp32,  # the same weights; bf16 = autocast, as bf16: true evaluates
                "bf16": HFBackend.from_model(fp32.model, fp32.tokenizer, batch_size=problems, autocast_dtype=torch.bfloat16)}
    times: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    for r in range(rounds + 1):
        for precision in PRECISIONS:
            t = time.perf_counter()
            backends[precision].generate(messages if r else messages[:2], max_new_tokens=max_new_tokens, temperature=0.0)
            if r:
                times[precision].append(time.perf_counter() - t)
    return times


def render(update: dict, greedy: dict, args) -> str:
    def row(name, times):
        f, b = statistics.median(times["fp32"]), statistics.median(times["bf16"])
        return f"| {name} | {f:.2f} | {b:.2f} | {b / f:.2f}x |"

    return "\n".join([
        "## CPU precision: fp32 vs bf16 autocast",
        "",
        f"Machine: {machine()}; native bf16: {cpu_bf16_support()}. `bench/cpu_precision.py`: SmolLM2-135M-Instruct, "
        f"fp32 weights; bf16 = `torch.autocast(\"cpu\", bfloat16)` (what `bf16: true` does). Update: one forward + "
        f"backward of {args.seqs} x {args.tokens} tokens (the main job's optimiser step). Greedy: Hugging Face generate, "
        f"{args.problems} held-out problems in one batch, {args.max_new_tokens} new tokens. Median of {args.rounds} "
        "rounds after one warm-up round, the two precisions alternating.",
        "",
        "| measure | fp32 s | bf16 s | bf16 / fp32 |",
        "|---|---:|---:|---:|",
        row("update (forward + backward)", update),
        row("greedy generation", greedy),
        "",
        f"Command: `flock /tmp/tepo-cpu.lock .venv/bin/python bench/cpu_precision.py`",
    ]) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="default: the offline SmolLM2-135M-Instruct")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seqs", type=int, default=16)
    p.add_argument("--tokens", type=int, default=140)
    p.add_argument("--problems", type=int, default=64)
    p.add_argument("--max_new_tokens", type=int, default=48)
    p.add_argument("--no_write", action="store_true", help="print the section, leave docs/benchmarks.md alone")
    args = p.parse_args()
    from tepo.models import resolve_model

    model_path = resolve_model(args.model)
    update = time_updates(model_path, args.rounds, args.seqs, args.tokens)
    greedy = time_greedy(model_path, args.rounds, args.problems, args.max_new_tokens)
    text = render(update, greedy, args)
    print(text)
    if not args.no_write:
        write_section("cpu_precision", text)


if __name__ == "__main__":
    main()
