"""Every private name of TRL's `GRPOTrainer` (and of transformers' `Trainer`) that tepo uses, in one
module, so that a TRL upgrade touches this file only. Written against TRL 1.16 / transformers 5.19.

`GRPOTrainerSeams` is `GRPOTrainer` with its private methods forwarded to public hooks that
`TEPOTrainer` implements, and its private state behind public names:

| TRL / transformers private name             | here                                          |
|---------------------------------------------|-----------------------------------------------|
| `_compute_loss(model, inputs)`              | hook `compute_policy_loss(model, inputs)`     |
| `_get_per_token_logps_and_entropies(...)`   | hook `score_tokens(...)`; TRL's own: `trl_score_tokens` |
| `_generate_and_score_completions(inputs)`   | hook `rollout(inputs)`; TRL's own: `trl_rollout` |
| `_calculate_rewards(...)`                   | hook `on_rewards(rewards_per_func, completion_ids)` |
| `_save_checkpoint(model, trial)`            | written under a staging folder, renamed into place |
| `_load_from_checkpoint(path)`               | `load_checkpoint(path)`                       |
| `_step` (micro-batches trained so far)      | `micro_step`                                  |
| `_buffered_inputs` (the rollout's micro-batches) | `rollout_buffer`                         |
| `_metrics[mode][name]` (TRL's metric buffer) | `metric_values(mode)`                        |
| `_tokenizer`                                 | `text_tokenizer`                             |
| `_entropy_bonus_enabled`                     | `disable_trl_entropy_bonus()`                |
| `_tag_names`, `_name` (the model card's tags and name) | class attributes of `GRPOTrainerSeams` |
| `VLLMGeneration._init_vllm()` (engine start) | hook `init_engine()`; TRL's own: `trl_init_engine()` (`vllm_generation_seams`) |
| `VLLMGeneration._iter_named_params()`        | `trl_named_params()`                           |
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOTrainer

# Checkpoints are written here first, then renamed to OUTPUT_DIR/checkpoint-N.
STAGING_DIR = ".checkpoint-staging"


class GRPOTrainerSeams(GRPOTrainer):
    """GRPOTrainer whose private methods call public hooks (see the module docstring)."""

    _tag_names = ["trl", "grpo", "tepo"]  # TRL's model card
    _name = "TEPO"

    # ---- hooks a subclass implements (defaults: TRL's behaviour)

    def compute_policy_loss(self, model, inputs) -> torch.Tensor:
        return super()._compute_loss(model, inputs)

    def score_tokens(self, model, input_ids, attention_mask, logits_to_keep, **kwargs):
        """Per-token log-probs (B, C), entropies (B, C) or None, and the MoE aux loss or None."""
        return self.trl_score_tokens(model, input_ids, attention_mask, logits_to_keep, **kwargs)

    def rollout(self, inputs) -> dict:
        return self.trl_rollout(inputs)

    def on_rewards(self, rewards_per_func: torch.Tensor, completion_ids: list) -> None:
        pass

    # ---- TRL's own implementations, for the hooks to call

    def trl_score_tokens(self, model, input_ids, attention_mask, logits_to_keep, **kwargs):
        return GRPOTrainer._get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, **kwargs)

    def trl_rollout(self, inputs) -> dict:
        return GRPOTrainer._generate_and_score_completions(self, inputs)

    # ---- TRL's private state, public names

    @property
    def micro_step(self) -> int:
        """Micro-batches trained so far on this process (TRL's `_step`)."""
        return int(self._step)

    @property
    def rollout_buffer(self) -> list[dict] | None:
        """The current rollout's micro-batches, `steps_per_generation` of them (TRL's `_buffered_inputs`)."""
        return self._buffered_inputs

    def metric_values(self, mode: str = "train") -> dict[str, list]:
        """TRL's metric buffer of `mode`: name -> values since the last log (its log averages each list)."""
        return self._metrics[mode]

    @property
    def text_tokenizer(self):
        """The tokenizer TRL decodes with (the processing class's own tokenizer for multimodal models)."""
        return self._tokenizer

    def disable_trl_entropy_bonus(self) -> None:
        """tepo's policy_loss applies entropy_coef itself; TRL's bonus branch lives in the loss it replaces."""
        self._entropy_bonus_enabled = False

    def load_checkpoint(self, path: str) -> None:
        """Load weights from a checkpoint folder (as `train(resume_from_checkpoint=path)` does first)."""
        self._load_from_checkpoint(path)

    # ---- the private methods, forwarded

    def _compute_loss(self, model, inputs):
        return self.compute_policy_loss(model, inputs)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, **kwargs):
        return self.score_tokens(model, input_ids, attention_mask, logits_to_keep, **kwargs)

    def _generate_and_score_completions(self, inputs):
        return self.rollout(inputs)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self.on_rewards(rewards_per_func, completion_ids_list)
        return rewards_per_func

    def _save_checkpoint(self, model, trial):
        """transformers writes checkpoint-N in place; here it is written under STAGING_DIR and renamed
        into place once complete (a rename is atomic), then old ones are rotated: a crash never leaves
        a half-written `checkpoint-N` that `resume_from_checkpoint=True` would pick."""
        from transformers.trainer_utils import rotate_checkpoints

        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = os.path.join(run_dir, STAGING_DIR)
        staged, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
        if self.args.should_save and os.path.exists(staged):
            shutil.rmtree(staged)  # left by a crash
        self.accelerator.wait_for_everyone()
        self._get_output_dir = lambda trial=None: staging_root  # instance attribute shadows the method
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        self.accelerator.wait_for_everyone()  # every rank has written its RNG state
        if self.args.should_save:
            if os.path.exists(final):  # the same step saved again (e.g. after a resume)
                old = staged + ".replaced"
                os.replace(final, old)
                shutil.rmtree(old)
            os.replace(staged, final)
            rotate_checkpoints(
                output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True,
            )
        self.accelerator.wait_for_everyone()


def pop_last_metric(trainer: GRPOTrainerSeams, name: str, mode: str = "train") -> None:
    """Drop the value TRL just appended to its metric buffer under `name` (one it logs that tepo replaces)."""
    values = trainer.metric_values(mode).get(name)
    if values:
        values.pop()



def vllm_generation_seams():
    """TRL's `VLLMGeneration` (its vLLM engine for rollouts) with its private engine start forwarded
    to a hook `init_engine()` (default TRL's, `trl_init_engine()`) and its weight iterator public as
    `trl_named_params()`. Built on call: TRL imports vLLM's side only when `use_vllm` is on."""
    from trl.generation import vllm_generation

    class VLLMGenerationSeams(vllm_generation.VLLMGeneration):
        def init_engine(self):
            return self.trl_init_engine()

        def trl_init_engine(self):
            return vllm_generation.VLLMGeneration._init_vllm(self)

        def trl_named_params(self):
            return self._iter_named_params()

        def _init_vllm(self):
            return self.init_engine()

    return VLLMGenerationSeams
