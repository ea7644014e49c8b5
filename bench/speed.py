"""Speed of the quickstart recipe, side by side in one invocation (CPU; issue 29's targets):

1. trainers: stock TRL `GRPOTrainer` (the recipe's objective through `tepo.training.stock`, the plain
   path) and `TEPOTrainer` (`tepo train`'s trainer, shared prefix on), same model, problems, learning
   rate, batch shape and seed; per optimiser step (generating steps included): wall time, generation,
   the rest of the rollout (rewards, pi_old pass), the update phase and its tokens/s counted as the
   plain path counts them (non-padding prompt + completion tokens of every micro-batch);
2. held-out evaluation: the greedy pass of `tepo train` (150 problems, 48 new tokens) with Hugging Face
   generate as before (batch 16, plain prefill) against the shared-prefix prefill at several batch
   sizes, with the verdicts compared problem by problem;
3. the physical limit: this CPU's fp32 matrix-multiply rate, measured in the same run, and the
   FLOPs one update step of the shared-prefix path computes (6 x non-embedding parameters x tokens
   forwarded + 6 x hidden x vocabulary x scored positions; attention's own products left out), so
   FLOPs / peak is the least time the step could take.

    flock /tmp/tepo-cpu.lock .venv/bin/python bench/speed.py --json results/bench/speed.json   # ~6 min here
    .venv/bin/python bench/speed.py --from_json results/bench/speed.json                     # re-render only

Each part's results go to --json as they finish (a stopped run keeps what it measured); the
section `speed_cpu` of docs/benchmarks.md is rewritten at the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import machine, write_section  # noqa: E402
from train_step import Probe, summarize  # noqa: E402

RECIPE = ROOT / "recipes" / "quickstart.yaml"
BEFORE_BATCH = 32  # the held-out batch size of `tepo train` when issue 29 was filed: the baseline of the eval speedup


def peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 rate of an n^3 matrix product on this CPU (all torch threads)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


class TokenCounter:
    """Counts the token positions the model embeds while `active` (the update phase)."""

    def __init__(self, model):
        self.active, self.embedded = False, 0
        model.get_input_embeddings().register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if self.active:
            self.embedded += inputs[0].numel()


def run_trainer(kind: str, steps: int, out_dir: Path) -> dict:
    from trl import GRPOTrainer

    from tepo.models import resolve_model
    from tepo.rewards import math_reward_func
    from tepo.tasks import to_prompt_dataset
    from tepo.training.cli import load_problems, parse
    from tepo.training.stock import stock_trl_config
    from tepo.training.trainer import TEPOTrainer

    argv = ["--config", str(RECIPE), "--output_dir", str(out_dir / kind), "--max_steps", str(steps),
            "--save_strategy", "no", "--heldout_eval", "false", "--use_cpu", "true"]
    script, config = parse(argv)
    train_problems, _ = load_problems(script)
    dataset = to_prompt_dataset(train_problems)
    model_path = resolve_model(script.model)
    if kind == "stock":
        trainer = GRPOTrainer(model=model_path, reward_funcs=math_reward_func, args=stock_trl_config(config),
                              train_dataset=dataset)
    else:
        trainer = TEPOTrainer(model=model_path, args=config, train_dataset=dataset)
    probe = Probe(trainer)
    counter = TokenCounter(trainer.model)
    loss = trainer._compute_loss  # Probe's counting wrapper

    def counted(model, inputs):
        counter.active = True
        try:
            return loss(model, inputs)
        finally:
            counter.active = False

    trainer._compute_loss = counted
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    params = sum(p.numel() for p in trainer.model.parameters())
    result = summarize(probe.steps, params, None)
    result.update(
        train_s=seconds, embedded_update_tokens=counter.embedded,
        update_tokens=sum(s.get("update_tokens", 0) for s in probe.steps),
        shared_prefix=bool(getattr(trainer, "shared_prefix", False)), peak_rss_gib=peak_rss_gib(),
        scored_positions=steps * config.per_device_train_batch_size * config.gradient_accumulation_steps
        * config.max_completion_length,
    )
    del trainer
    gc.collect()
    return result


def run_eval(batch_sizes: list[int], repeats: int = 2) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tepo.evaluation.generation import HFBackend
    from tepo.evaluation.runner import greedy_accuracy
    from tepo.models import resolve_model
    from tepo.training.cli import load_problems, parse

    script, config = parse(["--config", str(RECIPE), "--output_dir", "unused", "--use_cpu", "true"])
    _, heldout = load_problems(script)
    path = resolve_model(script.model)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    max_new = config.heldout_max_new_tokens or config.max_completion_length
    runs = {}
    plain_batches = sorted({BEFORE_BATCH, script.heldout_batch_size})
    cases = [("plain", b, False) for b in plain_batches] + [("shared", b, True) for b in batch_sizes]
    for name, batch, shared in cases:
        backend = HFBackend.from_model(model, tokenizer, batch_size=batch, shared_prefix=shared)
        results = [greedy_accuracy(backend, heldout, max_new_tokens=max_new) for _ in range(repeats)]
        if any(r["verdicts"] != results[0]["verdicts"] for r in results):
            raise RuntimeError(f"eval {name}@{batch}: repeated greedy passes gave different verdicts")
        result = min(results, key=lambda r: r["generate_s"])  # the best of `repeats`, for every case alike
        runs[f"{name}@{batch}"] = {k: result[k] for k in ("accuracy", "generate_s", "verify_s", "verdicts", "answers")}
        runs[f"{name}@{batch}"]["generate_s_all"] = [r["generate_s"] for r in results]
        print(f"[eval {name}@{batch}] {result['generate_s']:.1f} s, accuracy {result['accuracy']:.3f}", file=sys.stderr)
    base = runs[f"plain@{BEFORE_BATCH}"]
    for run in runs.values():
        run["speedup"] = base["generate_s"] / run["generate_s"]
        run["verdicts_differ"] = sum(a != b for a, b in zip(run["verdicts"], base["verdicts"]))
        run["answers_differ"] = sum(a != b for a, b in zip(run["answers"], base["answers"]))
    nonembed = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)
    return {"runs": {k: {x: y for x, y in v.items() if x not in ("verdicts", "answers")} for k, v in runs.items()},
            "num_problems": len(heldout), "max_new_tokens": max_new, "nonembed_params": nonembed,
            "hidden": model.config.hidden_size, "vocab": model.config.vocab_size,
            "baseline": f"plain@{BEFORE_BATCH}"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8, help="optimiser steps per trainer (4 = one rollout of the recipe)")
    p.add_argument("--eval_batch_sizes", default="64,150", help="batch sizes of the shared-prefix held-out pass")
    p.add_argument("--eval_repeats", type=int, default=2, help="greedy passes per held-out case; the fastest is reported")
    p.add_argument("--parts", default="trainers,eval,peak")
    p.add_argument("--json", default=None, help="write (and update) the results here as each part ends")
    p.add_argument("--from_json", default=None, help="render a saved result, run nothing")
    p.add_argument("--no_write", action="store_true", help="leave docs/benchmarks.md alone")
    args = p.parse_args(argv)
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
    else:
        results = {"machine": machine(), "command": "python bench/speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
                   "date": time.strftime("%Y-%m-%d")}
        if args.json and Path(args.json).exists():
            results.update(json.loads(Path(args.json).read_text()))  # resume: parts already measured stay
        parts = args.parts.split(",")

        def save():
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=1))

        if "peak" in parts and "peak_gflops" not in results:
            results["peak_gflops"] = matmul_gflops()
            save()
        if "trainers" in parts:
            with tempfile.TemporaryDirectory() as tmp:
                for kind in ("stock", "tepo"):
                    if kind not in results:
                        results[kind] = run_trainer(kind, args.steps, Path(tmp))
                        print(f"[{kind}] mean step {results[kind]['step_s_mean']:.1f} s", file=sys.stderr)
                        save()
        if "eval" in parts and "eval" not in results:
            results["eval"] = run_eval([int(b) for b in args.eval_batch_sizes.split(",")], args.eval_repeats)
            save()
    md = render(results)
    print(md)
    if not args.no_write:
        write_section("speed_cpu", md)
    return 0


def render(r: dict) -> str:
    lines = [f"## Speed of the quickstart recipe: shared prefix vs stock TRL (CPU, {r.get('date', '')})", "",
             f"Machine: {r['machine']}. Command: `flock /tmp/tepo-cpu.lock .venv/bin/{r['command']}`.", ""]
    if "stock" in r and "tepo" in r:
        s, t = r["stock"], r["tepo"]
        lines += [
            f"Trainers: `recipes/quickstart.yaml` (TEPO; 8 prompts x 8 completions per rollout, 16 completions per "
            f"optimiser step, 4 steps per rollout, 48 new tokens, fp32, lr 1e-5, same problems and seed), "
            f"{s['steps']} optimiser steps each, generating steps included.", "",
            "| trainer | mean step s | generate s/step | rest of rollout s/step | update s/step | update tok/s (plain count) |",
            "|---|---|---|---|---|---|",
        ]
        for name, x in (("stock TRL GRPOTrainer (plain path)", s), ("tepo (shared prefix)" if t.get("shared_prefix") else "tepo", t)):
            lines.append(f"| {name} | {x['step_s_mean']:.1f} | {x['generate_s_per_step']:.1f} | {x['score_s_per_step']:.1f} | "
                         f"{x['update_s_per_step']:.1f} | {x['update_tok_per_s']:.0f} |")
        ratio = t["step_s_mean"] / s["step_s_mean"]
        lines += ["", f"Per-step times: stock {', '.join(f'{v:.1f}' for v in s['step_s'])} s; tepo "
                  f"{', '.join(f'{v:.1f}' for v in t['step_s'])} s (the first step of a rollout generates). Peak memory: "
                  "the main job's, measured per run in `results/main-job/` (this bench runs both trainers in one process).",
                  "", f"**Mean optimiser step, tepo / stock TRL: {ratio:.2f}** (target <= 0.45). "
                  f"Update tokens/s, tepo / stock: **{t['update_tok_per_s'] / s['update_tok_per_s']:.2f}x** (target >= 2.5x). "
                  f"Generation: {s['generate_s_per_step'] / max(t['generate_s_per_step'], 1e-9):.2f}x faster per step."]
        if "peak_gflops" in r and "eval" in r:
            e = r["eval"]
            flops = (6 * e["nonembed_params"] * t["embedded_update_tokens"]
                     + 6 * e["hidden"] * e["vocab"] * t["scored_positions"]) / t["steps"]
            limit = flops / (r["peak_gflops"] * 1e9)
            lines += ["", f"Physical limit: this CPU multiplies fp32 matrices at {r['peak_gflops']:.0f} GFLOP/s (2048^3, same run). "
                      f"One update step of the shared-prefix path forwards {t['embedded_update_tokens'] / t['steps']:.0f} token "
                      f"positions and scores {t['scored_positions'] / t['steps']:.0f}: about {flops / 1e12:.2f} TFLOP "
                      f"(attention's own products left out), at least **{limit:.1f} s** at that rate; it took "
                      f"{t['update_s_per_step']:.1f} s ({100 * limit / t['update_s_per_step']:.0f}% of the peak rate)."]
    if "eval" in r:
        e = r["eval"]
        lines += ["", f"Held-out greedy evaluation: {e['num_problems']} problems, {e['max_new_tokens']} new tokens, "
                  f"verdicts compared problem by problem with the baseline: {e['baseline']}, plain Hugging Face `generate` at the "
                  "batch size `tepo train` used before the shared-prefix path. Each case ran "
                  f"{len(next(iter(e['runs'].values())).get('generate_s_all', [0]))} times; the fastest is shown.", "",
                  "| path | batch | generate s | speedup | accuracy | verdicts that differ | answers that differ |",
                  "|---|---|---|---|---|---|---|"]
        for key, x in e["runs"].items():
            name, batch = key.split("@")
            lines.append(f"| {name} | {batch} | {x['generate_s']:.1f} | {x['speedup']:.2f}x | {100 * x['accuracy']:.1f}% | "
                         f"{x['verdicts_differ']} | {x['answers_differ']} |")
        shared = {k: x for k, x in e["runs"].items() if k.startswith("shared@")}
        if shared:
            best = max(shared, key=lambda k: shared[k]["speedup"])
            lines += ["", f"**Held-out evaluation, {best} against {e['baseline']}: {shared[best]['speedup']:.2f}x faster** "
                      "(target >= 2.5x)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
