"""Soft overlong punishment (DAPO eq. 13; TRL's `get_soft_overlong_punishment`), a reward term.

With L_max the length budget and L_cache the soft band before it, a completion of |y| tokens gets

    R_len(y) = 0                              if |y| <= L_max - L_cache
             = (L_max - L_cache - |y|) / L_cache   if L_max - L_cache < |y| <= L_max
             = -1                             if |y| > L_max

added to the task reward (`tepo train --soft_overlong_cache L_cache [--soft_overlong_max_len L_max]`,
L_max defaulting to max_completion_length). L_cache = 0 punishes only |y| > L_max.
"""

from __future__ import annotations


def soft_overlong_penalty(length: int, *, max_len: int, cache: int) -> float:
    """R_len of one completion of `length` tokens (see the module docstring)."""
    if length <= max_len - cache:
        return 0.0
    if length <= max_len:
        return (max_len - cache - length) / cache
    return -1.0


class SoftOverlongPunishment:
    """A TRL reward function: one R_len per completion, from its token ids. Picklable (a class, not a closure)."""

    __name__ = "soft_overlong_punishment"

    def __init__(self, max_len: int, cache: int):
        for name, value, low in (("max_len", max_len, 1), ("cache", cache, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"soft overlong punishment: {name}={value!r} must be an integer >= {low}")
        if cache > max_len:
            raise ValueError(f"soft overlong punishment: cache={cache} is longer than max_len={max_len}")
        self.max_len, self.cache = max_len, cache

    def __call__(self, completions=None, completion_ids=None, **kwargs) -> list[float]:
        if completion_ids is None:
            raise ValueError("soft overlong punishment needs completion_ids (TRL passes them to reward functions)")
        return [soft_overlong_penalty(len(ids), max_len=self.max_len, cache=self.cache) for ids in completion_ids]
