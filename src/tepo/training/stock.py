"""Stock TRL's `GRPOConfig` for a `TEPOConfig`: the same run with TRL's own loss, for comparison.

Ten objectives have a stock TRL 1.16 counterpart (loss_type x importance_sampling_level x epsilon),
and gmpo has TRL's experimental `GMPOTrainer` (`stock_trl_trainer_class`);
`tests/test_stock_parity.py` shows `TEPOTrainer` and stock `GRPOTrainer` take the same optimiser
steps with them, up to the differences below. `bench/stock_trl.py` trains stock TRL from a
`tepo train` command line with this.

Where stock TRL differs by design (the config is still built; the docs say so):
- token-mean objectives (dapo, tepo) with several optimiser steps per rollout: TRL divides each
  step's token sum by the rollout's token count shared evenly between its steps; tepo by the step's
  own count;
- `entropy_coef`: TRL's bonus is a token-mean of each micro-batch whatever the loss type; tepo's
  uses the objective's aggregation over the whole step;
- `top_entropy_quantile` (docs/controls.md): TRL's quantile is over each micro-batch (the step's only
  without gradient accumulation), and TRL also restricts its entropy bonus and its adaptive-entropy
  measurement to the selected tokens; tepo's quantile is over the whole optimiser step and the
  selection weighs the policy term only;
- `use_adaptive_entropy`: the same controller; TRL logs `entropy_coef` after its update, tepo the
  value the step used.
`off_policy_mask_threshold` and TRL's adaptive-entropy knobs pass through unchanged.
The config sets `use_bias_correction_kl=False` (stock TRL 1.16's default, True, multiplies the KL to
the reference by the importance ratio; tepo's KL term is the plain k3 estimator), passes the vLLM
rollout correction through (TRL's own `vllm_importance_sampling_*`, the same formulas; tepo's extra
`geometric_mask` is refused), and sets `scale_rewards` to the advantage
scale tepo trains with (`TEPOConfig.resolved_scale_rewards`: the objective's own unless set; "none"
for dr_grpo, where stock TRL's default "group" would not be Dr. GRPO).
Where TRL's hyper-parameters are named or bounded differently: cispo's cap 1 + clip_high is TRL's
`epsilon_high` itself (ScaleRL's eps_max), and TRL has no lower bound (clip_low must be 1: a bound
of 0); gmpo's log_clip_low/log_clip_high are GMPOConfig's log-space `epsilon`/`epsilon_high`.
What has no stock counterpart is refused: clip_cov, kl_cov, gpg, tepo's KL mask (tepo_kl_coef > 0, adaptive_tepo),
cispo with a lower bound (clip_low < 1), gmpo with an entropy bonus (GMPOTrainer has none),
another aggregation than the objective's own, a KL estimator other than k3, a Dr. GRPO max_len
other than max_completion_length.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from trl import GRPOConfig

from tepo.training.config import REPLACED_TRL_FIELDS, TEPOConfig

# objective -> GRPOConfig loss fields; epsilon / epsilon_high come from the objective's clip
STOCK_TRL_LOSS: dict[str, dict[str, Any]] = {
    "grpo": dict(loss_type="grpo", importance_sampling_level="token"),
    "dapo": dict(loss_type="dapo", importance_sampling_level="token"),
    "dr_grpo": dict(loss_type="dr_grpo", importance_sampling_level="token"),
    "gspo": dict(loss_type="grpo", importance_sampling_level="sequence"),
    # with one advantage per sequence, GSPO-token's value and gradient are GSPO's
    "gspo_token": dict(loss_type="grpo", importance_sampling_level="sequence"),
    # TEPO as first published: the sequence ratio with token-level aggregation
    "tepo": dict(loss_type="dapo", importance_sampling_level="sequence"),
    "cispo": dict(loss_type="cispo", importance_sampling_level="token"),
    "sapo": dict(loss_type="sapo", importance_sampling_level="token"),
    "luspo": dict(loss_type="luspo", importance_sampling_level="sequence"),
    "vespo": dict(loss_type="vespo", importance_sampling_level="token"),
    # trl.experimental.gmpo.GMPOTrainer with a GMPOConfig: its own loss, loss_type unused; "gmpo" makes
    # a plain GRPOTrainer refuse the config (Unknown loss type) instead of training dapo, its default
    "gmpo": dict(loss_type="gmpo", importance_sampling_level="token"),
}


def _stock_loss_hparams(objective: str, hp: dict[str, Any]) -> dict[str, Any]:
    """GRPOConfig fields carrying the objective's own hyper-parameters, in TRL's names and units."""
    if objective == "cispo":  # TRL caps the weight at epsilon_high itself and has no lower bound
        if hp["clip_low"] != 1.0:
            raise ValueError(f"clip_low={hp['clip_low']!r}: stock TRL's cispo has no lower bound (set clip_low=1)")
        return dict(epsilon=hp["clip_low"], epsilon_high=1.0 + hp["clip_high"])
    if objective == "gmpo":  # GMPOConfig's epsilons are log-space bounds
        if hp["entropy_coef"] != 0:
            raise ValueError(f"entropy_coef={hp['entropy_coef']!r}: stock TRL's GMPOTrainer has no entropy bonus")
        return dict(epsilon=hp["log_clip_low"], epsilon_high=hp["log_clip_high"])
    if objective in ("sapo", "vespo"):  # no clip; TRL's fields have our names
        return {k: v for k, v in hp.items() if k.startswith(objective + "_")}
    return dict(epsilon=hp["clip_low"], epsilon_high=hp["clip_high"])


def stock_trl_trainer_class(objective: str) -> type:
    """The stock TRL trainer class for `objective`: GRPOTrainer, or GMPOTrainer for gmpo."""
    if objective == "gmpo":
        from trl.experimental.gmpo import GMPOTrainer

        return GMPOTrainer
    from trl import GRPOTrainer

    return GRPOTrainer

# Set by GRPOConfig.__post_init__ from the others (passing it again alongside steps_per_generation is refused).
_DERIVED = {"generation_batch_size"}


def stock_trl_config(config: TEPOConfig) -> GRPOConfig:
    """The GRPOConfig whose stock GRPOTrainer optimises `config`'s objective: every GRPOConfig field
    as in `config`, the loss fields from `STOCK_TRL_LOSS` and the objective's hyper-parameters.
    Raises ValueError, naming the setting, where stock TRL has no counterpart."""
    objective = config.objective
    if objective not in STOCK_TRL_LOSS:
        raise ValueError(
            f"objective={objective!r} has no stock TRL counterpart; these do: {', '.join(STOCK_TRL_LOSS)}"
        )
    from tepo.objectives import default_hparams

    hp, own = config.resolved_hparams(), default_hparams(objective)
    if hp["agg"] != own["agg"]:
        raise ValueError(f"agg={hp['agg']!r}: stock TRL's {objective} aggregates as {own['agg']!r} only")
    if hp.get("tepo_kl_coef", 0.0) > 0:
        raise ValueError(f"tepo_kl_coef={hp['tepo_kl_coef']!r}: stock TRL has no KL mask (set it to 0)")
    if config.adaptive_tepo:
        raise ValueError("adaptive_tepo=True: stock TRL has no KL mask to adapt (set it to false)")
    if hp["beta_kl"] > 0 and hp["kl_estimator"] != "k3":
        raise ValueError(f"kl_estimator={hp['kl_estimator']!r}: stock TRL's KL to the reference is k3 only")
    max_len = config.objective_hparams()["max_len"]
    if objective == "dr_grpo" and max_len != config.max_completion_length:
        raise ValueError(
            f"max_len={max_len!r}: stock TRL's dr_grpo divides by max_completion_length={config.max_completion_length}"
        )
    if config.use_vllm and config.vllm_importance_sampling_correction and config.vllm_importance_sampling_mode == "geometric_mask":
        raise ValueError("vllm_importance_sampling_mode='geometric_mask': stock TRL has no geometric-mean mask; "
                         "use sequence_mask, token_mask, sequence_truncate or token_truncate")
    values = {
        f.name: getattr(config, f.name) for f in fields(GRPOConfig)
        if f.init and f.name not in REPLACED_TRL_FIELDS and f.name not in _DERIVED
    }
    values.update(
        STOCK_TRL_LOSS[objective],
        **_stock_loss_hparams(objective, hp),
        beta=hp["beta_kl"], use_bias_correction_kl=False,  # tepo's KL term is the plain estimator
        entropy_coef=hp["entropy_coef"],
        scale_rewards=config.resolved_scale_rewards(),  # the advantage scale tepo trains with (dr_grpo: none)
    )
    if objective == "gmpo":
        from trl.experimental.gmpo import GMPOConfig

        return GMPOConfig(**values)
    return GRPOConfig(**values)
