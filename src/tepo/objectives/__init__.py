"""Policy objectives as exact, pure PyTorch functions (the contract: docs/objectives.md).

    out = policy_loss("tepo", logp=..., old_logp=..., advantages=..., mask=...)
    out.loss.backward(); log(out.metrics)

Registered objectives: grpo, dapo, dr_grpo (ppo.py); gspo, gspo_token, tepo (sequence.py);
clip_cov, kl_cov (cov.py); cispo, vespo, gpg (reinforce.py); sapo (soft_gate.py); luspo, gmpo
(geometric.py). Shared formulas live in _common.py, hyper-parameters in _registry.py; the
contract of the last six is docs/objectives.md.

Hyper-parameters (`default_hparams(name)` lists each objective's, with defaults; None = default):
    every objective   agg, max_len (None = T), beta_kl (0.0), kl_estimator ("k3"), entropy_coef (0.0)
    clip_low, clip_high   grpo, dapo, dr_grpo, gspo, gspo_token, tepo, clip_cov, cispo, luspo
    tepo              tepo_kl_coef (0.0)
    clip_cov          cov_ratio, cov_lb, cov_ub
    kl_cov            cov_ratio, kl_cov_coef   (KL-Cov's surrogate is unclipped: no clip_low/clip_high)
    sapo              sapo_temperature_pos, sapo_temperature_neg   (a soft gate, no clip)
    vespo             vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg   (no clip)
    gmpo              log_clip_low, log_clip_high   (bounds of the token log-ratio, not of the ratio)
    gpg               gpg_alpha_rescale   (no ratio, no clip)
A value for a hyper-parameter the objective does not take is an error; None for a name that some
objective takes is accepted and ignored (a trainer can pass all of its unset config fields).
A new objective is one function decorated with ``@register_objective(name, **defaults)`` that maps
a `PolicyBatch` to `ObjectiveTerms`. This package imports only torch and the standard library.
"""

from tepo.objectives._common import AGG_MODES, KL_ESTIMATORS, ObjectiveTerms, PolicyBatch
from tepo.objectives._policy_loss import PolicyLossOutput, policy_loss
from tepo.objectives._registry import (
    ADVANTAGE_SCALES,
    SHARED_DEFAULTS,
    advantage_scale,
    default_hparams,
    list_objectives,
    register_objective,
)
from tepo.objectives.errors import (
    InvalidHyperparameterError,
    MissingInputError,
    ObjectiveError,
    ShapeMismatchError,
    UnknownHyperparameterError,
    UnknownObjectiveError,
)

# Registration happens on import.
from tepo.objectives import cov, ppo, sequence  # noqa: E402,F401  isort: skip
from tepo.objectives import geometric, reinforce, soft_gate  # noqa: E402,F401  isort: skip

__all__ = [
    "ADVANTAGE_SCALES",
    "AGG_MODES",
    "KL_ESTIMATORS",
    "SHARED_DEFAULTS",
    "InvalidHyperparameterError",
    "MissingInputError",
    "ObjectiveError",
    "ObjectiveTerms",
    "PolicyBatch",
    "PolicyLossOutput",
    "ShapeMismatchError",
    "UnknownHyperparameterError",
    "UnknownObjectiveError",
    "advantage_scale",
    "default_hparams",
    "list_objectives",
    "policy_loss",
    "register_objective",
]
