"""`TEPOTrainer`: TRL's GRPOTrainer with the policy loss handed to `tepo.objectives.policy_loss`.

It subclasses `trl_internals.GRPOTrainerSeams` (GRPOTrainer with its private methods forwarded to
public hooks; every TRL private name lives there) and implements these hooks (everything else is TRL's):
- `compute_policy_loss` (TRL's `_compute_loss`): per-token log-probs and entropies from `score_tokens`,
  then `policy_loss(objective, ...)`; its metrics go to TRL's metric buffer. No clipping or
  aggregation code here: the objective owns all of it. pi_old (`pi_old`): until the first optimiser
  step after a rollout, this training pass's own detached log-probs and entropies (exactly
  on-policy); after it, the values recorded when the rollout was scored.
- `score_tokens` (TRL's `_get_per_token_logps_and_entropies`): TRL's scoring, through the shared-prefix
  forward when `shared_prefix` is on (`tepo.shared_prefix`: each distinct prompt of a chunk forwarded
  once). While a rollout is being scored, the first pass of the policy (the one TRL uses for
  `old_per_token_logps`) also keeps its entropies as `old_entropy` (TEPO's KL mask compares entropy
  now with entropy at sampling time); TRL's fused LM head computes them anyway.
- `on_rewards` (TRL's `_calculate_rewards`): keeps the rewards and completion token ids of the last
  rollout, for the rollout statistics and for dynamic sampling.
- `rollout` (TRL's `_generate_and_score_completions`): adds `old_entropy` to the batch, records the
  rollout statistics, and (with `dynamic_sampling`) filters and refills the batch
  (`tepo.training.dynamic_sampling`).
- `training_step` (public): keeps `self.model` in train mode under regional compilation.
- `log` (public): clears the step's loss metrics after TRL logs them.
The seams class also writes checkpoints under a staging folder and renames them into place.

Plugins (token-weight pieces, controllers, callbacks) use the public surface: `set_loss_hparam`,
`loss_hparam`, `record_metric`, `step_micro_batches`, `micro_step`, `tokens_in_step`, `score_batch`.

Aggregation scope: `policy_loss` aggregates over the micro-batch it is given. For token-mean
objectives (dapo, tepo, clip_cov, kl_cov) `compute_policy_loss` multiplies that loss by
`tepo.training.distributed.token_mean_scale`, so that with several processes or accumulated
micro-batches the optimiser step's gradient is the token-mean over all of the step's tokens, as on
one process with the whole batch (seq-mean objectives are exact already; see that module). The
loss metrics (the objective's and the `token_weights` pieces') are logged the same way, as one
micro-batch with the whole step would give them: `tepo.training.step_metrics` (`_min` / `_max`
names by min / max, the rest token-weighted over micro-batches and processes).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from typing import Any, Sequence

import torch
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl.models.utils import disable_gradient_checkpointing

from tepo import shared_prefix
from tepo.objectives import policy_loss
from tepo.training import batch as batch_rules
from tepo.training import rollout_correction, sampling, vllm_sync
from tepo.training.callbacks import (
    CompactProgressCallback,
    HeldoutEvalCallback,
    MetricsJsonlWriter,
    NonFiniteGuard,
    StepClock,
)
from tepo.training.config import TEPOConfig
from tepo.training.controls import install_controls
from tepo.training.distributed import token_mean_scale
from tepo.training.step_metrics import StepMetrics, gather_micro_batch
from tepo.training.trl_internals import STAGING_DIR, GRPOTrainerSeams, pop_last_metric  # noqa: F401 - STAGING_DIR: public

logger = logging.getLogger(__name__)


class TEPOTrainer(GRPOTrainerSeams):
    """GRPOTrainer whose loss is `tepo.objectives.policy_loss(args.objective, ...)`.

    Args: as GRPOTrainer; `args` must be a `TEPOConfig`. `reward_funcs` defaults to
    `tepo.rewards.math_reward_func`. `heldout_problems` (dicts with id, problem, answer) feed the
    held-out evaluation every `args.heldout_eval_steps` steps, decoded in batches of `heldout_batch_size`.
    """

    def __init__(self, model, reward_funcs=None, args: TEPOConfig | None = None, *,
                 heldout_problems: Sequence[dict] | None = None, heldout_batch_size: int = 16, **kwargs):
        if not isinstance(args, TEPOConfig):
            raise TypeError(f"TEPOTrainer needs args=TEPOConfig(...), got {type(args).__name__}")
        if reward_funcs is None:
            from tepo.rewards import math_reward_func

            reward_funcs = math_reward_func
        # use_vllm: TRL's engine, with tepo's weight sync into CPU engines (tepo.training.vllm_sync).
        with vllm_sync.engine_class() if args.use_vllm else contextlib.nullcontext():
            super().__init__(model=model, reward_funcs=reward_funcs, args=args, **kwargs)
        # TRL read args.scale_rewards, which is None when unset: the objective's own scale (dr_grpo: none).
        self.scale_rewards = args.resolved_scale_rewards()
        if args.disable_dropout:  # TRL's switch turned nn.Dropout off; attention dropout stayed on
            disable_dropout(self.model)
        self.disable_trl_entropy_bonus()
        self._loss_hparams = args.objective_hparams()
        self._token_mean = args.resolved_hparams()["agg"] == "token-mean"
        self._cov_generator = torch.Generator().manual_seed(int(args.seed))  # clip_cov's random token choice
        self.dynamic_sampling = None
        if args.dynamic_sampling:
            from tepo.training.dynamic_sampling import DynamicSampling

            self.dynamic_sampling = DynamicSampling(self)
        self.shared_prefix = self._install_shared_prefix(args)
        # Rollout-time state (see the module docstring).
        self._old_entropy_armed = False
        self._captured_old_entropy: torch.Tensor | None = None
        self._last_rewards: torch.Tensor | None = None
        self._last_completion_ids: list | None = None
        self._rollout_metrics: dict[str, float] = {}
        self._rollout_count = 0
        self._rollout_step: int | None = None  # global_step when the last rollout was scored (see pi_old)
        self.tokens_in_step = 0  # prompt+completion tokens trained on in this optimiser step (StepClock)
        self._step_metrics = {"train": StepMetrics(), "eval": StepMetrics()}  # see _log_loss_metrics
        # Objective-independent per-token weights on the policy term, applied in this order (see token_weight).
        self.token_weights: list = []
        # The sampler-vs-trainer correction of vLLM rollouts (TRL's vllm_importance_sampling_* options).
        self.token_weights.extend(rollout_correction.install(self, args))
        install_controls(self, args)  # token selection, off-policy mask, entropy controllers (docs/controls.md)

        # Callbacks, in the order they must see each step: the clock stops before any evaluation,
        # the monitor annotates the logs before the writer writes them.
        self.nonfinite_guard = NonFiniteGuard(self, args.max_nonfinite_steps)
        self.add_callback(StepClock(self))
        self.add_callback(self.nonfinite_guard)
        self.heldout_callback = None
        if args.heldout_eval_steps and heldout_problems:
            self.heldout_callback = HeldoutEvalCallback(
                self, heldout_problems, every=args.heldout_eval_steps,
                max_new_tokens=args.heldout_max_new_tokens or args.max_completion_length,
                batch_size=heldout_batch_size,
            )
            self.add_callback(self.heldout_callback)
        self.monitor_callback = None
        if args.stability_monitor:
            from tepo.training.monitor import StabilityMonitorCallback

            self.monitor_callback = StabilityMonitorCallback(output_dir=args.output_dir)
            self.add_callback(self.monitor_callback)
        self.metrics_writer = MetricsJsonlWriter(args.output_dir)
        self.add_callback(self.metrics_writer)
        if self.pop_callback(ProgressCallback) is not None:
            self.add_callback(CompactProgressCallback)

    def _install_shared_prefix(self, args: TEPOConfig) -> bool:
        """Patch the policy (and reference) model for the shared-prefix path, or say once why not."""
        if not args.shared_prefix:
            return False
        reason = shared_prefix.unsupported_reason(self.model, gradient_checkpointing=args.gradient_checkpointing)
        if reason is None and hasattr(self.model, "peft_config"):
            reason = "the model is a PEFT model"
        if reason is None and (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            reason = "DeepSpeed and FSDP shard the model the prefill would call directly (DDP is supported)"
        if reason is not None:
            logger.warning("shared_prefix: off, the plain path runs: %s", reason)
            return False
        for model in (self.model, self.ref_model):
            if model is not None:
                shared_prefix.add_shared_prefix_forward(model, temperature=args.temperature)
        if not args.use_vllm:
            shared_prefix.add_shared_prefix_generate(self.model)
        return True

    # ------------------------------------------------------------------------------------------
    # the public surface for plugins

    def loss_hparam(self, name: str) -> Any:
        """The value of an objective hyper-parameter the next loss uses."""
        return self._loss_hparams[name]

    def set_loss_hparam(self, name: str, value: Any) -> None:
        """Set an objective hyper-parameter for the following losses (controllers: once per optimiser step)."""
        if name not in self._loss_hparams:
            raise KeyError(f"{name!r} is not a hyper-parameter of objective {self.args.objective!r} "
                           f"(it has {', '.join(sorted(self._loss_hparams))})")
        self._loss_hparams[name] = value

    def record_metric(self, name: str, value: float, mode: str = "train") -> None:
        """Add a value to this step's log under `name` (TRL's log averages the values of a step)."""
        self.metric_values(mode)[name].append(float(value))

    def step_micro_batches(self) -> list[dict] | None:
        """The micro-batches of the current optimiser step on this process (the current one included),
        or None where TRL's buffer cannot tell (see `tepo.training.batch.step_micro_batches`)."""
        return batch_rules.step_micro_batches(
            self.rollout_buffer, self.micro_step, int(self.current_gradient_accumulation_steps),
            int(self.args.steps_per_generation),
        )

    def score_batch(self, model, batch: dict, *, chunk: int | None = None, compute_entropy: bool = True):
        """Per-token log-probs and entropies (B, C) of `model` on a rollout batch, in chunks of `chunk` rows."""
        input_ids, attention_mask, logits_to_keep = batch_rules.sequences(batch)
        logps, entropies, _ = self.score_tokens(
            model, input_ids, attention_mask, logits_to_keep, batch_size=chunk, compute_entropy=compute_entropy,
            **batch_rules.extra_model_inputs(batch),
        )
        return logps, entropies

    def pad_token_id(self) -> int:
        pad = self.text_tokenizer.pad_token_id
        return int(pad if pad is not None else self.eos_token_ids[0])

    def training_step(self, model, inputs, num_items_in_batch=None):
        # TRL and this trainer tell training from evaluation by `self.model.training`. Under
        # accelerate's regional compilation `model` is a new copy of the containers around the
        # compiled layers, and its train() leaves self.model as it was: in eval mode for a model
        # from from_pretrained, which would turn every step into an "evaluation" (no metrics rows,
        # no non-finite guard, no accumulation scaling).
        if not self.model.training:
            self.model.train()
        return super().training_step(model, inputs, num_items_in_batch)

    # ------------------------------------------------------------------------------------------
    # scoring and rollout

    def score_tokens(self, model, input_ids, attention_mask, logits_to_keep, *, compute_entropy=False, **kwargs):
        capture = self._old_entropy_armed and model is self.model
        if capture:
            # The first policy pass while scoring a rollout is TRL's old_per_token_logps pass.
            self._old_entropy_armed = False
            compute_entropy = True
        if self.shared_prefix and not kwargs.get("compute_aux_loss") and not batch_rules.has_extra_model_inputs(kwargs):
            # TRL's helper calls model(..., labels=, fused_lm_head=True); the patched forward takes it from here.
            model = functools.partial(model, shared_prefix=logits_to_keep)
        logps, entropies, aux_loss = self.trl_score_tokens(
            model, input_ids, attention_mask, logits_to_keep, compute_entropy=compute_entropy, **kwargs
        )
        if capture:
            self._captured_old_entropy = entropies.detach() if entropies is not None else None
        return logps, entropies, aux_loss

    def on_rewards(self, rewards_per_func, completion_ids):
        self._last_rewards = rewards_per_func
        self._last_completion_ids = completion_ids

    def score_round(self, inputs: list[dict]) -> tuple[dict, torch.Tensor, dict[str, float]]:
        """One call of TRL's rollout: the batch (with old_entropy), the rewards of all processes
        (G*P,), and the statistics of this round."""
        self._old_entropy_armed, self._captured_old_entropy = True, None
        try:
            batch = self.trl_rollout(inputs)
        finally:
            self._old_entropy_armed = False
        # TRL just logged its own "reward_std" for this round; ours (same formula, but over the
        # fresh round only when dynamic sampling refills) is the one metrics.jsonl documents.
        pop_last_metric(self, "reward_std")
        if "old_per_token_logps" in batch and self._captured_old_entropy is not None:
            batch["old_entropy"] = self._captured_old_entropy
        self._captured_old_entropy = None
        per_func = self._last_rewards
        rewards = (per_func * self.reward_weights.to(per_func.device).unsqueeze(0)).nansum(dim=1)
        rewards[torch.isnan(per_func).all(dim=1)] = float("nan")
        return batch, rewards, self._round_stats(rewards)

    def _round_stats(self, rewards: torch.Tensor) -> dict[str, float]:
        valid = rewards[~torch.isnan(rewards)]
        ids = self._last_completion_ids or []
        eos = set(self.eos_token_ids)
        device = self.accelerator.device
        lengths = torch.tensor([len(c) for c in ids], dtype=torch.float32, device=device)
        truncated = torch.tensor([float(not c or c[-1] not in eos) for c in ids], device=device)
        lengths, truncated = self.accelerator.gather(lengths), self.accelerator.gather(truncated)
        varied = sampling.varied_groups(rewards, self.num_generations)
        return {
            "reward_mean": valid.mean().item() if valid.numel() else float("nan"),
            "reward_std": valid.std().item() if valid.numel() > 1 else float("nan"),
            "accuracy": torch.isclose(torch.nan_to_num(rewards, nan=0.0), torch.ones_like(rewards)).float().mean().item(),
            "zero_var_frac": 1.0 - varied.float().mean().item(),
            "completion_len_mean": lengths.mean().item() if lengths.numel() else float("nan"),
            "completion_len_max": lengths.max().item() if lengths.numel() else float("nan"),
            "truncated_frac": truncated.mean().item() if truncated.numel() else float("nan"),
        }

    def rollout(self, inputs):
        if not self.model.training:
            return self.trl_rollout(inputs)
        self._rollout_step = self.state.global_step  # no optimiser step yet on these weights
        batch, rewards, stats = self.score_round(inputs)
        if self.dynamic_sampling is not None:
            batch, ds_stats = self.dynamic_sampling(batch, rewards)
            stats.update(ds_stats)
        self._rollout_count += 1
        stats["rollout"] = float(self._rollout_count)
        hit_rate = getattr(getattr(self, "vllm_generation", None), "prefix_cache_hit_rate", None)
        if hit_rate is not None:  # the colocated engine's prefix cache on this rollout (tepo.training.vllm_sync)
            stats["vllm_prefix_cache_hit_rate"] = hit_rate
        self._rollout_metrics = stats  # statistics of the freshly sampled groups, before any filtering
        return batch

    def score_old_policy(self, batch: dict, *, chunk: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """pi_old's per-token log-probs and entropies (B, T) of a rollout batch, in chunks of `chunk` rows."""
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            return self.score_batch(self.model, batch, chunk=max(1, chunk))

    # ------------------------------------------------------------------------------------------
    # loss

    def compute_policy_loss(self, model, inputs):
        mask = batch_rules.loss_mask(inputs)
        input_ids, attention_mask, logits_to_keep = batch_rules.sequences(inputs)
        logp, entropy, aux_loss = self.score_tokens(
            model, input_ids, attention_mask, logits_to_keep,
            compute_entropy=True, compute_aux_loss=self.aux_loss_enabled,
            **batch_rules.extra_model_inputs(inputs),
        )
        old_logp, old_entropy = self.pi_old(inputs, logp, entropy)
        token_weight, weight_metrics = self.token_weight(inputs, logp=logp, entropy=entropy, mask=mask)
        out = policy_loss(
            self.args.objective,
            logp=logp, old_logp=old_logp, advantages=inputs["advantages"], mask=mask,
            ref_logp=inputs.get("ref_per_token_logps"), entropy=entropy, old_entropy=old_entropy,
            generator=self._cov_generator, token_weight=token_weight, **self._loss_hparams,
        )
        out.metrics.update(weight_metrics)  # the pieces' metrics follow the same step convention
        loss = out.loss
        if self.aux_loss_enabled:  # MoE load balancing
            loss = loss + self.router_aux_loss_coef * aux_loss
        mode = "train" if self.model.training else "eval"
        if mode == "train":
            self.nonfinite_guard.observe_loss(loss)
            self.tokens_in_step += int(attention_mask.sum())
            if self._token_mean:  # exact token-mean over the whole optimiser step (collective: every rank calls it)
                loss = loss * token_mean_scale(self, inputs)
            # The step's loss as logged: the objective of the whole optimiser step, i.e. the mean over
            # ranks and micro-batches of these (token-mean losses are rescaled above, so a micro-batch
            # with few tokens does not count for more), NaN kept as NaN (TRL's log turns it into null).
            # It replaces transformers' running "loss", which its logging_nan_inf_filter would fill in
            # with an average of earlier steps. The gather is collective, like token_mean_scale.
            step_share = loss.detach()
            if self.accelerator.num_processes > 1:
                step_share = self.accelerator.gather(step_share.reshape(1)).mean()
            self.record_metric("loss", step_share.item())
            for name, value in self._rollout_metrics.items():
                self.record_metric(name, value)
            loss = loss / self.current_gradient_accumulation_steps  # GRPOTrainer: loss_is_scaled_for_ga
        self._log_loss_metrics(mode, out.metrics, tokens=float(mask.sum()))
        return loss

    def pi_old(self, inputs, logp: torch.Tensor, entropy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """pi_old's log-probs and entropies (B, T) for this micro-batch.

        Until the first optimiser step after its rollout was scored, pi_old is pi_theta: then they are
        this training pass's own, detached, so the ratio is exactly 1 and TEPO's strict entropy
        comparison selects nothing, whatever the rounding of the separate no-grad pass (compilation,
        another attention backend, bf16) or of dynamic sampling's splicing. The same in evaluation
        (each batch is scored just before) and where TRL skipped that pass (no old_per_token_logps).
        On later steps of the rollout they are the values recorded when it was scored."""
        recorded = inputs.get("old_per_token_logps")
        on_policy = not self.model.training or self.state.global_step == self._rollout_step
        if recorded is None or on_policy:
            return logp.detach(), entropy.detach()
        return recorded, inputs.get("old_entropy")

    def token_weight(self, inputs, *, logp, entropy, mask) -> tuple[torch.Tensor | None, dict[str, float]]:
        """The product of the weights of `self.token_weights` (B, T), or None when there are none.

        Each piece is a callable ``piece(trainer, inputs, logp=, entropy=, mask=) -> (weight or None,
        metrics)`` with detached (B, T) inputs: an objective-independent weight on the policy term
        (rollout correction, token selection, off-policy masking; see `policy_loss`'s token_weight).
        """
        weight, metrics = None, {}
        for piece in self.token_weights:
            w, m = piece(self, inputs, logp=logp.detach(), entropy=entropy.detach(), mask=mask)
            metrics.update(m)
            if w is not None:
                weight = w if weight is None else weight * w
        return weight, metrics

    def _log_loss_metrics(self, mode: str, metrics: dict[str, float], tokens: float) -> None:
        """Fold one micro-batch's loss metrics (over its `tokens` valid tokens) into the step's values
        (`tepo.training.step_metrics`: _min / _max names by min / max, the rest token-weighted, over
        micro-batches and processes). TRL's log averages each list of its metric buffer; each holds
        one value, the step's so far. Collective with several processes."""
        step = self._step_metrics[mode]
        for part, weight in gather_micro_batch(self.accelerator, metrics, tokens):
            step.add(part, weight)
        buffer = self.metric_values(mode)
        for name, value in step.values().items():
            buffer[name] = [value]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        super().log(logs, start_time)  # reads and clears TRL's metric buffer of `mode`
        self._step_metrics[mode].clear()


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off everywhere in `model`: every nn.Dropout (p = 0, as TRL's disable_dropout) and the
    attention dropout most transformers models apply from a float attribute `attention_dropout`
    (Llama, Qwen2, Mistral, ...), which TRL's switch leaves on. With dropout on, pi_old and the
    training pass would see different random masks."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    config = getattr(model, "config", None)
    if isinstance(getattr(config, "attention_dropout", None), float):
        config.attention_dropout = 0.0  # what is saved with the model


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest OUTPUT_DIR/checkpoint-N holding a readable trainer_state.json, or None.

    TEPOTrainer only ever creates complete checkpoints (see `_save_checkpoint`); this also guards
    against folders written by other tools or by older runs."""
    import json

    output_dir = str(output_dir)
    if not os.path.isdir(output_dir):
        return None
    candidates = []
    prefix = f"{PREFIX_CHECKPOINT_DIR}-"  # the naming rule of transformers' get_last_checkpoint
    for entry in os.listdir(output_dir):
        if entry.startswith(prefix) and entry[len(prefix):].isdigit():
            candidates.append((int(entry[len(prefix):]), os.path.join(output_dir, entry)))
    for _, path in sorted(candidates, reverse=True):
        try:
            with open(os.path.join(path, "trainer_state.json")) as f:
                json.load(f)
            return path
        except (OSError, ValueError):
            logger.warning("skipping incomplete checkpoint %s", path)
    return None


def summarize_hparams(args: TEPOConfig) -> dict[str, Any]:
    """The objective, every hyper-parameter value the loss uses and the advantage scale (for logs and
    run records)."""
    return {"objective": args.objective, **args.resolved_hparams(), "scale_rewards": args.resolved_scale_rewards()}
