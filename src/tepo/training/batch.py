"""What a training batch is: its model inputs, the tokens the loss counts, the micro-batches of an
optimiser step. A leaf module (torch only): the trainer, the controls and the distributed helpers
all read a batch through these rules, so each rule is written once.

A batch is TRL's rollout dict for one micro-batch: `prompt_ids`/`prompt_mask` (B, P, left-padded),
`completion_ids`/`completion_mask` (B, C), optionally `tool_mask` (B, C), `advantages` (B,),
`old_per_token_logps`/`old_entropy`/`ref_per_token_logps` (B, C), and multimodal inputs.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

# Model inputs other than ids/mask that TRL's scoring helper forwards (multimodal models); passed through as is.
FORWARD_KEYS = (
    "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
    "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids",
)


def sequences(batch: Mapping[str, Any]) -> tuple[Tensor, Tensor, int]:
    """(input_ids (B, P + C), attention_mask (B, P + C), C): prompt and completion side by side, and the
    number of trailing positions that are scored."""
    completion_ids = batch["completion_ids"]
    input_ids = torch.cat([batch["prompt_ids"], completion_ids], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    return input_ids, attention_mask, completion_ids.size(1)


def extra_model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The multimodal inputs of `batch` (FORWARD_KEYS), None where absent."""
    return {k: batch.get(k) for k in FORWARD_KEYS}


def has_extra_model_inputs(batch: Mapping[str, Any]) -> bool:
    return any(batch.get(k) is not None for k in FORWARD_KEYS)


def loss_mask(batch: Mapping[str, Any]) -> Tensor:
    """(B, C) the tokens the loss counts: completion_mask, times tool_mask when present (as TRL)."""
    mask = batch["completion_mask"]
    tool_mask = batch.get("tool_mask")
    return mask if tool_mask is None else mask * tool_mask


def optimizer_step_window(micro_step: int, grad_accum: int, steps_per_generation: int) -> range | None:
    """Positions, in TRL's buffer of `steps_per_generation` micro-batches of one rollout, of the
    micro-batches that form the optimiser step containing micro-batch number `micro_step` (TRL's
    `_step`, counted from 0 on this process). None when optimiser steps can straddle two rollouts
    (steps_per_generation not a multiple of grad_accum): the later rollout does not exist yet."""
    for name, value, low in (("micro_step", micro_step, 0), ("grad_accum", grad_accum, 1),
                             ("steps_per_generation", steps_per_generation, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name}={value!r} must be an integer >= {low}")
    if steps_per_generation % grad_accum:
        return None
    index = micro_step % steps_per_generation
    start = index - index % grad_accum
    return range(start, start + grad_accum)


def step_micro_batches(buffer: Sequence[Mapping[str, Any]] | None, micro_step: int, grad_accum: int,
                       steps_per_generation: int) -> list[Mapping[str, Any]] | None:
    """The micro-batches (in order) of the optimiser step that holds micro-batch `micro_step`, from a
    rollout buffer of `steps_per_generation` micro-batches; None where the buffer cannot tell
    (no buffer, or a step straddling two rollouts)."""
    window = optimizer_step_window(micro_step, grad_accum, steps_per_generation)
    if window is None or buffer is None or len(buffer) != steps_per_generation:
        return None
    return [buffer[i] for i in window]
