"""TEPOTrainer against stock TRL `GRPOTrainer`, both training the same tiny model from the same seed.

Where an objective has a stock TRL counterpart (loss_type x importance_sampling_level x epsilon),
the two trainers must take the same optimiser steps: the same logged loss at every step and the
same weights at the end. Each case runs one rollout per optimiser step, the step split into two
accumulated micro-batches and the rollout used for two iterations (`num_iterations=2`), so that
the second step is off-policy (ratios != 1, clipping active) and the accumulation scaling counts.

The stock config is `tepo.training.stock.stock_trl_config` of ours (it sets stock TRL 1.16's
`use_bias_correction_kl` off: that default multiplies the KL to the reference by the importance
ratio; ours is the plain estimator). Where the two differ by design (see that module), a test pins
the one that matters at default settings: token-mean objectives with several optimiser steps per
rollout, where stock TRL divides each step's token sum by the rollout's token count shared evenly
between its steps and we by the step's own count (the exact token-mean).
gspo_token and tepo build their ratio with a stop-gradient form that rounds differently from
stock TRL's `exp(mean log-ratio)`, so their weights agree to float32 rounding, not bit for bit.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tepo.training import TEPOConfig, TEPOTrainer
from tepo.training.stock import STOCK_TRL_LOSS, stock_trl_config, stock_trl_trainer_class

from _tiny_llm import parity_reward, prompt_dataset, save_tiny, tiny_tokenizer, tiny_train_argv

ROOT = Path(__file__).resolve().parent.parent

ONE_STEP_PER_ROLLOUT = dict(steps_per_generation=2, gradient_accumulation_steps=2, num_iterations=2)
TWO_STEPS_PER_ROLLOUT = dict(steps_per_generation=2, gradient_accumulation_steps=1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # a folder, not a model object: stock TRL loads its reference model (beta > 0) from the path
    return save_tiny(tmp_path_factory.mktemp("parity") / "tiny")


SETTINGS = dict(
    per_device_train_batch_size=8, num_generations=4, max_completion_length=8, max_steps=4, learning_rate=1e-2,
    lr_scheduler_type="constant", use_cpu=True, bf16=False, seed=0, report_to=[], save_strategy="no",
    gradient_checkpointing=False, disable_tqdm=True, logging_steps=1,
)


def train(trainer_cls, config, model_dir) -> tuple[list[float], torch.Tensor]:
    trainer = trainer_cls(
        model=str(model_dir), reward_funcs=parity_reward, args=config,
        train_dataset=prompt_dataset(), processing_class=tiny_tokenizer(),
    )
    logging.disable(logging.WARNING)  # TRL's per-step notices
    try:
        trainer.train()
    finally:
        logging.disable(logging.NOTSET)
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return losses, flat(trainer.model)


def both(tmp_path, model_dir, shape: dict, **tepo_fields):
    """TEPOTrainer with TEPOConfig(**tepo_fields) and stock TRL's trainer (GRPOTrainer; GMPOTrainer for
    gmpo) with `stock_trl_config` of it. Ours runs the plain path (shared_prefix=False, the same
    computation as stock TRL's, bit for bit) unless tepo_fields says otherwise."""
    tepo_fields.setdefault("shared_prefix", False)
    ours = TEPOConfig(output_dir=str(tmp_path / "tepo"), **SETTINGS, **shape, **tepo_fields)
    stock = stock_trl_config(ours)
    stock.output_dir = str(tmp_path / "stock")
    assert stock.scale_rewards == ours.resolved_scale_rewards()  # the same advantages (dr_grpo: "none")
    return train(TEPOTrainer, ours, model_dir), train(stock_trl_trainer_class(ours.objective), stock, model_dir)


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def weights_moved(model_dir, weights) -> bool:
    from transformers import AutoModelForCausalLM

    return (weights - flat(AutoModelForCausalLM.from_pretrained(model_dir))).abs().max().item() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize(
    "objective, extra",
    [*[(name, {}) for name in STOCK_TRL_LOSS], ("grpo", dict(beta_kl=0.04)), ("dapo", dict(beta_kl=0.04)),
     # hyper-parameters that bind on the off-policy step (ratios 0.6-1.7 there), in TRL's names and units
     ("cispo", dict(clip_high=0.2)), ("sapo", dict(sapo_temperature_pos=2.0, sapo_temperature_neg=0.5)),
     ("luspo", dict(clip_low=0.2, clip_high=0.2, beta_kl=0.04)),
     ("vespo", dict(vespo_k_pos=1.0, vespo_lambda_pos=0.5, vespo_k_neg=4.0, vespo_lambda_neg=3.0)),
     ("gmpo", dict(log_clip_low=0.1, log_clip_high=0.1, beta_kl=0.04))],
    ids=[*STOCK_TRL_LOSS, "grpo-kl", "dapo-kl", "cispo-cap1.2", "sapo-tau", "luspo-clip-kl", "vespo-kl", "gmpo-clip-kl"],
)
def test_same_steps_as_stock_trl(tmp_path, model_dir, objective, extra):
    (ours, w_ours), (stock, w_stock) = both(tmp_path, model_dir, ONE_STEP_PER_ROLLOUT, objective=objective, **extra)
    assert len(ours) == len(stock) == 4
    assert weights_moved(model_dir, w_ours)
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(stock), rtol=1e-5, atol=1e-6)
    exact = objective not in ("gspo_token", "tepo")
    torch.testing.assert_close(w_ours, w_stock, rtol=0, atol=0 if exact else 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["grpo", "dapo"])
def test_shared_prefix_takes_stock_trls_steps_to_float32_rounding(tmp_path, model_dir, objective):
    """The shared-prefix path (on by default) against stock TRL: the same steps up to the rounding of
    a different summation order in attention."""
    (ours, w_ours), (stock, w_stock) = both(tmp_path, model_dir, ONE_STEP_PER_ROLLOUT, objective=objective,
                                           shared_prefix=True)
    assert weights_moved(model_dir, w_ours)
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(stock), rtol=1e-5, atol=1e-6)
    # AdamW divides each gradient by its running scale, so float32 rounding in a near-zero gradient
    # moves that weight by up to ~lr-sized amounts (here lr = 1e-2: differences of ~1e-5 seen)
    torch.testing.assert_close(w_ours, w_stock, rtol=0, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["grpo", "dr_grpo", "gspo"])
def test_sequence_mean_objectives_match_stock_trl_over_several_steps_per_rollout(tmp_path, model_dir, objective):
    (ours, w_ours), (stock, w_stock) = both(tmp_path, model_dir, TWO_STEPS_PER_ROLLOUT, objective=objective)
    assert weights_moved(model_dir, w_ours)
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(stock), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w_ours, w_stock, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["dapo", "tepo"])
def test_token_mean_over_several_steps_per_rollout_is_exact_where_stock_trl_shares_the_count(
    tmp_path, monkeypatch, model_dir, objective
):
    """Two optimiser steps per rollout of completions of unequal length: stock TRL's step i divides
    its token sum by (tokens of the rollout) / 2, ours by the tokens of step i. The first step's
    losses differ by exactly that ratio; the weights then differ."""
    captured = []
    real = TEPOTrainer._compute_loss

    def spy(self, model, inputs):
        captured.append((int(inputs["completion_mask"].sum()), int(inputs["num_items_in_batch"])))
        return real(self, model, inputs)

    monkeypatch.setattr(TEPOTrainer, "_compute_loss", spy)
    (ours, w_ours), (stock, w_stock) = both(tmp_path, model_dir, TWO_STEPS_PER_ROLLOUT, objective=objective)
    step_tokens, rollout_tokens = captured[0]
    assert step_tokens != rollout_tokens / 2, "the case needs steps of unequal token counts"
    assert ours[0] == pytest.approx(stock[0] * (rollout_tokens / 2) / step_tokens, rel=1e-5)
    assert (w_ours - w_stock).abs().max().item() > 1e-4


# The objective-independent controls (docs/controls.md) against TRL's own. One micro-batch per step
# where the control's scope is the micro-batch in TRL (top_entropy_quantile's quantile, the entropy
# bonus's token-mean): there it is the step's, as here.
ONE_MICRO_BATCH_PER_STEP = dict(steps_per_generation=1, gradient_accumulation_steps=1, num_iterations=2)
ADAPTIVE_ENTROPY = dict(use_adaptive_entropy=True, entropy_coef=0.05, entropy_target=10.0, entropy_coef_delta=0.05)
CONTROL_CASES = {
    "grpo-top-entropy": ("grpo", ONE_MICRO_BATCH_PER_STEP, dict(top_entropy_quantile=0.5)),
    "dapo-top-entropy": ("dapo", ONE_MICRO_BATCH_PER_STEP, dict(top_entropy_quantile=0.2)),
    "gspo-top-entropy": ("gspo", ONE_MICRO_BATCH_PER_STEP, dict(top_entropy_quantile=0.5)),
    "grpo-off-policy-mask": ("grpo", ONE_STEP_PER_ROLLOUT, dict(off_policy_mask_threshold=0.0)),
    "dapo-off-policy-mask": ("dapo", ONE_STEP_PER_ROLLOUT, dict(off_policy_mask_threshold=0.0)),
    "dapo-adaptive-entropy": ("dapo", ONE_MICRO_BATCH_PER_STEP, ADAPTIVE_ENTROPY),
    "tepo-adaptive-entropy": ("tepo", ONE_MICRO_BATCH_PER_STEP, ADAPTIVE_ENTROPY),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CONTROL_CASES))
def test_controls_take_the_same_steps_as_stock_trl(tmp_path, monkeypatch, model_dir, case):
    import tepo.training.trainer as trainer_module

    objective, shape, control = CONTROL_CASES[case]
    acted = []  # the control changed the loss: a token weight of 0 on a valid token, or a bonus > 0
    real = trainer_module.policy_loss

    def spy(name, **kwargs):
        w = kwargs["token_weight"]
        acted.append((kwargs["entropy_coef"] or 0) > 0 or (w is not None and bool(((w == 0) & kwargs["mask"].bool()).any())))
        return real(name, **kwargs)

    monkeypatch.setattr(trainer_module, "policy_loss", spy)
    (ours, w_ours), (stock, w_stock) = both(tmp_path, model_dir, shape, objective=objective, **control)
    assert any(acted) and weights_moved(model_dir, w_ours)
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(stock), rtol=1e-5, atol=1e-6)
    exact = objective not in ("gspo_token", "tepo")
    torch.testing.assert_close(w_ours, w_stock, rtol=0, atol=0 if exact else 1e-5)


# ----------------------------------------------------------------------------------------------
# stock_trl_config itself (no training)


def test_stock_config_maps_the_new_objectives_hyperparameters(tmp_path):
    def stock(**fields_):
        return stock_trl_config(TEPOConfig(output_dir=str(tmp_path), **SETTINGS, **fields_))

    cispo = stock(objective="cispo", clip_high=0.2)
    assert (cispo.loss_type, cispo.epsilon_high) == ("cispo", 1.2)  # TRL caps the weight at epsilon_high itself
    sapo = stock(objective="sapo", sapo_temperature_neg=2.0)
    assert (sapo.loss_type, sapo.sapo_temperature_pos, sapo.sapo_temperature_neg) == ("sapo", 1.0, 2.0)
    luspo = stock(objective="luspo")
    assert (luspo.loss_type, luspo.importance_sampling_level, luspo.epsilon, luspo.epsilon_high) == (
        "luspo", "sequence", 3e-4, 4e-4)
    vespo = stock(objective="vespo", vespo_k_neg=5.0)
    assert (vespo.loss_type, vespo.vespo_k_pos, vespo.vespo_lambda_pos, vespo.vespo_k_neg, vespo.vespo_lambda_neg) == (
        "vespo", 2.0, 3.0, 5.0, 2.0)
    gmpo = stock(objective="gmpo", log_clip_high=0.3)
    assert type(gmpo).__name__ == "GMPOConfig" and (gmpo.epsilon, gmpo.epsilon_high) == (0.4, 0.3)
    assert stock_trl_trainer_class("gmpo").__name__ == "GMPOTrainer"
    assert stock_trl_trainer_class("sapo").__name__ == "GRPOTrainer"


def test_stock_config_keeps_every_other_setting(tmp_path):
    ours = TEPOConfig(output_dir=str(tmp_path), objective="tepo", clip_high=1e-3, **SETTINGS, steps_per_generation=4,
                      temperature=0.7, model_init_kwargs={"dtype": "float32"})
    stock = stock_trl_config(ours)
    a, b = ours.to_dict(), stock.to_dict()
    loss_fields = {"loss_type", "importance_sampling_level", "epsilon", "epsilon_high", "top_entropy_quantile",
                   "entropy_coef", "scale_rewards"}
    tepo_only = set(a) - set(b)
    assert {k for k in a if a[k] != b.get(k)} - loss_fields - tepo_only == set()
    assert (stock.loss_type, stock.importance_sampling_level) == ("dapo", "sequence")
    assert (stock.epsilon, stock.epsilon_high, stock.beta) == (3e-4, 1e-3, 0.0)
    assert stock.steps_per_generation == 4 and stock.generation_batch_size == ours.generation_batch_size


def test_stock_config_takes_the_advantage_scale_tepo_trains_with(tmp_path):
    def stock(**fields_):
        return stock_trl_config(TEPOConfig(output_dir=str(tmp_path), **SETTINGS, **fields_)).scale_rewards

    assert stock(objective="dr_grpo") == "none"  # Dr. GRPO: no division by the group std, on both sides
    assert stock(objective="grpo") == stock(objective="tepo") == "group"
    assert stock(objective="dr_grpo", scale_rewards="group") == "group"  # an explicit choice is kept


@pytest.mark.parametrize(
    "fields_, message",
    [
        (dict(objective="clip_cov"), "objective='clip_cov' has no stock TRL counterpart"),
        (dict(objective="tepo", tepo_kl_coef=0.1), "tepo_kl_coef=0.1: stock TRL has no KL mask"),
        (dict(objective="tepo", adaptive_tepo=True), "adaptive_tepo=True: stock TRL has no KL mask to adapt"),
        (dict(objective="grpo", agg="token-mean"), "agg='token-mean': stock TRL's grpo aggregates as"),
        (dict(objective="grpo", beta_kl=0.1, kl_estimator="k2"), "kl_estimator='k2'"),
        (dict(objective="dr_grpo", max_len=16), "max_len=16: stock TRL's dr_grpo divides by max_completion_length=8"),
        (dict(objective="gpg"), "objective='gpg' has no stock TRL counterpart"),
        (dict(objective="cispo", clip_low=0.5), "clip_low=0.5: stock TRL's cispo has no lower bound"),
        (dict(objective="gmpo", entropy_coef=0.01), "entropy_coef=0.01: stock TRL's GMPOTrainer has no entropy bonus"),
    ],
)
def test_stock_config_refuses_what_stock_trl_lacks(tmp_path, fields_, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        stock_trl_config(TEPOConfig(output_dir=str(tmp_path), **SETTINGS, **fields_))


# ----------------------------------------------------------------------------------------------
# bench/stock_trl.py: stock TRL from a `tepo train` command line


def run_stock_bench(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, str(ROOT / "bench" / "stock_trl.py"), *argv], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_stock_bench_trains_stock_trl_and_evaluates(tmp_path):
    out = tmp_path / "out"
    argv = tiny_train_argv(save_tiny(tmp_path / "tiny"), out, objective="tepo", max_steps=3, save_strategy="no")
    done = run_stock_bench(*argv)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "GRPOTrainer loss_type=dapo importance_sampling_level=sequence epsilon=0.0003/0.0004" in done.stdout
    summary = json.loads((out / "stock_summary.json").read_text())
    assert summary["steps"] == 3 and len(summary["log"]) == 3
    assert summary["heldout_before"]["num_problems"] == summary["heldout_after"]["num_problems"] == 4
    before = json.loads((out / "eval_before.json").read_text())
    assert len(before["ids"]) == 4 and before["step"] == 0
    assert summary["reward_first5_last5"][0] is not None  # stock TRL logs "reward" at the rollout steps


def test_stock_bench_refuses_an_objective_stock_trl_lacks(tmp_path):
    done = run_stock_bench("--task", "arithmetic", "--objective", "kl_cov", "--output_dir", str(tmp_path / "o"))
    assert done.returncode == 2
    assert "objective='kl_cov' has no stock TRL counterpart" in done.stderr
    assert not (tmp_path / "o").exists()
