"""The objective registry and hyper-parameter resolution.

An objective is one function ``fn(batch: PolicyBatch, hp: dict) -> ObjectiveTerms`` registered with
``@register_objective(name, **defaults)``. ``defaults`` lists the hyper-parameters specific to it
(and may override a shared default such as ``agg``); the shared ones (``SHARED_DEFAULTS``) are
accepted by every objective. ``policy_loss`` does everything around the function: input checks,
KL-to-reference, aggregation, entropy bonus, metrics.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable

from tepo.objectives._common import AGG_MODES, KL_ESTIMATORS
from tepo.objectives.errors import (
    InvalidHyperparameterError,
    UnknownHyperparameterError,
    UnknownObjectiveError,
)

# Accepted by every objective. max_len=None means "T, the padded length of the call".
SHARED_DEFAULTS: dict[str, Any] = {
    "agg": "token-mean",
    "max_len": None,
    "beta_kl": 0.0,
    "kl_estimator": "k3",
    "entropy_coef": 0.0,
}


def _number(name: str, value: Any) -> float:
    # bool is an int subclass; True as a coefficient is almost surely a mistake
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidHyperparameterError(f"hyper-parameter {name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise InvalidHyperparameterError(f"hyper-parameter {name} must be finite, got {value!r}")
    return value


def _nonnegative(name: str, value: Any) -> float:
    value = _number(name, value)
    if value < 0:
        raise InvalidHyperparameterError(f"hyper-parameter {name} must be >= 0, got {value!r}")
    return value


def _positive(name: str, value: Any) -> float:
    value = _number(name, value)
    if value <= 0:
        raise InvalidHyperparameterError(f"hyper-parameter {name} must be > 0, got {value!r}")
    return value


def _boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidHyperparameterError(f"hyper-parameter {name} must be True or False, got {value!r}")
    return value


def _clip_low(name: str, value: Any) -> float:
    value = _number(name, value)
    if not 0.0 <= value <= 1.0:
        raise InvalidHyperparameterError(
            f"hyper-parameter {name} must be in [0, 1] (the ratio is clipped below at 1 - {name}), got {value!r}"
        )
    return value


def _fraction(name: str, value: Any) -> float:
    value = _number(name, value)
    if not 0.0 < value <= 1.0:
        raise InvalidHyperparameterError(
            f"hyper-parameter {name} is a fraction of the valid tokens and must be in (0, 1], got {value!r}"
        )
    return value


def _choice(options: tuple[str, ...]) -> Callable[[str, Any], str]:
    def check(name: str, value: Any) -> str:
        if value not in options:
            raise InvalidHyperparameterError(
                f"hyper-parameter {name}={value!r} is not one of {', '.join(options)}"
            )
        return value

    return check


def _max_len(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise InvalidHyperparameterError(
            f"hyper-parameter {name} must be a positive integer (or None for T), got {value!r}"
        )
    return int(value)


# name -> check(name, value) -> normalised value. A new objective that adds a hyper-parameter may
# add its check here; names without one are passed through unchecked.
HPARAM_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "clip_low": _clip_low,
    "clip_high": _nonnegative,
    "agg": _choice(AGG_MODES),
    "max_len": _max_len,
    "beta_kl": _nonnegative,
    "kl_estimator": _choice(KL_ESTIMATORS),
    "entropy_coef": _number,
    "tepo_kl_coef": _nonnegative,
    "cov_ratio": _fraction,
    "cov_lb": _number,
    "cov_ub": _number,
    "kl_cov_coef": _nonnegative,
    "sapo_temperature_pos": _positive,
    "sapo_temperature_neg": _positive,
    "vespo_k_pos": _nonnegative,
    "vespo_lambda_pos": _positive,
    "vespo_k_neg": _nonnegative,
    "vespo_lambda_neg": _positive,
    "log_clip_low": _nonnegative,
    "log_clip_high": _nonnegative,
    "gpg_alpha_rescale": _boolean,
}


# How rewards become advantages for an objective (tepo.advantages.group_advantages' `scale`).
ADVANTAGE_SCALES = ("group", "batch", "none")


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str
    fn: Callable
    defaults: dict[str, Any] = field(default_factory=dict)
    advantage_scale: str = "group"  # the scale the method is defined with; a user's explicit choice wins

    def resolve(self, given: dict[str, Any]) -> dict[str, Any]:
        """Defaults overlaid with `given` (None = default), checked."""
        hp = dict(self.defaults)
        for key, value in given.items():
            if key not in hp:
                # The trainer passes every config field, unset ones as None: a None for a name that
                # some objective uses is "not set", not a mistake.
                if value is None and key in _all_hparam_names():
                    continue
                raise UnknownHyperparameterError(
                    f"objective {self.name!r} has no hyper-parameter {key!r}; "
                    f"valid: {', '.join(sorted(hp))}"
                )
            if value is None:
                continue
            check = HPARAM_CHECKS.get(key)
            hp[key] = check(key, value) if check else value
        if "cov_lb" in hp and "cov_ub" in hp and not hp["cov_lb"] < hp["cov_ub"]:
            raise InvalidHyperparameterError(
                f"objective {self.name!r} needs cov_lb < cov_ub, got cov_lb={hp['cov_lb']!r}, cov_ub={hp['cov_ub']!r}"
            )
        return hp


_REGISTRY: dict[str, ObjectiveSpec] = {}


def _all_hparam_names() -> set[str]:
    names = set(SHARED_DEFAULTS) | set(HPARAM_CHECKS)
    for spec in _REGISTRY.values():
        names |= set(spec.defaults)
    return names


def register_objective(name: str, *, advantage_scale: str = "group", **defaults: Any) -> Callable[[Callable], Callable]:
    """Register ``fn(batch, hp) -> ObjectiveTerms`` as objective `name`.

    `defaults` are the objective's own hyper-parameters with their default values; they may also
    override a shared default (e.g. ``agg="seq-mean-token-mean"``). Defaults are checked now, so a
    bad default fails at import time. `advantage_scale` is how the method scales its group-relative
    advantages (one of ADVANTAGE_SCALES: "group" for GRPO and most others, "none" for Dr. GRPO).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"objective name must be a non-empty string, got {name!r}")
    if advantage_scale not in ADVANTAGE_SCALES:
        raise ValueError(f"advantage_scale={advantage_scale!r} is not one of {', '.join(ADVANTAGE_SCALES)}")

    def decorate(fn: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"objective {name!r} is already registered (by {_REGISTRY[name].fn.__module__})")
        full = dict(SHARED_DEFAULTS)
        for key, value in defaults.items():
            check = HPARAM_CHECKS.get(key)
            full[key] = check(key, value) if (check and value is not None) else value
        _REGISTRY[name] = ObjectiveSpec(name=name, fn=fn, defaults=full, advantage_scale=advantage_scale)
        return fn

    return decorate


def get_objective(name: str) -> ObjectiveSpec:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownObjectiveError(
            f"unknown objective {name!r}; known: {', '.join(list_objectives())}"
        ) from None


def list_objectives() -> list[str]:
    """Names of the registered objectives, sorted."""
    return sorted(_REGISTRY)


def default_hparams(name: str) -> dict[str, Any]:
    """Every hyper-parameter objective `name` accepts, with its default (max_len None = T)."""
    return dict(get_objective(name).defaults)


def advantage_scale(name: str) -> str:
    """The advantage scale objective `name` is defined with ("group", "batch" or "none")."""
    return get_objective(name).advantage_scale
