"""One value per optimiser step for each metric of the loss, as if the step were one micro-batch.

`policy_loss` and the `TEPOTrainer.token_weights` pieces return metrics over the micro-batch they
are given. An optimiser step is made of several micro-batches (gradient accumulation) on several
processes; what is logged for the step is what one process would log with the whole step in one
micro-batch. The convention, by the metric's name (every metric follows it, so a new piece's
metrics need nothing more than a fitting name):

- a name ending in ``_min``: the minimum over micro-batches and processes;
- a name ending in ``_max``: the maximum;
- any other name: the mean over micro-batches and processes weighted by each one's number of valid
  tokens (completion_mask x tool_mask), which turns per-token means (entropy_mean, clip_frac,
  ratio_mean, approx_kl, kl_mask_frac, ...) into the token mean over the whole step.

Micro-batches with no valid token are left out (their weight is 0; their min/max are not values),
and so are NaN values, per metric (a metric that is NaN everywhere is NaN). A metric that is not a
per-token mean (cov_selected, a count per micro-batch) comes out as the token-weighted mean of its
micro-batch values.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch


def reduction(name: str) -> str:
    """"min", "max" or "mean" (token-weighted): how metric `name` combines over a step."""
    if name.endswith("_min"):
        return "min"
    if name.endswith("_max"):
        return "max"
    return "mean"


class StepMetrics:
    """Running combination of one step's micro-batch metrics (see the module docstring)."""

    def __init__(self) -> None:
        self._sum: dict[str, float] = {}  # mean: sum of weight * value; min / max: the extreme so far
        self._weight: dict[str, float] = {}  # mean: sum of the weights of non-NaN values

    def add(self, metrics: Mapping[str, float], weight: float) -> None:
        """Fold in one micro-batch's metrics; `weight` is its number of valid tokens."""
        weight = float(weight)
        if not weight >= 0:
            raise ValueError(f"weight={weight!r} must be a token count >= 0")
        for name, value in metrics.items():
            value = float(value)
            self._sum.setdefault(name, math.nan)
            self._weight.setdefault(name, 0.0)
            if math.isnan(value) or weight == 0:
                continue
            kind = reduction(name)
            if kind == "mean":
                total = 0.0 if math.isnan(self._sum[name]) else self._sum[name]
                self._sum[name] = total + weight * value
                self._weight[name] += weight
            else:
                best = self._sum[name]
                self._sum[name] = value if math.isnan(best) else (min if kind == "min" else max)(best, value)

    def values(self) -> dict[str, float]:
        """Each metric's value for the step so far."""
        out = {}
        for name, total in self._sum.items():
            if reduction(name) == "mean":
                out[name] = total / self._weight[name] if self._weight[name] > 0 else math.nan
            else:
                out[name] = total
        return out

    def clear(self) -> None:
        self._sum.clear()
        self._weight.clear()


def gather_micro_batch(accelerator, metrics: Mapping[str, float], weight: float) -> list[tuple[dict[str, float], float]]:
    """Every process's (metrics, weight) for the current micro-batch; [(metrics, weight)] with one
    process. Collective with several: every process calls it, with the same metric names."""
    if accelerator.num_processes == 1:
        return [(dict(metrics), float(weight))]
    names = sorted(metrics)
    local = torch.tensor([[float(weight), *(float(metrics[n]) for n in names)]], dtype=torch.float64,
                         device=accelerator.device)
    rows = accelerator.gather(local).tolist()
    return [(dict(zip(names, row[1:])), row[0]) for row in rows]
