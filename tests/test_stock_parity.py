"""TEPOTrainer against stock TRL `GRPOTrainer`, both training the same tiny model from the same seed.

Where an objective has a stock TRL counterpart (loss_type x importance_sampling_level x epsilon),
the two trainers must take the same optimiser steps: the same logged loss at every step and the
same weights at the end. Each case runs one rollout per optimiser step, the step split into two
accumulated micro-batches and the rollout used for two iterations (`num_iterations=2`), so that
the second step is off-policy (ratios != 1, clipping active) and the accumulation scaling counts.

Where they differ by design (documented in README and `tepo.training.distributed`), the test says
how, so that a change on either side shows up:
- token-mean objectives with several optimiser steps per rollout: stock TRL divides each step's
  token sum by the rollout's token count shared evenly between its steps; we divide by the step's
  own count (the exact token-mean);
- the entropy bonus: stock TRL averages micro-batch token-means for every loss type; ours uses the
  objective's aggregation over the whole step;
- KL to the reference: stock TRL 1.16 multiplies it by the importance ratio by default
  (`use_bias_correction_kl=True`); ours is the plain estimator (stock matches with it off).
gspo_token and tepo build their ratio with a stop-gradient form that rounds differently from
stock TRL's `exp(mean log-ratio)`, so their weights agree to float32 rounding, not bit for bit.
"""

from __future__ import annotations

import logging

import pytest
import torch
from trl import GRPOConfig, GRPOTrainer

from tepo.training import TEPOConfig, TEPOTrainer

from _tiny_llm import parity_reward, prompt_dataset, save_tiny, tiny_tokenizer

pytestmark = pytest.mark.slow

# objective -> the stock GRPOConfig fields that define the same loss
STOCK_LOSS = {
    "grpo": dict(loss_type="grpo", epsilon=0.2),
    "dapo": dict(loss_type="dapo", epsilon=0.2, epsilon_high=0.28),
    "dr_grpo": dict(loss_type="dr_grpo", epsilon=0.2),
    "gspo": dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4),
    # with one advantage per sequence, GSPO-token's value and gradient are GSPO's
    "gspo_token": dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4),
    # TEPO as first published (tepo_kl_coef=0): the sequence ratio with token-level aggregation
    "tepo": dict(loss_type="dapo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4),
}
ONE_STEP_PER_ROLLOUT = dict(steps_per_generation=2, gradient_accumulation_steps=2, num_iterations=2)
TWO_STEPS_PER_ROLLOUT = dict(steps_per_generation=2, gradient_accumulation_steps=1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # a folder, not a model object: stock TRL loads its reference model (beta > 0) from the path
    return save_tiny(tmp_path_factory.mktemp("parity") / "tiny")


def train(trainer_cls, config_cls, out, model_dir, **fields) -> tuple[list[float], torch.Tensor]:
    settings = dict(
        output_dir=str(out), per_device_train_batch_size=8, num_generations=4, max_completion_length=8,
        max_steps=4, learning_rate=1e-2, lr_scheduler_type="constant", use_cpu=True, bf16=False, seed=0,
        report_to=[], save_strategy="no", gradient_checkpointing=False, disable_tqdm=True, logging_steps=1,
    )
    trainer = trainer_cls(
        model=str(model_dir), reward_funcs=parity_reward, args=config_cls(**settings, **fields),
        train_dataset=prompt_dataset(), processing_class=tiny_tokenizer(),
    )
    logging.disable(logging.WARNING)  # TRL's per-step notices
    try:
        trainer.train()
    finally:
        logging.disable(logging.NOTSET)
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    return losses, weights


def both(tmp_path, model_dir, ours: dict, stock: dict, shape: dict):
    ours_run = train(TEPOTrainer, TEPOConfig, tmp_path / "tepo", model_dir, **ours, **shape)
    stock_run = train(GRPOTrainer, GRPOConfig, tmp_path / "stock", model_dir, **{"beta": 0.0, **stock, **shape})
    return ours_run, stock_run


def weights_moved(model_dir, weights) -> bool:
    from transformers import AutoModelForCausalLM

    start = torch.cat([p.detach().flatten() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters()])
    return (weights - start).abs().max().item() > 1e-3


@pytest.mark.parametrize(
    "objective, extra, stock_extra",
    [
        *[(name, {}, {}) for name in STOCK_LOSS],
        ("grpo", dict(beta_kl=0.04), dict(beta=0.04, use_bias_correction_kl=False)),
        ("dapo", dict(beta_kl=0.04), dict(beta=0.04, use_bias_correction_kl=False)),
    ],
    ids=[*STOCK_LOSS, "grpo-kl", "dapo-kl"],
)
def test_same_steps_as_stock_trl(tmp_path, model_dir, objective, extra, stock_extra):
    (ours, w_ours), (stock, w_stock) = both(
        tmp_path, model_dir, dict(objective=objective, **extra), {**STOCK_LOSS[objective], **stock_extra},
        ONE_STEP_PER_ROLLOUT,
    )
    assert len(ours) == len(stock) == 4
    assert weights_moved(model_dir, w_ours)
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(stock), rtol=1e-5, atol=1e-6)
    exact = objective not in ("gspo_token", "tepo")
    torch.testing.assert_close(w_ours, w_stock, rtol=0, atol=0 if exact else 1e-5)


@pytest.mark.parametrize("objective", ["grpo", "dr_grpo", "gspo"])
def test_sequence_mean_objectives_match_stock_trl_over_several_steps_per_rollout(tmp_path, model_dir, objective):
    (ours, w_ours), (stock, w_stock) = both(tmp_path, model_dir, dict(objective=objective), STOCK_LOSS[objective],
                                            TWO_STEPS_PER_ROLLOUT)
    assert weights_moved(model_dir, w_ours)
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(stock), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w_ours, w_stock, rtol=0, atol=0)


@pytest.mark.parametrize("objective", ["dapo", "tepo"])
def test_token_mean_over_several_steps_per_rollout_is_exact_where_stock_trl_shares_the_count(
    tmp_path, model_dir, objective
):
    """Two optimiser steps per rollout of completions of unequal length: stock TRL's step i divides
    its token sum by (tokens of the rollout) / 2, ours by the tokens of step i. The first step's
    losses differ by exactly that ratio; the weights then differ."""
    captured = []
    real = TEPOTrainer._compute_loss

    def spy(self, model, inputs):
        captured.append((int(inputs["completion_mask"].sum()), int(inputs["num_items_in_batch"])))
        return real(self, model, inputs)

    TEPOTrainer._compute_loss = spy
    try:
        (ours, w_ours), (stock, w_stock) = both(tmp_path, model_dir, dict(objective=objective),
                                                STOCK_LOSS[objective], TWO_STEPS_PER_ROLLOUT)
    finally:
        TEPOTrainer._compute_loss = real
    step_tokens, rollout_tokens = captured[0]
    assert step_tokens != rollout_tokens / 2, "the case needs steps of unequal token counts"
    assert ours[0] == pytest.approx(stock[0] * (rollout_tokens / 2) / step_tokens, rel=1e-5)
    assert (w_ours - w_stock).abs().max().item() > 1e-4
