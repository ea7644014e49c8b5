"""Step time of TEPOTrainer (objective tepo) vs stock TRL GRPOTrainer, same model, data, batch and
generation settings, in one process. Writes the `train_step` section of docs/benchmarks.md.

    # CPU (this dev box; run under the CPU lock): SmolLM2-135M, real weights
    flock /tmp/tepo-cpu.lock .venv/bin/python bench/train_step.py --device cpu
    # GPU: a Qwen2.5-0.5B-shaped model with random weights, 16 prompts x 8 completions, 128-token
    # prompts, 512 forced completion tokens, on-policy (as in spec/MEASURED.md's stock-TRL GPU run)
    python bench/train_step.py --device cuda --model_config qwen2.5-0.5b --steps 6

Per trainer it reports the mean optimiser-step time, the generation time and generated tokens/s
(TRL's `_generate`, forced to full length so both trainers generate the same number of tokens),
the scoring time (the rest of the rollout: rewards, old-policy log-probs), the update phase (the
rest of the step: forward+backward of each micro-batch, optimiser) with its tokens/s, and the update-phase MFU = 6 * params * update tokens / time / peak bf16 FLOP/s
(989 TFLOP/s for an H100 / H200 SXM; pass --peak_tflops for another card). The first rollout
block (steps_per_generation steps) of each trainer is warm-up and not counted (with --torch_compile it
holds the compilation, reported apart). The trainers run alternately (stock, tepo, stock, tepo ... for
--repeats rounds) so a slow patch of a shared machine hits both. --torch_compile / --use_liger_kernel
apply to both trainers alike.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _prompts import fixed_length_rows  # noqa: E402
from _report import machine, write_section  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}

# Model shapes with random weights (no download needed).
PRESETS = {
    "qwen2.5-0.5b": dict(
        model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
        rope_theta=1_000_000.0, tie_word_embeddings=True, rms_norm_eps=1e-6,
    ),
}


def build_model_and_tokenizer(args):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if args.model_config in ("smollm2-135m", None):
        from tepo.models import resolve_model

        path = resolve_model(None)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
        return model, tokenizer, "SmolLM2-135M-Instruct (real weights)"
    if args.model_config in PRESETS:
        spec = dict(PRESETS[args.model_config])
        config = AutoConfig.for_model(spec.pop("model_type"), **spec)
        label = f"{args.model_config} shape, random weights"
    else:
        config = AutoConfig.from_pretrained(args.model_config)
        label = f"{args.model_config} config, random weights"
    if args.tokenizer == "char":
        from _tiny_llm import tiny_tokenizer

        tokenizer = tiny_tokenizer()
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return model, tokenizer, label


def build_dataset(tokenizer, num_prompts: int, prompt_tokens: int | None):
    """Arithmetic problems; with prompt_tokens, plain-text prompts of exactly that many tokens."""
    from tepo.tasks import load_task, to_prompt_dataset

    problems = load_task(task="arithmetic", split="train", num_problems=num_prompts, levels=[1, 2])
    if prompt_tokens is None:
        return to_prompt_dataset(problems)
    from datasets import Dataset

    return Dataset.from_list(fixed_length_rows(tokenizer, problems, prompt_tokens))


class Probe:
    """Wraps one trainer's methods to time steps, generation and update, and count tokens."""

    def __init__(self, trainer, profile_step: int | None = None, profile_file: Path | None = None):
        from transformers import TrainerCallback

        self.steps: list[dict] = []
        self._cur: dict = {}
        self._profiler = None
        probe = self

        gen, generate, loss = trainer._generate_and_score_completions, trainer._generate, trainer._compute_loss

        def timed_rollout(inputs):
            t0 = time.perf_counter()
            out = gen(inputs)
            probe._cur["rollout_s"] = probe._cur.get("rollout_s", 0.0) + time.perf_counter() - t0
            if probe._cur.get("profile") and probe._profiler is None:
                probe._start_profiler()  # the update phase only: generation would swamp the table
            return out

        def timed_generate(prompts):
            t0 = time.perf_counter()
            out = generate(prompts)
            probe._sync()
            probe._cur["generate_s"] = probe._cur.get("generate_s", 0.0) + time.perf_counter() - t0
            probe._cur["generated_tokens"] = probe._cur.get("generated_tokens", 0) + sum(len(c) for c in out[1])
            return out

        def counted_loss(model, inputs):
            tokens = int(inputs["prompt_mask"].sum() + inputs["completion_mask"].sum())
            probe._cur["update_tokens"] = probe._cur.get("update_tokens", 0) + tokens
            return loss(model, inputs)

        trainer._generate_and_score_completions = timed_rollout
        trainer._generate = timed_generate
        trainer._compute_loss = counted_loss

        class Clock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                probe._sync()
                probe._cur = {"t0": time.perf_counter(), "profile": state.global_step + 1 == profile_step}

            def on_step_end(self, args, state, control, **kw):
                probe._sync()
                if probe._profiler is not None:
                    probe._stop_profiler(profile_file)
                cur = probe._cur
                cur["step_s"] = time.perf_counter() - cur.pop("t0")
                cur["step"] = state.global_step
                probe.steps.append(cur)

        trainer.add_callback(Clock())

    @staticmethod
    def _sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def _start_profiler(self):
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self._profiler = profile(activities=activities)
        self._profiler.__enter__()

    def _stop_profiler(self, path: Path | None):
        self._profiler.__exit__(None, None, None)
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        table = self._profiler.key_averages().table(sort_by=sort, row_limit=40)
        self._profiler = None
        if path is not None:
            path.write_text(table)
        print(table, file=sys.stderr)


def make_trainer(kind: str, model, tokenizer, dataset, args, out_dir: Path):
    from trl import GRPOConfig, GRPOTrainer

    from tepo.rewards import math_reward_func
    from tepo.training import TEPOConfig, TEPOTrainer

    common = dict(
        output_dir=str(out_dir / kind), per_device_train_batch_size=args.micro_batch, num_generations=args.num_generations,
        # TRL counts steps_per_generation in micro-batches: one rollout = micro_batch x that many
        gradient_accumulation_steps=args.grad_accum, steps_per_generation=args.steps_per_generation * args.grad_accum,
        max_completion_length=args.max_completion_length,
        temperature=1.0, learning_rate=1e-6, lr_scheduler_type="constant", max_steps=args.total_steps,
        bf16=True, use_cpu=args.device == "cpu", gradient_checkpointing=args.gradient_checkpointing, report_to=[], save_strategy="no",
        seed=0, disable_tqdm=True, logging_steps=1,
        torch_compile=args.torch_compile, use_liger_kernel=args.use_liger_kernel,
        generation_kwargs={"min_new_tokens": args.max_completion_length} if args.force_length else None,
    )
    if kind == "stock":
        config = GRPOConfig(loss_type="dapo", beta=0.0, **common)
        cls = GRPOTrainer
        kwargs = {}
    else:
        config = TEPOConfig(objective="tepo", stability_monitor=False, shared_prefix=args.shared_prefix == "true", **common)
        cls = TEPOTrainer
        kwargs = {}
    return cls(model=model, reward_funcs=math_reward_func, args=config, train_dataset=dataset,
               processing_class=tokenizer, **kwargs)


def summarize(steps: list[dict], params: int, peak_flops: float | None) -> dict:
    step_s = [s["step_s"] for s in steps]
    gen_s = sum(s.get("generate_s", 0.0) for s in steps)
    gen_tokens = sum(s.get("generated_tokens", 0) for s in steps)
    # rollout = generation + reward scoring (+ old-policy log-probs when a rollout serves several steps)
    rollout_s = sum(s.get("rollout_s", 0.0) for s in steps)
    update_s = sum(s["step_s"] - s.get("rollout_s", 0.0) for s in steps)
    update_tokens = sum(s.get("update_tokens", 0) for s in steps)
    out = {
        "steps": len(steps),
        "step_s_mean": statistics.mean(step_s),
        "step_s_median": statistics.median(step_s),
        "step_s": step_s,
        "generate_s_per_step": gen_s / len(steps),
        "generated_tok_per_s": gen_tokens / gen_s if gen_s else float("nan"),
        "score_s_per_step": (rollout_s - gen_s) / len(steps),
        "update_s_per_step": update_s / len(steps),
        "update_tok_per_s": update_tokens / update_s if update_s else float("nan"),
    }
    out["update_mfu"] = (6 * params * out["update_tok_per_s"] / peak_flops) if peak_flops else None
    return out


def compile_stats() -> dict:
    """What torch.compile made of the run: graphs compiled, graph breaks by reason, frames left eager."""
    from torch._dynamo.utils import counters

    return {
        "unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "graph_break_reasons": {str(k)[:200]: int(v) for k, v in counters["graph_break"].most_common(8)},
        # frames dynamo gave up on (an error under suppress_errors, or a skip): they ran eager
        "frames_not_compiled": int(counters["frames"].get("total", 0) - counters["frames"].get("ok", 0)),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model_config", default=None,
                   help="smollm2-135m (real weights, the CPU default), qwen2.5-0.5b (random weights, the GPU default), or a config folder")
    p.add_argument("--tokenizer", default="char", help="for random-weight models: 'char' (built in) or a tokenizer folder")
    p.add_argument("--steps", type=int, default=None, help="measured optimiser steps per trainer per round (after warm-up)")
    p.add_argument("--repeats", type=int, default=1, help="rounds; each round runs stock then tepo")
    p.add_argument("--num_prompts", type=int, default=None, help="prompts per rollout")
    p.add_argument("--num_generations", type=int, default=None)
    p.add_argument("--steps_per_generation", type=int, default=None)
    p.add_argument("--max_completion_length", type=int, default=None)
    p.add_argument("--prompt_tokens", type=int, default=None, help="plain-text prompts of this many tokens (default: chat prompts)")
    p.add_argument("--micro_batch", type=int, default=None,
                   help="completions per forward/backward (per_device_train_batch_size); the optimiser step accumulates "
                        "gradients over batch / micro_batch of them (default: the whole optimiser batch at once)")
    p.add_argument("--no_force_length", dest="force_length", action="store_false", help="let completions stop at EOS")
    p.add_argument("--gradient_checkpointing", choices=("true", "false"), default=None,
                   help="default: true on GPU (as TRL's default, and what fits an 80 GB card at this shape), false on CPU")
    p.add_argument("--torch_compile", action="store_true",
                   help="both trainers: TrainingArguments.torch_compile (the training forward/backward through torch.compile; "
                        "generation stays eager)")
    p.add_argument("--regional_compile", action="store_true",
                   help="with --torch_compile: compile each repeated block (decoder layer) once instead of the whole model "
                        "(accelerate's use_regional_compilation): far shorter compilation, no fusion across layers")
    p.add_argument("--use_liger_kernel", action="store_true",
                   help="both trainers: Liger's RMSNorm/SwiGLU/RoPE Triton kernels (GPU; needs the liger-kernel package; TRL "
                        "leaves the LM head and the loss to its own fused log-prob kernel)")
    p.add_argument("--peak_tflops", type=float, default=None, help="the card's dense bf16 peak (default: known cards)")
    p.add_argument("--shared_prefix", choices=("true", "false"), default="true",
                   help="tepo's shared_prefix (each distinct prompt forwarded once; false: the plain path, as stock TRL)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="run one more optimiser step per trainer after the measured ones, profile its update phase "
                        "(torch.profiler, rollout excluded) and write the top ops by self time to DIR/<trainer>_update_ops.txt; "
                        "that step is not in the timings")
    p.add_argument("--no_write", action="store_true", help="print only, leave docs/benchmarks.md alone")
    p.add_argument("--json", default=None, help="also write the raw results to this file")
    p.add_argument("--from_json", default=None, help="write the docs section from a saved --json result, run nothing")
    args = p.parse_args(argv)
    if args.from_json:
        publish(json.loads(Path(args.from_json).read_text()), write=not args.no_write)
        return 0
    gpu = args.device == "cuda"
    # defaults: CPU = the quickstart batch shape, shortened; GPU = spec/MEASURED.md's stock-TRL GPU run
    defaults = dict(
        model_config="qwen2.5-0.5b" if gpu else "smollm2-135m", steps=6 if gpu else 4,
        num_prompts=16 if gpu else 4, num_generations=8 if gpu else 4, steps_per_generation=1 if gpu else 2,
        max_completion_length=512 if gpu else 32, prompt_tokens=128 if gpu else None,
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.gradient_checkpointing = (args.gradient_checkpointing or ("true" if gpu else "false")) == "true"
    rollout = args.num_prompts * args.num_generations
    if rollout % args.steps_per_generation:
        p.error("num_prompts x num_generations must be divisible by steps_per_generation")
    args.batch_size = rollout // args.steps_per_generation
    args.micro_batch = args.micro_batch or args.batch_size
    if args.batch_size % args.micro_batch:
        p.error(f"--micro_batch {args.micro_batch} must divide the {args.batch_size} completions of an optimiser step")
    args.grad_accum = args.batch_size // args.micro_batch
    warmup = args.steps_per_generation
    args.total_steps = warmup + args.steps + (1 if args.profile else 0)
    profile_dir = Path(args.profile) if args.profile else None
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)

    import tempfile

    if args.regional_compile:
        if not args.torch_compile:
            p.error("--regional_compile needs --torch_compile")
        # TrainingArguments does not expose it; accelerate's TorchDynamoPlugin reads it from here
        os.environ["ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION"] = "true"
    if args.torch_compile:
        import torch._dynamo as dynamo

        # A frame inductor cannot compile runs eager instead of ending the one device run; whether
        # that happened is in the results (compile_stats) and the rendered section.
        dynamo.config.suppress_errors = True

    torch.set_num_threads(torch.get_num_threads())
    base, tokenizer, label = build_model_and_tokenizer(args)
    params = sum(p.numel() for p in base.parameters())
    dataset = build_dataset(tokenizer, num_prompts=max(64, args.num_prompts * (args.total_steps + 2)), prompt_tokens=args.prompt_tokens)
    device_name = machine()
    peak = args.peak_tflops
    if peak is None and gpu:
        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    peak_flops = peak * 1e12 if peak else None

    measured: dict[str, list[dict]] = {"stock": [], "tepo": []}
    warmup_s: dict[str, list[float]] = {"stock": [], "tepo": []}
    peak_mem: dict[str, float] = {}

    def collect(partial_after: str | None = None) -> dict:
        results = {kind: summarize(steps, params, peak_flops) for kind, steps in measured.items() if steps}
        if partial_after is not None:  # a snapshot, in case a time limit stops the run
            results["partial"] = f"stopped after {partial_after}; results so far"
        if "stock" in results and "tepo" in results:
            results["ratio_tepo_over_stock"] = results["tepo"]["step_s_mean"] / results["stock"]["step_s_mean"]
            # The same without generation: TRL's own `_generate`, which TEPOTrainer does not override, so
            # what is left is the part our code can make slower (scoring, loss, update, callbacks).
            results["ratio_without_generation"] = (
                (results["tepo"]["step_s_mean"] - results["tepo"]["generate_s_per_step"])
                / (results["stock"]["step_s_mean"] - results["stock"]["generate_s_per_step"]))
        results["settings"] = {k: v for k, v in vars(args).items() if k not in ("json", "from_json")}
        results["model"], results["params"], results["machine"] = label, params, device_name
        results["peak_tflops"] = peak
        results["command"] = "python bench/train_step.py " + " ".join(sys.argv[1:] if argv is None else argv)
        for kind in results.keys() & measured.keys():
            if kind in peak_mem:
                results[kind]["peak_memory_gib"] = peak_mem[kind]
            results[kind]["warmup_step_s"] = warmup_s[kind]
        if args.torch_compile:
            results["compile_stats"] = compile_stats()
        return results

    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.repeats):
            for kind in ("stock", "tepo"):
                model = copy.deepcopy(base)
                trainer = make_trainer(kind, model, tokenizer, dataset, args, Path(tmp) / f"r{round_}")
                probe = Probe(trainer, profile_step=args.total_steps if profile_dir else None,
                              profile_file=profile_dir / f"{kind}_update_ops.txt" if profile_dir else None)
                t0 = time.perf_counter()
                trainer.train()
                print(f"[{kind} round {round_}] {args.total_steps} steps in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
                measured[kind] += probe.steps[warmup:warmup + args.steps]  # not the profiled step
                warmup_s[kind] += [step["step_s"] for step in probe.steps[:warmup]]  # with torch.compile: compilation
                if gpu:
                    peak_mem[kind] = max(peak_mem.get(kind, 0.0), torch.cuda.max_memory_allocated() / 2**30)
                if args.json:  # `--from_json` renders this snapshot if the run is stopped before the end
                    Path(args.json).write_text(json.dumps(collect(f"{kind} round {round_}"), indent=2))
                del trainer, model, probe
                gc.collect()  # trainers hold reference cycles; free the last one before the next starts
                if gpu:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
    results = collect()
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    publish(results, write=not args.no_write)
    return 0


def render(results: dict) -> str:
    def fmt(x, spec=".2f"):
        return "n/a" if x is None else format(x, spec)

    s = argparse.Namespace(**results["settings"])
    peak = results.get("peak_tflops")
    kinds = [k for k in ("stock", "tepo") if k in results]  # a partial snapshot may lack one
    rows = "\n".join(
        f"| {kind} | {fmt(r['step_s_mean'])} | {fmt(r['step_s_median'])} | {fmt(r['generate_s_per_step'])} | "
        f"{fmt(r['generated_tok_per_s'], ',.0f')} | {fmt(r.get('score_s_per_step'))} | {fmt(r['update_s_per_step'])} | {fmt(r['update_tok_per_s'], ',.0f')} | "
        f"{fmt(None if r['update_mfu'] is None else 100 * r['update_mfu'], '.1f')} |"
        for kind, r in ((k, results[k]) for k in kinds)
    )
    if results.get("ratio_tepo_over_stock") is None:
        notes = "**Step-time ratio tepo / stock: not measured** (one trainer has no measured step)."
    else:
        notes = f"**Step-time ratio tepo / stock: {results['ratio_tepo_over_stock']:.3f}** (target <= 1.05)."
    if results.get("ratio_without_generation") is not None:
        notes += (" Without generation (TRL's `_generate`, which both trainers share unchanged): "
                  f"{results['ratio_without_generation']:.3f}.")
    for kind in kinds:
        times = results[kind].get("step_s") or []
        if times and max(times) > 1.5 * statistics.median(times):
            notes += (f"\n**Warning:** a measured {kind} step took {max(times):.1f} s against a median of "
                      f"{statistics.median(times):.1f} s (a recompilation or a stall): per-step times "
                      f"{', '.join(f'{t:.1f}' for t in times)} s.")
    stats = results.get("compile_stats")
    if stats:
        notes += (f"\ntorch.compile: {stats['unique_graphs']} graph(s) compiled, {stats['graph_breaks']} graph break(s), "
                  f"{stats['frames_not_compiled']} frame(s) left eager (an error or a skip; reasons in the JSON and the log).")
    if any(results[k].get("warmup_step_s") for k in kinds):
        warm = ", ".join(f"{k} {sum(results[k].get('warmup_step_s', [])):.1f} s" for k in kinds)
        notes += f"\nWarm-up steps in all (not counted; with torch.compile they hold the compilation): {warm}."
    memory = ""
    if any(results[k].get("peak_memory_gib") for k in kinds):
        memory = " Peak GPU memory: " + ", ".join(f"{k} {results[k]['peak_memory_gib']:.1f} GiB" for k in kinds
                                                   if results[k].get("peak_memory_gib")) + "."
    partial = f"\n**Partial run: {results['partial']}.**\n" if results.get("partial") else ""
    return f"""## Trainer step time: TEPOTrainer (tepo) vs stock TRL GRPOTrainer ({'GPU' if s.device == 'cuda' else 'CPU'})
{partial}
Machine: {results['machine']}. Model: {results['model']}, {results['params'] / 1e6:.1f} M parameters.
Batch: {s.num_prompts} prompts x {s.num_generations} completions per rollout, {s.batch_size} completions per optimiser step
(micro-batches of {getattr(s, 'micro_batch', s.batch_size)}, gradients accumulated over {getattr(s, 'grad_accum', 1)}),
{s.steps_per_generation} optimiser step(s) per rollout, {s.max_completion_length} completion tokens{' (forced)' if s.force_length else ''},
{'chat prompts' if s.prompt_tokens is None else f'{s.prompt_tokens}-token prompts'}, bf16 autocast, gradient checkpointing {'on' if getattr(s, 'gradient_checkpointing', False) else 'off'},
torch.compile {('on, per decoder layer' if getattr(s, 'regional_compile', False) else 'on') if getattr(s, 'torch_compile', False) else 'off'}, Liger kernels {'on' if getattr(s, 'use_liger_kernel', False) else 'off'}, tepo's shared_prefix {getattr(s, 'shared_prefix', 'false (before it existed)')}.
{s.steps} measured steps per trainer per round x {s.repeats} round(s), after {s.steps_per_generation} warm-up step(s); trainers alternate.{memory}

| trainer | step s (mean) | step s (median) | generate s/step | generated tok/s | scoring s/step | update s/step | update tok/s | update MFU % |
|---|---|---|---|---|---|---|---|---|
{rows}

{notes}
Scoring = the rest of the rollout after generation (rewards; old-policy log-probs when a rollout serves
several optimiser steps). Update phase = step time minus the rollout: forward+backward of every micro-batch and
the optimiser step. MFU counts 6 x params x update tokens (prompt + completion; not the recomputation of gradient
checkpointing) against {fmt(peak, '.0f') + ' TFLOP/s bf16' if peak else 'no known peak (CPU)'}.
Command: `{results.get('command', 'python bench/train_step.py')}`
"""


def publish(results: dict, *, write: bool) -> None:
    md = render(results)
    print(md)
    if write:
        write_section("train_step_gpu" if results["settings"]["device"] == "cuda" else "train_step_cpu", md)


if __name__ == "__main__":
    sys.exit(main())
