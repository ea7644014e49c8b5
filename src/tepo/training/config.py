"""`TEPOConfig`: TRL's `GRPOConfig` plus the objective and its hyper-parameters.

The policy loss is ours (`tepo.objectives.policy_loss`), so TRL's own loss knobs (loss_type,
epsilon, epsilon_high, importance_sampling_level, delta, beta, ...) would be silently ignored if we
let them through. They are refused instead, with the name of the field that does the job here.
TRL's objective-independent controls keep their TRL names and defaults and work with every
objective (top_entropy_quantile, off_policy_mask_threshold, use_adaptive_entropy and its
entropy_coef_* / entropy_target knobs; see docs/controls.md), as do adaptive TEPO's knobs.
Everything is checked in `__post_init__`, i.e. when the config is built or parsed by `TrlParser`,
before any model or data set is loaded.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field, fields
from typing import Any

from trl import GRPOConfig

from tepo.objectives import default_hparams, list_objectives

# The objectives and their hyper-parameters come from the registry (tepo.objectives): an objective
# registered there is a valid --objective, and its hyper-parameters are the fields of that name
# below (docs/objectives.md). TEPOConfig keeps one field per hyper-parameter, each defaulting to None
# (= the objective's default), so that TrlParser can read them from a command line or a recipe;
# tests/test_config.py checks that the fields and the registry agree.
OBJECTIVES: tuple[str, ...] = tuple(list_objectives())


def _registry_hparams() -> tuple[str, ...]:
    """Every hyper-parameter name some objective accepts, the shared ones first."""
    names: dict[str, None] = {}
    for objective in OBJECTIVES:
        names.update(dict.fromkeys(default_hparams(objective)))
    return tuple(names)


HPARAM_FIELDS: tuple[str, ...] = _registry_hparams()

# TRL loss knobs our objective replaces: field -> (value that means "unset", what to use instead).
REPLACED_TRL_FIELDS: dict[str, tuple[Any, str]] = {
    "loss_type": (None, f"set --objective ({', '.join(OBJECTIVES)}) instead"),
    "epsilon": (None, "set --clip_low instead"),
    "epsilon_high": (None, "set --clip_high instead"),
    "importance_sampling_level": (None, "set --objective gspo, gspo_token or tepo for sequence-level ratios instead"),
    "delta": (None, "leave it unset (two-sided clipping is not part of any objective here)"),
    "use_bias_correction_kl": (False, "leave it false (the KL term is the plain estimator of --kl_estimator)"),
}


@dataclass
class TEPOConfig(GRPOConfig):
    """GRPOConfig + `objective` and its hyper-parameters, dynamic sampling, held-out evaluation and
    the non-finite guard. Hyper-parameters left at None take the objective's default
    (`tepo.objectives.default_hparams(objective)`)."""

    objective: str = field(
        default="tepo",
        metadata={"help": f"Policy objective: {', '.join(OBJECTIVES)} (docs/objectives.md)."},
    )
    clip_low: float | None = field(default=None, metadata={"help": "Lower clip: ratio >= 1 - clip_low. None: objective default."})
    clip_high: float | None = field(default=None, metadata={"help": "Upper clip: ratio <= 1 + clip_high. None: objective default."})
    agg: str | None = field(
        default=None,
        metadata={"help": "Loss aggregation: token-mean, seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm."},
    )
    max_len: int | None = field(
        default=None,
        metadata={
            "help": "Constant of seq-mean-token-sum-norm (Dr. GRPO). None: max_completion_length (the generation "
            "budget, as in Dr. GRPO and TRL), not the padded length of each micro-batch."
        },
    )
    beta_kl: float | None = field(default=None, metadata={"help": "Coefficient of the per-token KL to the reference model (0: no reference model)."})
    kl_estimator: str | None = field(default=None, metadata={"help": "KL estimator for beta_kl: k1, k2 or k3."})
    # Redefines GRPOConfig.entropy_coef (same meaning: a constant entropy bonus), now applied by our loss.
    entropy_coef: float | None = field(default=None, metadata={"help": "Entropy bonus: loss -= entropy_coef * agg(entropy)."})
    tepo_kl_coef: float | None = field(default=None, metadata={"help": "TEPO token-level KL mask coefficient (0: TEPO as first published)."})
    cov_ratio: float | None = field(default=None, metadata={"help": "Clip-Cov / KL-Cov: fraction of valid tokens selected."})
    cov_lb: float | None = field(default=None, metadata={"help": "Clip-Cov: lower covariance bound of candidates."})
    cov_ub: float | None = field(default=None, metadata={"help": "Clip-Cov: upper covariance bound of candidates."})
    kl_cov_coef: float | None = field(default=None, metadata={"help": "KL-Cov: coefficient of |logp - old_logp| on selected tokens."})
    # The sapo_/vespo_ fields redefine GRPOConfig's (same names and meaning), now applied by our loss.
    sapo_temperature_pos: float | None = field(default=None, metadata={"help": "SAPO: gate temperature where A > 0."})
    sapo_temperature_neg: float | None = field(default=None, metadata={"help": "SAPO: gate temperature where A <= 0."})
    vespo_k_pos: float | None = field(default=None, metadata={"help": "VESPO: power k of phi(W) = W^k e^(lambda (1-W)) where A >= 0."})
    vespo_lambda_pos: float | None = field(default=None, metadata={"help": "VESPO: decay lambda of phi where A >= 0."})
    vespo_k_neg: float | None = field(default=None, metadata={"help": "VESPO: power k of phi where A < 0."})
    vespo_lambda_neg: float | None = field(default=None, metadata={"help": "VESPO: decay lambda of phi where A < 0."})
    log_clip_low: float | None = field(default=None, metadata={"help": "GMPO: token log-ratio clipped at >= -log_clip_low (A <= 0)."})
    log_clip_high: float | None = field(default=None, metadata={"help": "GMPO: token log-ratio clipped at <= log_clip_high (A > 0)."})
    gpg_alpha_rescale: bool | None = field(
        default=None, metadata={"help": "GPG: scale the loss by rows / rows with a nonzero advantage (per micro-batch)."}
    )

    dynamic_sampling: bool = field(
        default=False,
        metadata={
            "help": "DAPO dynamic sampling: drop prompt groups whose rewards all agree and refill the batch with "
            "freshly generated groups (at most max_resample_rounds rounds). Single process only."
        },
    )
    max_resample_rounds: int = field(default=3, metadata={"help": "Dynamic sampling: most refill rounds per rollout batch."})
    shared_prefix: bool = field(
        default=True,
        metadata={
            "help": "Forward each distinct prompt of a micro-batch once and let its completions attend to it "
            "(training pass, pi_old pass, reference pass, and the prefill of Hugging Face generation): the same "
            "log-probs, entropies and gradients as the plain path to float32 rounding, fewer tokens computed. "
            "false: exactly the plain path. Where it cannot apply, one log line says why and the plain path "
            "runs (tepo.training.shared_prefix)."
        },
    )
    heldout_eval_steps: int = field(
        default=0,
        metadata={"help": "Greedy held-out accuracy every N optimiser steps during training (0: never)."},
    )
    heldout_max_new_tokens: int | None = field(
        default=None, metadata={"help": "Tokens per held-out answer. None: max_completion_length."}
    )
    max_nonfinite_steps: int = field(
        default=3,
        metadata={
            "help": "Non-finite loss or gradient: the optimiser step is skipped; after this many in a row, "
            "training stops and a checkpoint is saved."
        },
    )
    stability_monitor: bool = field(default=True, metadata={"help": "Run tepo's stability monitor (writes monitor.json)."})

    # Adaptive TEPO (tepo.training.adaptive_tepo, docs/controls.md): tepo_kl_coef from the token entropy.
    adaptive_tepo: bool = field(
        default=False,
        metadata={
            "help": "Adaptive TEPO (objective tepo): after every optimiser step set tepo_kl_coef to "
            "clip(c + adaptive_tepo_rate * (H* - H) / H*, 0, adaptive_tepo_kl_max) from the step's token entropy H; "
            "tepo_kl_coef is the starting value."
        },
    )
    adaptive_tepo_target: float | None = field(
        default=None,
        metadata={"help": "Adaptive TEPO: entropy target H* (nats). None: adaptive_tepo_target_ratio x the first step's entropy."},
    )
    adaptive_tepo_target_ratio: float = field(
        default=0.75, metadata={"help": "Adaptive TEPO: H* as a fraction of the first step's entropy (when adaptive_tepo_target is None)."}
    )
    adaptive_tepo_rate: float = field(
        default=10.0, metadata={"help": "Adaptive TEPO: change of tepo_kl_coef per step at a relative entropy deficit of 1."}
    )
    adaptive_tepo_kl_max: float = field(default=100.0, metadata={"help": "Adaptive TEPO: upper bound of tepo_kl_coef."})
    # TRL's field, default on here (TRL: off), as the RL papers train: with dropout, pi_old carries noise.
    disable_dropout: bool = field(
        default=True,
        metadata={
            "help": "Turn dropout off in the policy (nn.Dropout and attention dropout): otherwise pi_old and the "
            "training pass see different dropout masks. TRL's default is false."
        },
    )
    # TRL's field, with another default: unset means the objective's own scale (dr_grpo: none).
    scale_rewards: str | None = field(
        default=None,
        metadata={
            "help": "How rewards become advantages: group (reward minus its group's mean, divided by the group's "
            "std), batch (divided by the batch's std) or none (no division; Dr. GRPO). Unset: the objective's own "
            "(tepo.objectives.advantage_scale: none for dr_grpo, group for the others)."
        },
    )

    # TRL loss knobs our objective replaces: unset by default, refused when set (see REPLACED_TRL_FIELDS).
    loss_type: str | None = field(default=None, metadata={"help": "Not used: set --objective."})
    epsilon: float | None = field(default=None, metadata={"help": "Not used: set --clip_low."})
    importance_sampling_level: str | None = field(default=None, metadata={"help": "Not used: set --objective."})
    use_bias_correction_kl: bool = field(default=False, metadata={"help": "Not supported (must be false)."})
    # metrics.jsonl has one row per optimiser step.
    logging_steps: float = field(default=1, metadata={"help": "Must be 1: metrics.jsonl logs every optimiser step."})

    def __post_init__(self):
        self._check_tepo_fields()
        self._check_scale_rewards()
        super().__post_init__()
        self._check_rollout_correction()
        self._check_batch_shape()
        self._check_controls()
        self._warn_accumulation()
        self._map_reference_model()

    # ---------------------------------------------------------------------------------------
    def _check_tepo_fields(self) -> None:
        from tepo.objectives import ObjectiveError, default_hparams, list_objectives, policy_loss

        known = list_objectives()
        if self.objective not in known:
            raise ValueError(f"objective={self.objective!r} is not known; valid: {', '.join(known)}")
        for name, (unset, instead) in REPLACED_TRL_FIELDS.items():
            value = getattr(self, name)
            if value != unset:
                raise ValueError(
                    f"{name}={value!r} is a TRL loss setting that tepo's objectives replace (it would be "
                    f"ignored): {instead}"
                )
        if self.beta not in (0.0, None) and self.beta != self.beta_kl:
            raise ValueError(
                f"beta={self.beta!r}: TRL's KL coefficient is not used by tepo's objectives; set --beta_kl instead"
            )
        allowed = default_hparams(self.objective)
        for name in HPARAM_FIELDS:
            if getattr(self, name) is not None and name not in allowed:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is not a hyper-parameter of objective {self.objective!r}; "
                    f"its hyper-parameters are: {', '.join(sorted(allowed))}"
                )
        # Let the objective check the values itself, on a 1x2 batch: the exact same checks the loss runs.
        import torch

        z = torch.zeros(1, 2)
        try:
            policy_loss(
                self.objective, logp=z, old_logp=z, advantages=torch.zeros(1), mask=torch.ones(1, 2),
                ref_logp=z, entropy=z, old_entropy=z, **self.objective_hparams(max_len_default=2),
            )
        except ObjectiveError as err:
            raise ValueError(f"objective {self.objective!r}: {err}") from None
        world = int(os.environ.get("WORLD_SIZE", "1"))
        spg = self.steps_per_generation or self.gradient_accumulation_steps
        generation_batch = self.generation_batch_size or self.per_device_train_batch_size * world * spg
        if self.num_generations is not None and generation_batch % self.num_generations != 0:
            raise ValueError(
                f"the rollout batch (per_device_train_batch_size={self.per_device_train_batch_size} x "
                f"{world} process(es) x steps_per_generation={spg} = {generation_batch} completions) must be "
                f"divisible by num_generations={self.num_generations}, so that it holds whole prompt groups"
            )
        if self.logging_steps != 1:
            raise ValueError(
                f"logging_steps={self.logging_steps!r}: must be 1, metrics.jsonl records every optimiser step "
                "(TRL's report_to loggers get the same rows)"
            )
        for name, low in (("max_resample_rounds", 0), ("heldout_eval_steps", 0), ("max_nonfinite_steps", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name}={value!r} must be an integer >= {low}")
        if self.max_completion_length is None or self.max_completion_length < 1:
            raise ValueError(f"max_completion_length={self.max_completion_length!r} must be a positive integer")
        if self.max_len is not None and self.max_len < self.max_completion_length:
            raise ValueError(
                f"max_len={self.max_len} is shorter than max_completion_length={self.max_completion_length}: "
                "a completion could be longer than the normaliser of seq-mean-token-sum-norm; "
                f"use max_len >= {self.max_completion_length} or leave it unset"
            )
        if self.heldout_max_new_tokens is not None and self.heldout_max_new_tokens < 1:
            raise ValueError(f"heldout_max_new_tokens={self.heldout_max_new_tokens!r} must be a positive integer")
        if self.temperature is None or not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature!r} must be > 0 (sampled rollouts)")

    def _check_rollout_correction(self) -> None:
        # TRL's vllm_importance_sampling_* options, applied by tepo.training.rollout_correction (after
        # super().__post_init__, which maps the deprecated vllm_importance_sampling_cap onto _clip_max).
        from tepo.training.rollout_correction import RolloutCorrection

        if self.vllm_importance_sampling_correction:
            RolloutCorrection(
                self.vllm_importance_sampling_mode, self.vllm_importance_sampling_clip_min,
                self.vllm_importance_sampling_clip_max,
            )

    def _warn_accumulation(self) -> None:
        # Token-mean objectives are rescaled to the whole step's token count (trainer: token_mean_scale)
        # and sequence means are exact over micro-batches of equal size; only the covariance
        # objectives choose their tokens within each micro-batch.
        if self.gradient_accumulation_steps > 1 and self.objective in ("clip_cov", "kl_cov"):
            warnings.warn(
                f"gradient_accumulation_steps={self.gradient_accumulation_steps}: {self.objective} selects its "
                f"tokens by covariance within each micro-batch of {self.per_device_train_batch_size} completions, "
                "not over the whole optimiser step; use 1 to select over the step",
                stacklevel=3,
            )
        if (self.gradient_accumulation_steps > 1 and self.objective == "gpg"
                and self.resolved_hparams()["gpg_alpha_rescale"]):
            warnings.warn(
                f"gradient_accumulation_steps={self.gradient_accumulation_steps}: gpg's alpha (rows / rows with a "
                f"nonzero advantage) is counted within each micro-batch of {self.per_device_train_batch_size} "
                "completions, not over the whole optimiser step; use 1 to count over the step",
                stacklevel=3,
            )

    def _check_batch_shape(self) -> None:
        # super().__post_init__ filled generation_batch_size / steps_per_generation; name the fields plainly.
        if self.generation_batch_size % self.num_generations != 0:  # pragma: no cover - TRL raises first
            raise ValueError(
                f"per_device_train_batch_size x processes x steps_per_generation = {self.generation_batch_size} "
                f"is not divisible by num_generations={self.num_generations}"
            )
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and self.world_size == 1:
            raise ValueError(
                f"launched as {launched} processes (WORLD_SIZE={launched}), but accelerate set up no distributed "
                "training for them: each would train alone and write to the same output_dir. This happens with an "
                "FSDP config on a machine without GPUs; there, use recipes/accelerate/cpu_ddp_2proc.yaml or a "
                "DeepSpeed recipe (docs/scaling.md)"
            )
        if self.dynamic_sampling and self.world_size > 1:
            raise ValueError(
                f"dynamic_sampling=True supports one process only (this run has {self.world_size}); "
                "prompt groups may span processes, so dropping one needs every rank's rewards"
            )

    def _check_scale_rewards(self) -> None:
        from tepo.objectives import ADVANTAGE_SCALES

        self.scale_rewards = {True: "group", False: "none"}.get(self.scale_rewards, self.scale_rewards)  # as TRL
        if self.scale_rewards is not None and self.scale_rewards not in ADVANTAGE_SCALES:
            raise ValueError(
                f"scale_rewards={self.scale_rewards!r} is not one of {', '.join(ADVANTAGE_SCALES)} "
                f"(or unset: the objective's own, {self.resolved_scale_rewards()!r} for {self.objective})"
            )

    def _check_controls(self) -> None:
        """The objective-independent controls (docs/controls.md)."""
        def finite(name, low=None, strict=False):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if ok and low is not None:
                ok = value > low if strict else value >= low
            if not ok:
                bound = "" if low is None else f" {'>' if strict else '>='} {low}"
                raise ValueError(f"{name}={value!r} must be a finite number{bound}")

        q = self.top_entropy_quantile
        if not (isinstance(q, (int, float)) and 0.0 <= q <= 1.0):
            raise ValueError(f"top_entropy_quantile={q!r} must be in [0, 1] (1: every token)")
        ga = self.gradient_accumulation_steps
        if q < 1.0 and ga > 1 and self.steps_per_generation % ga != 0:
            raise ValueError(
                f"top_entropy_quantile={q} with gradient_accumulation_steps={ga}: the quantile is over the optimiser "
                f"step's micro-batches, which must lie in one rollout; steps_per_generation={self.steps_per_generation} "
                f"must be a multiple of {ga}"
            )
        if self.off_policy_mask_threshold is not None:
            finite("off_policy_mask_threshold", 0.0)
        if self.use_adaptive_entropy:
            for name in ("entropy_target", "entropy_coef_delta", "entropy_coef_min", "entropy_coef_max"):
                finite(name, None if name == "entropy_target" else 0.0)
            if self.entropy_coef_min > self.entropy_coef_max:
                raise ValueError(
                    f"entropy_coef_min={self.entropy_coef_min} is above entropy_coef_max={self.entropy_coef_max}"
                )
        if self.adaptive_tepo:
            if self.objective != "tepo":
                raise ValueError(f"adaptive_tepo=True sets tepo_kl_coef, a hyper-parameter of objective tepo only "
                                 f"(objective={self.objective!r})")
            if self.adaptive_tepo_target is not None:
                finite("adaptive_tepo_target", 0.0, strict=True)
            finite("adaptive_tepo_target_ratio", 0.0, strict=True)
            finite("adaptive_tepo_rate", 0.0)
            finite("adaptive_tepo_kl_max", 0.0)
            start = self.resolved_hparams()["tepo_kl_coef"]
            if start > self.adaptive_tepo_kl_max:
                raise ValueError(f"tepo_kl_coef={start} (the starting value) is above adaptive_tepo_kl_max="
                                 f"{self.adaptive_tepo_kl_max}")

    def _map_reference_model(self) -> None:
        # TRL loads a reference model and computes ref log-probs only when its beta != 0.
        beta_kl = self.resolved_hparams()["beta_kl"]
        self.beta = float(beta_kl) if beta_kl > 0 else 0.0

    # ---------------------------------------------------------------------------------------
    def objective_hparams(self, *, max_len_default: int | None = None) -> dict[str, Any]:
        """The hyper-parameters to pass to `policy_loss` (None = objective default), with max_len
        defaulting to max_completion_length (see the field's help)."""
        hp = {name: getattr(self, name) for name in HPARAM_FIELDS}
        if hp["max_len"] is None:
            hp["max_len"] = max_len_default if max_len_default is not None else self.max_completion_length
        return hp

    def resolved_scale_rewards(self) -> str:
        """The advantage scale training uses (TRL's scale_rewards values): the one set, else the
        objective's own (`tepo.objectives.advantage_scale`)."""
        from tepo.objectives import advantage_scale

        return self.scale_rewards if self.scale_rewards is not None else advantage_scale(self.objective)

    def resolved_hparams(self) -> dict[str, Any]:
        """Every hyper-parameter of the objective with the value the loss will use."""
        from tepo.objectives import default_hparams

        resolved = default_hparams(self.objective)
        resolved.update({k: v for k, v in self.objective_hparams().items() if v is not None and k in resolved})
        return resolved


def tepo_field_names() -> set[str]:
    """Fields TEPOConfig adds to GRPOConfig (for help texts and tests)."""
    return {f.name for f in fields(TEPOConfig)} - {f.name for f in fields(GRPOConfig)} | set(HPARAM_FIELDS)
