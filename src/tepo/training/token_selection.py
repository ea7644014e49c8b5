"""High-entropy token selection ("Beyond the 80/20 rule", arXiv 2506.01939; TRL's `top_entropy_quantile`).

Only the top-q fraction of tokens by entropy carry the policy gradient: with tau the (1 - q)
quantile (linear interpolation, `torch.quantile`'s) of the entropies of the step's valid tokens,

    w[i,t] = 1[entropy[i,t] >= tau] * mask[i,t]                        (B, T), detached

a `TEPOTrainer.token_weights` piece, so it works with every objective (docs/controls.md).

Which tokens the quantile is over: all valid tokens of the optimiser step, on every process. TRL
takes each micro-batch's tokens (across processes), which is the step's only without gradient
accumulation. Here, with gradient_accumulation_steps = k > 1, the first micro-batch of a step
scores the step's other k - 1 micro-batches (already in TRL's rollout buffer) with a no-grad
forward pass; the parameters do not change within a step, so those are exactly the entropies
their own loss passes will see. The threshold is kept for the rest of the step. Cost: one
forward pass without gradient per micro-batch, only when k > 1 (none at k = 1, where this is TRL's
rule exactly). It needs the step's micro-batches to be in one rollout buffer: TEPOConfig requires
steps_per_generation to be a multiple of gradient_accumulation_steps.
"""

from __future__ import annotations

import torch
from torch import Tensor

# torch.quantile refuses inputs of more than 2**24 elements; above that we sort ourselves.
_TORCH_QUANTILE_MAX = 2**24


def quantile(values: Tensor, p: float) -> Tensor:
    """The p-quantile of a 1-D tensor with linear interpolation between order statistics
    (numpy's / torch.quantile's default): sorted v, h = p (n - 1), v[floor h] + (h - floor h)(v[ceil h] - v[floor h])."""
    if values.numel() <= _TORCH_QUANTILE_MAX:
        return torch.quantile(values, p)
    v = values.sort().values
    h = p * (v.numel() - 1)
    lo = int(h // 1)
    hi = min(lo + 1, v.numel() - 1)
    return v[lo] + (h - lo) * (v[hi] - v[lo])


def high_entropy_mask(entropy: Tensor, mask: Tensor, threshold: Tensor | float) -> Tensor:
    """(B, T) bool: valid tokens whose entropy is >= threshold (ties kept, as in TRL)."""
    return (entropy * mask.to(entropy.dtype) >= threshold) & mask.bool()


def _at_least_float32(values: Tensor) -> Tensor:
    """bf16/fp16 entropies are thresholded in float32 (as TRL does); float64 ones stay float64."""
    return values.to(torch.promote_types(values.dtype, torch.float32))


def _gather_valid(trainer, values: Tensor) -> Tensor:
    """The 1-D `values` of every process, concatenated (lengths may differ between processes)."""
    if trainer.accelerator.num_processes == 1:
        return values
    pad = -1.0  # entropies are >= 0, so the pad cannot be mistaken for one
    padded = trainer.accelerator.pad_across_processes(values, dim=0, pad_index=pad)
    gathered = trainer.accelerator.gather(padded)
    return gathered[gathered != pad]


class HighEntropyTokenSelection:
    """Token-weight piece: train on the top `quantile` fraction of the step's tokens by entropy.

    Metrics: entropy_select_frac (fraction of the valid tokens kept), entropy_select_threshold (tau).
    """

    def __init__(self, quantile: float):
        if not 0.0 <= quantile <= 1.0:
            raise ValueError(f"top_entropy_quantile={quantile!r} must be in [0, 1]")
        self.quantile = float(quantile)
        self._threshold: Tensor | None = None  # of the current optimiser step (gradient accumulation)

    def __call__(self, trainer, inputs, *, logp, entropy, mask):
        valid = mask.bool()
        training = trainer.model.training
        accumulation = trainer.current_gradient_accumulation_steps if training else 1
        first_of_step = not training or accumulation == 1 or trainer.micro_step % accumulation == 0
        if first_of_step:
            local = [_at_least_float32(entropy[valid])]
            if accumulation > 1:
                local += [e for e in self._other_micro_batches(trainer, accumulation)]
            step_entropies = _gather_valid(trainer, torch.cat(local))
            if step_entropies.numel() == 0:
                self._threshold = None
            else:
                self._threshold = quantile(step_entropies, 1.0 - self.quantile)
        if self._threshold is None:  # no valid token anywhere in the step
            selected = torch.zeros_like(valid)
            threshold = float("nan")
        else:
            selected = high_entropy_mask(entropy, mask, self._threshold)
            threshold = float(self._threshold)
        n_valid = int(valid.sum())
        metrics = {
            "entropy_select_frac": float(selected.sum()) / n_valid if n_valid else float("nan"),
            "entropy_select_threshold": threshold,
        }
        return selected.to(logp.dtype), metrics

    @staticmethod
    def _other_micro_batches(trainer, accumulation: int) -> list[Tensor]:
        """Valid-token entropies (1-D, at least float32) of the step's micro-batches after the current one,
        scored by the current policy without gradient."""
        from trl.models.utils import disable_gradient_checkpointing

        from tepo.training.batch import loss_mask

        spg = trainer.args.steps_per_generation
        buffer = trainer.rollout_buffer
        out = []
        model = trainer.model
        with torch.no_grad(), disable_gradient_checkpointing(model, trainer.args.gradient_checkpointing_kwargs):
            for j in range(1, accumulation):
                batch = buffer[(trainer.micro_step + j) % spg]
                _, entropy = trainer.score_batch(model, batch)
                out.append(_at_least_float32(entropy[loss_mask(batch).bool()]))
        return out
