"""Exact token-mean losses across processes and gradient-accumulation micro-batches.

`tepo.objectives.policy_loss` aggregates over the micro-batch it is given. One optimiser step then
back-propagates, with W data-parallel processes (DDP, DeepSpeed, FSDP all average gradients over
ranks) and k accumulated micro-batches (the trainer divides each loss by k):

    grad = (1/W) sum_ranks sum_micro (1/k) grad loss_micro

- seq-mean-* modes (GRPO, GSPO, Dr. GRPO): loss_micro averages over its B rows, and every micro-batch
  of every rank holds the same B rows (per_device_train_batch_size), so this is already the mean
  over all W*k*B rows of the step: exact, nothing to do.
- token-mean (DAPO, TEPO, Clip-Cov, KL-Cov): loss_micro = S_micro / N_micro (sum over its tokens /
  its token count). The sum above weights each micro-batch's tokens by 1/(W k N_micro), not by
  1/N_step, so micro-batches with few tokens count for too much. Multiplying loss_micro by

        token_mean_rescale(N_micro, N_step, W, k) = N_micro * W * k / N_step

  turns it into S_micro * W * k / N_step, and the sum becomes sum(S) / N_step: the token-mean over
  every token of the optimiser step, on every process. TEPO's KL-mask term divides by N too, so the
  same factor makes it exact (with agg=token-mean, TEPO's default).

N_step is gathered across processes (`sum_across_processes`); over accumulated micro-batches it is
read from TRL's rollout buffer (`tepo.training.batch.step_micro_batches`). TRL's own "dapo" loss uses the rollout's
global count divided evenly between its optimiser steps, which is exact only with one optimiser step
per rollout; the buffer gives the exact count whenever an optimiser step does not straddle two
rollouts (steps_per_generation a multiple of gradient_accumulation_steps), and that estimate is the
fallback otherwise. Tensor-parallel ranks that see the same batch would be counted in both W and
N_step, which cancels (reasoned, not tested: nothing here runs tensor parallelism).

What stays per rank and per micro-batch (not made global here): Clip-Cov / KL-Cov's covariance
means and their number of selected tokens k = max(1, int(cov_ratio * N_micro)); the TEPO KL mask
term when agg is not token-mean; the metrics `policy_loss` returns (the trainer combines them over the step: `tepo.training.step_metrics`).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from tepo.training.batch import loss_mask


def token_mean_rescale(local_tokens: float | Tensor, global_tokens: float | Tensor, world_size: int,
                       micro_batches: int = 1) -> float:
    """Factor for one micro-batch's token-mean loss: local_tokens * world_size * micro_batches / global_tokens.

    local_tokens: valid tokens of this micro-batch on this process (the N its loss divided by).
    global_tokens: valid tokens of the whole optimiser step, all processes and micro-batches.
    world_size: processes whose gradients are averaged; micro_batches: micro-batches accumulated
    into the step (the trainer divides each loss by it). With no valid token anywhere the losses
    are all 0 and the factor is 0.
    """
    local, total = float(local_tokens), float(global_tokens)
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size={world_size!r} must be an integer >= 1")
    if not isinstance(micro_batches, int) or isinstance(micro_batches, bool) or micro_batches < 1:
        raise ValueError(f"micro_batches={micro_batches!r} must be an integer >= 1")
    if not local >= 0 or not total >= 0:  # also refuses NaN
        raise ValueError(f"token counts must be >= 0, got local_tokens={local!r}, global_tokens={total!r}")
    if local > total:
        raise ValueError(
            f"local_tokens={local:g} > global_tokens={total:g}: the global count must include this "
            "micro-batch (sum it over all processes and accumulated micro-batches)"
        )
    if total == 0:
        return 0.0
    return local * world_size * micro_batches / total


def sum_across_processes(accelerator, value: float | int | Tensor) -> Tensor:
    """0-dim int64 sum of `value` (a count) over all processes of `accelerator`; the value itself
    when there is one process. Every process must call it (it is a collective)."""
    device = value.device if isinstance(value, Tensor) else accelerator.device
    count = torch.as_tensor(value, device=device).detach().reshape(()).round().to(torch.int64)
    if accelerator.num_processes == 1:
        return count
    return accelerator.reduce(count, reduction="sum")


def step_token_count(trainer, inputs: Mapping[str, Any]) -> Tensor | float:
    """Valid tokens of the current optimiser step over all processes and accumulated micro-batches.

    Exact from TRL's rollout buffer (`trainer.step_micro_batches()`) when the step lies inside one rollout; otherwise TRL's estimate, the rollout's global count
    (`inputs["num_items_in_batch"]`) shared evenly between its micro-batches. Collective: every
    process must call it for every micro-batch."""
    spg = int(trainer.args.steps_per_generation)
    k = int(trainer.current_gradient_accumulation_steps)
    micro_batches = trainer.step_micro_batches()
    if micro_batches is not None:
        local = sum(loss_mask(batch).sum() for batch in micro_batches)
        return sum_across_processes(trainer.accelerator, local)
    return inputs["num_items_in_batch"] * k / spg


def token_mean_scale(trainer, inputs: Mapping[str, Any]) -> float:
    """Factor for the token-mean loss `policy_loss` returned for `inputs` (one micro-batch) so that
    the optimiser step's gradient is that of the token-mean over all its tokens (see the module
    docstring). 1.0 outside training and with one process and no accumulation. Collective when
    there are several processes: call it on every process, for every training micro-batch."""
    if not trainer.model.training:
        return 1.0
    world = int(trainer.accelerator.num_processes)
    k = int(trainer.current_gradient_accumulation_steps)
    if world == 1 and k == 1:
        return 1.0
    local = loss_mask(inputs).sum()
    return token_mean_rescale(local, step_token_count(trainer, inputs), world, k)


def process_group_size() -> int:
    """Processes in torch.distributed's default group: 0 when none is open. A colocated vLLM
    engine opens one of size 1 in a single-process run (TRL's colocate mode)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 0


def shutdown_distributed(*, synchronise: bool = True) -> bool:
    """Close torch.distributed's default process group, if one is open; True if one was.

    With `synchronise`, every process first waits at a barrier, so that none tears down its
    connections while a peer still talks to it; pass False on the way out of an error, when the
    peers may never arrive."""
    import torch.distributed as dist

    if not process_group_size():
        return False
    if synchronise:
        dist.barrier()
    dist.destroy_process_group()
    return True


def end_process_group_run(code: int) -> None:
    """End a process whose run used a process group, with exit status `code`, and never return.

    In order: a barrier (several processes: none leaves while a peer still talks to it); the
    `atexit` handlers, so that whoever opened something closes it first (a colocated vLLM engine
    shuts down and closes its own groups: destroyed under it, its shutdown prints a traceback);
    the default group closed, if still open; stdout and stderr flushed; `os._exit`, without the
    interpreter's teardown. With the group closed and the teardown still to come, a gloo process
    once aborted (SIGABRT, exit code -6, "terminate called without an active exception") after its
    work was done and written, and the launcher reported a failed run. Everything a run writes is
    closed before this point (files are written under `with`); logging, trackers and the
    math-verify worker close in their `atexit` handlers."""
    import atexit
    import os
    import sys

    import torch.distributed as dist

    if process_group_size() > 1:
        dist.barrier()
    atexit._run_exitfuncs()
    if process_group_size():
        dist.destroy_process_group()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken: nothing more can reach it anyway
            pass
    os._exit(code)
