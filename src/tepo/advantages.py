"""Group-relative advantages (GRPO family) from outcome rewards.

    rewards (G*P,): P groups of `group_size` consecutive completions of the same prompt
    A = R - mean_group(R), then
        scale="group": / (std_group(R) + eps)    (GRPO; std Bessel-corrected, as in verl and TRL)
        scale="batch": / (std_batch(R) + eps)    (std of all rewards of the call, Bessel-corrected)
        scale="none":  as is                     (Dr. GRPO)
    A group of size 1 gets advantage 0 (there is nothing to compare with), and a reward equal to
    its group mean gets 0 even when eps = 0 and the std is 0 (no 0/0 NaN).
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

SCALES = ("group", "batch", "none")


def group_advantages(
    rewards: Union[Tensor, Sequence[float]],
    group_size: int,
    scale: str = "group",
    eps: float = 1e-6,
) -> Tensor:
    """Advantages (G*P,) for rewards (G*P,) in consecutive groups of `group_size`.

    float64 rewards give float64 advantages; anything else float32. Raises ValueError for a
    length not divisible by group_size, a bad scale, a non-1-D or non-finite reward tensor.
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r} is not one of {', '.join(SCALES)}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    rewards = torch.as_tensor(rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (G*P,), got shape {tuple(rewards.shape)}")
    n = rewards.numel()
    if n % group_size:
        raise ValueError(
            f"rewards has {n} entries, not divisible by group_size={group_size}; "
            "pass group_size consecutive rewards per prompt"
        )
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    rewards = rewards.detach().to(dtype)
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards must be finite (found NaN or inf)")
    if group_size == 1 or n == 0:
        return torch.zeros_like(rewards)
    groups = rewards.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = _divide(centred, groups.std(dim=1, keepdim=True, correction=1) + eps)
    elif scale == "batch":
        centred = _divide(centred, rewards.std(correction=1) + eps)
    return centred.reshape(-1)


def _divide(centred: Tensor, scale: Tensor) -> Tensor:
    # A zero std means every centred reward of that group is exactly 0; keep 0 instead of 0/0.
    return torch.where(centred == 0, 0.0, centred / scale)
