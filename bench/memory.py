"""Peak memory of one TEPOTrainer optimiser step, and the largest batch that fits a memory budget.

    # CPU (this dev box; under the CPU lock): SmolLM2-135M-Instruct at recipes/quickstart.yaml's
    # settings, completions forced to their full 48 tokens, per_device_train_batch_size 8, 16, 32
    flock /tmp/tepo-cpu.lock .venv/bin/python bench/memory.py
    # GPU: a model config folder with random weights (bench/gpu.sh passes the Qwen2.5-0.5B-shaped
    # one), 128-token prompts, 512 forced completion tokens, one optimiser step per rollout
    python bench/memory.py --setup random --model_config .gpu/qwen2.5-0.5b-smolvocab \
        --tokenizer .gpu/tokenizer --batch_sizes 32,64,128

One measured "step" is the first optimiser step of a fresh trainer: the rollout (generation,
rewards, TRL's old-policy log-prob pass when the rollout serves several steps), then forward,
backward and the optimiser step (AdamW, so its two moment buffers are created). Memory:
- CPU: peak resident set size (ru_maxrss) of a fresh child process per batch size, which also
  holds the Python libraries and the model; the increase over the peak before training is shown too.
- CUDA: torch.cuda.max_memory_allocated() over trainer construction (model to GPU) and the step,
  reset between batch sizes (one process); the caching allocator reserves somewhat more.
The largest batch under the budget is a straight-line fit of peak vs batch size through the
measured points, extrapolated (and said so) unless a measured point already exceeds the budget.
Writes the `memory_cpu` / `memory_gpu` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _prompts import fixed_length_rows  # noqa: E402
from _report import machine, write_section  # noqa: E402

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
GIB = 2**30


# ----------------------------------------------------------------------------------------------
# trainers


def quickstart_trainer(batch_size: int, output_dir: str):
    """TEPOTrainer exactly as `tepo train --config recipes/quickstart.yaml` builds it (held-out
    evaluation off), with per_device_train_batch_size = batch_size, one optimiser step, and
    completions forced to max_completion_length (the worst case for memory)."""
    from tepo.models import resolve_model
    from tepo.tasks import to_prompt_dataset
    from tepo.training.cli import load_problems, parse
    from tepo.training.trainer import TEPOTrainer

    script, config = parse([
        "--config", str(QUICKSTART), "--output_dir", output_dir, "--max_steps", "1",
        "--per_device_train_batch_size", str(batch_size), "--save_strategy", "no", "--heldout_eval", "false",
        "--report_to", "none", "--disable_tqdm", "true", "--stability_monitor", "false",
    ])
    config.generation_kwargs = {"min_new_tokens": config.max_completion_length}
    train, _ = load_problems(script)
    trainer = TEPOTrainer(model=resolve_model(script.model), args=config, train_dataset=to_prompt_dataset(train))
    settings = {
        "model": "SmolLM2-135M-Instruct", "recipe": "recipes/quickstart.yaml",
        "num_generations": config.num_generations, "steps_per_generation": config.steps_per_generation,
        "max_completion_length": config.max_completion_length, "bf16": config.bf16,
    }
    return trainer, settings


def random_model_trainer(batch_size: int, output_dir: str, *, model_config: str, tokenizer: str,
                         prompt_tokens: int, completion_tokens: int, num_generations: int, device: str):
    """TEPOTrainer (objective tepo) on a random-weight model built from a config folder: plain-text
    prompts of prompt_tokens tokens, completion_tokens forced, one optimiser step per rollout."""
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from tepo.rewards import math_reward_func
    from tepo.tasks import load_task
    from tepo.training import TEPOConfig, TEPOTrainer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    config = AutoConfig.from_pretrained(model_config)
    if config.vocab_size < len(tok):
        raise ValueError(f"{model_config}: vocab_size {config.vocab_size} < {len(tok)} tokens of {tokenizer}")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    num_prompts = max(1, batch_size // num_generations)
    problems = load_task(task="arithmetic", split="train", num_problems=num_prompts * 4, levels=[1, 2])
    rows = fixed_length_rows(tok, problems, prompt_tokens)
    args = TEPOConfig(
        output_dir=output_dir, objective="tepo", per_device_train_batch_size=batch_size,
        num_generations=num_generations, steps_per_generation=1, max_completion_length=completion_tokens,
        max_steps=1, learning_rate=1e-6, lr_scheduler_type="constant", bf16=True, use_cpu=device == "cpu",
        gradient_checkpointing=False, report_to=[], save_strategy="no", seed=0, disable_tqdm=True,
        stability_monitor=False, generation_kwargs={"min_new_tokens": completion_tokens},
    )
    trainer = TEPOTrainer(model=model, reward_funcs=math_reward_func, args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=tok)
    settings = {
        "model": f"{model_config} (random weights, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters)",
        "num_generations": num_generations, "steps_per_generation": 1, "prompt_tokens": prompt_tokens,
        "max_completion_length": completion_tokens, "bf16": True,
    }
    return trainer, settings


def build_trainer(spec: dict, batch_size: int, output_dir: str):
    if spec["setup"] == "quickstart":
        return quickstart_trainer(batch_size, output_dir)
    return random_model_trainer(
        batch_size, output_dir, model_config=spec["model_config"], tokenizer=spec["tokenizer"],
        prompt_tokens=spec["prompt_tokens"], completion_tokens=spec["completion_tokens"],
        num_generations=spec["num_generations"], device=spec["device"],
    )


# ----------------------------------------------------------------------------------------------
# measurement


def _maxrss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux: kilobytes


def measure_in_child(spec: dict, batch_size: int) -> dict:
    """CPU: one fresh process per batch size, so that its peak RSS is this step's."""
    cmd = [sys.executable, __file__, "--_child", json.dumps({**spec, "batch_size": batch_size})]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"batch size {batch_size}: child failed (exit {proc.returncode})\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    with tempfile.TemporaryDirectory() as tmp:
        trainer, settings = build_trainer(spec, spec["batch_size"], tmp)
        before = _maxrss_gib()
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    print(json.dumps({"batch_size": spec["batch_size"], "peak_gib": _maxrss_gib(), "before_step_gib": before,
                      "step_s": seconds, "settings": settings}))
    return 0


def measure_cuda(spec: dict, batch_size: int) -> dict:
    """CUDA: in this process; peak allocated from before the trainer exists to after the step."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with tempfile.TemporaryDirectory() as tmp:
        trainer, settings = build_trainer(spec, batch_size, tmp)
        torch.cuda.synchronize()
        before = torch.cuda.max_memory_allocated()
        t0 = time.perf_counter()
        trainer.train()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated()
        reserved = torch.cuda.max_memory_reserved()
        trainer.accelerator.free_memory()  # the accelerator keeps references to the model and optimiser
        del trainer
    gc.collect()
    torch.cuda.empty_cache()
    return {"batch_size": batch_size, "peak_gib": (peak - base) / GIB, "before_step_gib": (before - base) / GIB,
            "reserved_gib": reserved / GIB, "step_s": seconds, "settings": settings}


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least-squares (intercept, slope, largest absolute residual) of ys over xs."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    intercept = my - slope * mx
    residual = max(abs(y - (intercept + slope * x)) for x, y in zip(xs, ys))
    return intercept, slope, residual


def largest_batch(points: list[dict], budget_gib: float, multiple: int) -> dict:
    """Largest batch size (a multiple of `multiple`) whose fitted peak is within the budget."""
    xs = [p["batch_size"] for p in points]
    ys = [p["peak_gib"] for p in points]
    a, b, residual = linear_fit(xs, ys)
    out = {"intercept_gib": a, "gib_per_completion": b, "max_residual_gib": residual, "budget_gib": budget_gib}
    fitting = [p["batch_size"] for p in points if p["peak_gib"] <= budget_gib]
    if b <= 0:
        out.update(batch_size=None, how="no growth with batch size measured: cannot extrapolate")
    elif any(y > budget_gib for y in ys):
        best = max(fitting) if fitting else None
        out.update(batch_size=best, how="measured (a larger measured batch exceeded the budget)")
    else:
        n = int((budget_gib - a) / b) // multiple * multiple
        out.update(batch_size=n, how=f"extrapolated linearly beyond the largest measured batch ({max(xs)})")
    return out


def rerun_args(argv: list[str]) -> str:
    """The command-line arguments that change the measurement (not --json PATH / --no_write)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--json":
            skip = True
        elif not (a.startswith("--json=") or a == "--no_write"):
            out.append(a)
    return " ".join(out)


# ----------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setup", choices=("quickstart", "random"), default=None,
                   help="quickstart: SmolLM2 at recipes/quickstart.yaml (the CPU default); random: --model_config with random weights (the CUDA default)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch_sizes", default=None, help="per_device_train_batch_size values, comma-separated")
    p.add_argument("--budget_gib", type=float, default=None, help="memory budget (default: the machine's RAM / the GPU's memory)")
    p.add_argument("--model_config", default=None, help="--setup random: a model config folder")
    p.add_argument("--tokenizer", default=None, help="--setup random: a tokenizer folder")
    p.add_argument("--prompt_tokens", type=int, default=128)
    p.add_argument("--completion_tokens", type=int, default=512)
    p.add_argument("--num_generations", type=int, default=8)
    p.add_argument("--json", default=None, help="also write the raw results to this file")
    p.add_argument("--no_write", action="store_true", help="print only, leave docs/benchmarks.md alone")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child is not None:
        return child_main(args._child)

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    setup = args.setup or ("random" if cuda else "quickstart")
    if setup == "random" and not (args.model_config and args.tokenizer):
        p.error("--setup random needs --model_config and --tokenizer folders")
    default_sizes = "8,16,32" if setup == "quickstart" else "32,64,128"
    sizes = [int(x) for x in (args.batch_sizes or default_sizes).split(",")]
    if len(sizes) < 2:
        p.error("--batch_sizes: give at least two sizes (a line needs two points)")
    spec = {"setup": setup, "device": args.device, "model_config": args.model_config, "tokenizer": args.tokenizer,
            "prompt_tokens": args.prompt_tokens, "completion_tokens": args.completion_tokens,
            "num_generations": args.num_generations}
    if cuda:
        budget = args.budget_gib or torch.cuda.get_device_properties(0).total_memory / GIB
    else:
        import psutil

        budget = args.budget_gib or psutil.virtual_memory().total / GIB
    # rollout = batch x steps_per_generation must hold whole groups
    multiple = 2 if setup == "quickstart" else args.num_generations

    points, out_of_memory = [], None
    for size in sizes:
        t0 = time.perf_counter()
        try:
            point = measure_cuda(spec, size) if cuda else measure_in_child(spec, size)
        except torch.cuda.OutOfMemoryError:
            out_of_memory = size  # larger sizes would not fit either
            gc.collect()
            torch.cuda.empty_cache()
            print(f"[memory] batch {size}: out of memory", file=sys.stderr)
            break
        points.append(point)
        print(f"[memory] batch {size}: peak {point['peak_gib']:.2f} GiB ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    if len(points) < 2:
        print(f"[memory] fewer than two batch sizes measured (out of memory at {out_of_memory})", file=sys.stderr)
        return 1
    fit = largest_batch(points, budget, multiple)
    if out_of_memory is not None:
        fit["out_of_memory_at"] = out_of_memory
        if fit["batch_size"] is not None and fit["batch_size"] >= out_of_memory:
            fit.update(batch_size=max(p["batch_size"] for p in points), how=f"measured (batch {out_of_memory} ran out of memory)")
    settings = points[0]["settings"]
    result = {"machine": machine(), "setup": setup, "device": args.device, "settings": settings, "points": points, "fit": fit}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))

    what = "peak RSS of the process" if not cuda else "torch.cuda.max_memory_allocated"
    rows = "\n".join(
        f"| {pt['batch_size']} | {pt['batch_size'] * settings['steps_per_generation']} | {pt['peak_gib']:.2f} | "
        f"{pt['peak_gib'] - pt['before_step_gib']:.2f} | {pt['step_s']:.1f} |"
        for pt in points
    )
    if out_of_memory is not None:
        rows += f"\n| {out_of_memory} | {out_of_memory * settings['steps_per_generation']} | out of memory | | |"
    if setup == "quickstart":
        shape = (f"{settings['model']} at `{settings['recipe']}` (bf16 autocast, fp32 weights, AdamW), "
                 f"{settings['num_generations']} completions per prompt, {settings['steps_per_generation']} optimiser "
                 f"steps per rollout, completions forced to {settings['max_completion_length']} tokens")
    else:
        shape = (f"{settings['model']}, objective tepo, bf16 autocast, {settings['prompt_tokens']}-token prompts, "
                 f"{settings['max_completion_length']} forced completion tokens, {settings['num_generations']} completions "
                 "per prompt, one optimiser step per rollout, no gradient checkpointing")
    best = fit["batch_size"]
    md = f"""## Memory of one optimiser step ({'GPU' if cuda else 'CPU'})

Machine: {result['machine']}. {shape}. One step = the first optimiser step of a fresh trainer:
rollout (generation, rewards, old-policy log-probs) + forward/backward + AdamW step. Memory = {what}
(the step's increase = peak minus the peak before `train()`).

| completions per step | rollout | peak GiB | step's increase GiB | step s |
|---:|---:|---:|---:|---:|
{rows}

Fit: peak = {fit['intercept_gib']:.2f} GiB + {fit['gib_per_completion'] * 1024:.1f} MiB x completions per step
(largest residual {fit['max_residual_gib']:.2f} GiB). **Largest batch within {budget:.1f} GiB: {best if best is not None else 'n/a'}
completions per step** ({fit['how']}).
Command: `python bench/memory.py {rerun_args(sys.argv[1:] if argv is None else argv)}`
"""
    print(md)
    if not args.no_write:
        write_section("memory_gpu" if cuda else "memory_cpu", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
