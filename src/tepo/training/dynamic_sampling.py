"""DAPO's dynamic sampling (`dynamic_sampling: true`): keep the prompt groups whose rewards disagree
and refill the rollout batch from freshly generated groups (docs/controls.md).

`DynamicSampling(trainer)(batch, rewards)` -> (batch, metrics). It needs three things of the
trainer: `score_round(inputs)` (one TRL rollout of `inputs`: batch, rewards, stats), `train_dataset`,
and `score_old_policy(batch, chunk=)` (pi_old's log-probs and entropies of a spliced batch).
"""

from __future__ import annotations

import logging
import math

import torch

from tepo.training import sampling

logger = logging.getLogger(__name__)


class DynamicSampling:
    def __init__(self, trainer):
        self.trainer = trainer
        self._generator = torch.Generator().manual_seed(int(trainer.args.seed) + 1)
        self._order: list[int] = []

    def refill_inputs(self, num_groups: int) -> list[dict]:
        """Fresh prompts, each repeated num_generations times (as TRL's sampler does)."""
        dataset, G = self.trainer.train_dataset, self.trainer.num_generations
        rows = []
        for _ in range(num_groups):
            if not self._order:
                self._order = torch.randperm(len(dataset), generator=self._generator).tolist()
            rows.append(dataset[self._order.pop()])
        return [row for row in rows for _ in range(G)]

    def __call__(self, batch: dict, rewards: torch.Tensor) -> tuple[dict, dict[str, float]]:
        """Keep the groups whose rewards disagree; refill from fresh prompts for at most
        max_resample_rounds rounds. If still short, train on what was kept, topped up with
        zero-variance rows only as far as steps_per_generation needs (equal chunks)."""
        trainer = self.trainer
        G, spg = trainer.num_generations, trainer.args.steps_per_generation
        pad_id = trainer.pad_token_id()
        num_groups = rewards.numel() // G
        varied = sampling.varied_groups(rewards, G)
        keep_rate = max(varied.float().mean().item(), 1.0 / num_groups)
        kept = [sampling.select_rows(batch, sampling.rows_of_groups(varied.nonzero().flatten(), G))]
        spare = [sampling.select_rows(batch, sampling.rows_of_groups((~varied).nonzero().flatten(), G))]
        have, rounds = int(varied.sum()), 0
        while have < num_groups and rounds < trainer.args.max_resample_rounds:
            rounds += 1
            missing = num_groups - have
            draw = min(num_groups, math.ceil(missing / keep_rate))  # oversample at the rate seen so far
            more, more_rewards, _ = trainer.score_round(self.refill_inputs(draw))
            more_varied = sampling.varied_groups(more_rewards, G)
            take = more_varied.nonzero().flatten()[:missing]
            kept.append(sampling.select_rows(more, sampling.rows_of_groups(take, G)))
            spare.append(sampling.select_rows(more, sampling.rows_of_groups((~more_varied).nonzero().flatten(), G)))
            have += take.numel()
        short = have < num_groups
        parts = [k for k in kept if k["advantages"].numel()]
        if short:
            rows = have * G
            target = max(spg, math.ceil(rows / spg) * spg)
            pool = sampling.concat_batches([s for s in spare if s["advantages"].numel()], pad_token_id=pad_id)
            parts.append(sampling.select_rows(pool, torch.arange(target - rows)))
            logger.warning(
                "dynamic sampling: %d of %d groups have reward variance after %d refill rounds; training on "
                "%d completions (%d zero-variance rows added to fill %d equal chunks)",
                have, num_groups, rounds, target, target - rows, spg,
            )
        merged = sampling.trim_prompt_padding(sampling.concat_batches(parts, pad_token_id=pad_id))
        merged["num_items_in_batch"] = merged["completion_mask"].sum()
        if "old_per_token_logps" in merged:
            # Splicing changed the padding each row was scored with; in bf16 that alone moves a
            # log-prob by ~1e-4, more than TEPO's 3e-4 clip on a sequence mean. Score pi_old again on
            # exactly the tensors (and micro-batch size) the later optimiser steps of this rollout
            # will see (the first one takes its own pass's values: TEPOTrainer.pi_old).
            merged["old_per_token_logps"], merged["old_entropy"] = trainer.score_old_policy(
                merged, chunk=merged["advantages"].numel() // spg
            )
        metrics = {
            "dynamic_sampling/rounds": float(rounds),
            "dynamic_sampling/kept_frac": have / num_groups,
            "dynamic_sampling/short": float(short),
        }
        return merged, metrics
