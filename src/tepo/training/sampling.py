"""Dynamic sampling (DAPO): keep only prompt groups whose rewards disagree.

A group whose G completions all get the same reward has zero advantage everywhere, so it adds no
policy gradient, only tokens to the denominator. These helpers work on the dict of tensors TRL's
`_generate_and_score_completions` returns (rows in groups of G consecutive completions); the
trainer calls them to filter a rollout batch and to splice in freshly generated groups.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Padding side and value of every (B, ...) key we know how to splice; anything else is refused.
LEFT_PADDED = ("prompt_ids", "prompt_mask")
RIGHT_PADDED = (
    "completion_ids",
    "completion_mask",
    "old_per_token_logps",
    "ref_per_token_logps",
    "sampling_per_token_logps",
    "old_entropy",
)
PER_ROW = ("advantages",)
RECOMPUTED = ("num_items_in_batch",)


def varied_groups(rewards: Tensor, group_size: int) -> Tensor:
    """rewards (G*P,) -> bool (P,): True where a group's rewards are not all equal (NaN-free rows).

    A group whose rewards are all NaN (unscorable) or all equal counts as not varied."""
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards must be 1-D with a multiple of {group_size} entries, got shape {tuple(rewards.shape)}")
    grouped = rewards.view(-1, group_size).float()
    finite = torch.nan_to_num(grouped, nan=float("inf"))  # a NaN differs from any number, like an unscorable row
    lo, hi = finite.min(dim=1).values, finite.max(dim=1).values
    all_nan = torch.isnan(grouped).all(dim=1)
    return (hi > lo) & ~all_nan


def rows_of_groups(group_index: Tensor, group_size: int) -> Tensor:
    """Group indices (K,) -> row indices (K*G,) of those groups, in order."""
    return (group_index.view(-1, 1) * group_size + torch.arange(group_size, device=group_index.device)).reshape(-1)


def _check_keys(batch: dict) -> None:
    unknown = [k for k in batch if k not in LEFT_PADDED + RIGHT_PADDED + PER_ROW + RECOMPUTED]
    if unknown:
        raise ValueError(
            f"dynamic_sampling supports text-only rollouts; the batch has keys it cannot splice: {unknown}. "
            "Set dynamic_sampling=False for this setup."
        )


def select_rows(batch: dict, rows: Tensor) -> dict:
    """The sub-batch of `rows` (a LongTensor of row indices)."""
    _check_keys(batch)
    out = {}
    for key, value in batch.items():
        if key in RECOMPUTED or value is None:
            continue
        out[key] = value[rows.to(value.device)]
    return out


def _pad_to(t: Tensor, width: int, value: float, left: bool) -> Tensor:
    missing = width - t.size(1)
    if missing == 0:
        return t
    pad = t.new_full((t.size(0), missing), value)
    return torch.cat([pad, t], dim=1) if left else torch.cat([t, pad], dim=1)


def concat_batches(batches: list[dict], *, pad_token_id: int) -> dict:
    """Stack sub-batches row-wise, padding prompts on the left and completions on the right.

    Keys present in only some batches are an error (all rounds come from one trainer setup)."""
    batches = [b for b in batches if b]
    if not batches:
        raise ValueError("concat_batches needs at least one non-empty batch")
    keys = set(batches[0])
    for b in batches[1:]:
        if set(b) != keys:
            raise ValueError(f"sub-batches disagree on keys: {sorted(keys)} vs {sorted(b)}")
    out = {}
    for key in batches[0]:
        parts = [b[key] for b in batches]
        if key in LEFT_PADDED or key in RIGHT_PADDED:
            width = max(p.size(1) for p in parts)
            value = pad_token_id if key.endswith("_ids") else 0
            parts = [_pad_to(p, width, value, left=key in LEFT_PADDED) for p in parts]
        out[key] = torch.cat(parts, dim=0)
    return out


def trim_prompt_padding(batch: dict) -> dict:
    """Drop the columns that are padding in every row (left of prompts, right of completions), so
    a spliced batch is no wider than it needs to be."""
    out = dict(batch)
    pm = out["prompt_mask"]
    keep_from = int((pm.sum(dim=0) > 0).nonzero().min()) if pm.any() else pm.size(1)
    for key in LEFT_PADDED:
        out[key] = out[key][:, keep_from:]
    cm = out["completion_mask"]
    used = (cm.sum(dim=0) > 0).nonzero()
    keep_to = int(used.max()) + 1 if used.numel() else 0
    for key in RIGHT_PADDED:
        if key in out:
            out[key] = out[key][:, :keep_to]
    return out
