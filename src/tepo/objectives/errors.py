"""Errors raised by `tepo.objectives`.

Every error is a `ValueError`; lookups that fail (an unknown objective or hyper-parameter name) are
also `KeyError`s. Messages name what is wrong and what would be right.
"""

from __future__ import annotations


class ObjectiveError(ValueError):
    """Base class: a policy-loss call that cannot be computed as asked."""

    def __str__(self) -> str:  # KeyError would quote the message; keep it readable
        return str(self.args[0]) if self.args else ""


class UnknownObjectiveError(ObjectiveError, KeyError):
    """An objective name that is not registered."""


class UnknownHyperparameterError(ObjectiveError, KeyError):
    """A hyper-parameter the chosen objective does not accept."""


class InvalidHyperparameterError(ObjectiveError):
    """A hyper-parameter value outside its allowed range or set."""


class ShapeMismatchError(ObjectiveError):
    """Input tensors whose shapes (or devices, or dtypes) do not fit together."""


class MissingInputError(ObjectiveError):
    """An option needs a tensor that was not passed (e.g. beta_kl > 0 without ref_logp)."""
