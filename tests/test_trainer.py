"""TEPOTrainer on a tiny random Llama: every objective trains, the loss is exactly `policy_loss` on
TRL's tensors, dynamic sampling, the non-finite guard, and config validation."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from trl import GRPOTrainer

import tepo.training.trainer as trainer_module
from tepo.objectives import list_objectives
from tepo.training import METRIC_KEYS, TEPOConfig, TEPOTrainer, read_metrics

from _tiny_llm import parity_reward, prompt_dataset, small_config, text_parity, tiny_model, tiny_tokenizer


def make_trainer(tmp_path, reward=parity_reward, dataset=None, **overrides):
    tok = tiny_tokenizer()
    args = small_config(tmp_path / "run", **overrides)
    return TEPOTrainer(
        model=tiny_model(tok), reward_funcs=reward, args=args,
        train_dataset=dataset if dataset is not None else prompt_dataset(), processing_class=tok,
    )


def params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


# ----------------------------------------------------------------------------------------------
# config validation (no model)

BASE = dict(per_device_train_batch_size=8, num_generations=4, max_completion_length=8, use_cpu=True)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(objective="ppo"), "objective='ppo' is not known; valid: "),
        (dict(loss_type="grpo"), "set --objective"),
        (dict(epsilon=0.1), "set --clip_low"),
        (dict(epsilon_high=0.3), "set --clip_high"),
        (dict(importance_sampling_level="sequence"), "importance_sampling_level"),
        (dict(delta=2.0), "delta"),
        (dict(beta=0.04), "set --beta_kl"),
        (dict(cov_ratio=0.1), "cov_ratio=0.1 is not a hyper-parameter of objective 'tepo'"),
        (dict(objective="kl_cov", clip_low=0.2), "clip_low=0.2 is not a hyper-parameter of objective 'kl_cov'"),
        (dict(clip_low=1.5), "clip_low must be in [0, 1]"),
        (dict(agg="mean"), "agg='mean' is not one of"),
        (dict(kl_estimator="k4"), "kl_estimator='k4' is not one of"),
        (dict(objective="clip_cov", cov_lb=5.0, cov_ub=1.0), "cov_lb < cov_ub"),
        (dict(num_generations=3), "must be divisible by num_generations=3"),
        (dict(logging_steps=10), "logging_steps=10: must be 1"),
        (dict(max_len=4), "max_len=4 is shorter than max_completion_length=8"),
        (dict(max_nonfinite_steps=0), "max_nonfinite_steps=0 must be an integer >= 1"),
        (dict(max_resample_rounds=-1), "max_resample_rounds=-1"),
        (dict(temperature=0.0), "temperature=0.0 must be > 0"),
    ],
)
def test_config_refuses_bad_settings(tmp_path, overrides, message):
    with pytest.raises(ValueError) as err:
        TEPOConfig(output_dir=str(tmp_path), **{**BASE, **overrides})
    assert message in str(err.value)


def test_config_maps_beta_kl_to_trl_reference_model(tmp_path):
    assert TEPOConfig(output_dir=str(tmp_path), **BASE).beta == 0.0
    cfg = TEPOConfig(output_dir=str(tmp_path), beta_kl=0.05, **BASE)
    assert cfg.beta == 0.05 and cfg.resolved_hparams()["beta_kl"] == 0.05


@pytest.mark.parametrize("objective, warns", [("tepo", False), ("grpo", False), ("kl_cov", True), ("clip_cov", True)])
def test_config_warns_about_accumulation_only_where_it_changes_the_objective(tmp_path, objective, warns):
    # Token means are rescaled to the whole step and sequence means are exact over equal micro-batches;
    # the covariance objectives pick their tokens within each micro-batch.
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        TEPOConfig(output_dir=str(tmp_path), **{**BASE, "objective": objective, "gradient_accumulation_steps": 2})
    messages = [str(w.message) for w in caught if "gradient_accumulation_steps=2" in str(w.message)]
    assert bool(messages) == warns, messages
    if warns:
        assert f"{objective} selects its tokens by covariance within each micro-batch" in messages[0]


def test_config_hparams_default_to_objective_defaults(tmp_path):
    cfg = TEPOConfig(output_dir=str(tmp_path), objective="dapo", clip_high=0.3, **BASE)
    hp = cfg.resolved_hparams()
    assert hp["clip_low"] == 0.2 and hp["clip_high"] == 0.3 and hp["agg"] == "token-mean"
    assert cfg.objective_hparams()["max_len"] == 8  # the generation budget, not each batch's T


def test_config_scale_rewards_defaults_to_the_objectives_own(tmp_path):
    def cfg(**kw):
        return TEPOConfig(output_dir=str(tmp_path), **BASE, **kw)

    assert cfg(objective="dr_grpo").scale_rewards is None  # unset stays unset ...
    assert cfg(objective="dr_grpo").resolved_scale_rewards() == "none"  # ... and means Dr. GRPO's own
    assert cfg(objective="grpo").resolved_scale_rewards() == "group"
    assert cfg(objective="dr_grpo", scale_rewards="group").resolved_scale_rewards() == "group"  # set wins
    assert cfg(objective="grpo", scale_rewards="none").resolved_scale_rewards() == "none"
    assert cfg(objective="dr_grpo", scale_rewards=True).resolved_scale_rewards() == "group"  # TRL's bools
    with pytest.raises(ValueError, match="scale_rewards='std' is not one of group, batch, none"):
        cfg(scale_rewards="std")


# ----------------------------------------------------------------------------------------------
# every objective trains


@pytest.mark.slow
@pytest.mark.parametrize("objective", list_objectives())
def test_each_objective_trains(tmp_path, objective):
    tr = make_trainer(tmp_path, objective=objective)
    before = params(tr.model)
    tr.train()
    assert not torch.equal(before, params(tr.model)), "the weights did not move"
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert set(METRIC_KEYS) <= set(row)
        for key in ("loss", "grad_norm", "reward_mean", "entropy_mean", "clip_frac", "approx_kl", "step_time_s"):
            assert row[key] is not None and math.isfinite(row[key]), (key, row[key])
        assert 0.0 <= row["clip_frac"] <= 1.0 and 0.0 <= row["zero_var_frac"] <= 1.0
        assert row["ratio_min"] <= row["ratio_mean"] <= row["ratio_max"]
        assert row["completion_len_max"] <= 8 and row["tokens_per_s"] > 0
    # step 1 is on-policy (ratio exactly 1); step 2 reuses the rollout after an update
    assert rows[0]["ratio_min"] == rows[0]["ratio_max"] == 1.0
    assert rows[1]["ratio_min"] < 1.0 < rows[1]["ratio_max"] or rows[1]["approx_kl"] > 0
    assert (rows[1]["kl_mask_frac"] is not None) == (objective == "tepo")
    assert (rows[1]["cov_selected"] is not None) == (objective in ("clip_cov", "kl_cov"))


# ----------------------------------------------------------------------------------------------
# advantages: each objective's own scale


class RecordedReward:
    """parity_reward x 3 (0 or 3: a group's std is not 1), remembering what it returned, in order."""

    __name__ = "recorded_reward"

    def __init__(self):
        self.returned: list[float] = []

    def __call__(self, completions, **kwargs):
        rewards = [3.0 * r for r in parity_reward(completions)]
        self.returned.extend(rewards)
        return rewards


def expected_advantages(rewards: list[float], group: int, scale: str) -> list[float]:
    """By hand: reward minus its group's mean; with scale "group" divided by the group's (unbiased)
    std + 1e-4 (TRL's epsilon)."""
    out = []
    for g in range(0, len(rewards), group):
        r = rewards[g:g + group]
        mean = sum(r) / group
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / (group - 1))
        out += [(x - mean) / (std + 1e-4) if scale == "group" else x - mean for x in r]
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "objective, scale_rewards, scale",
    [("dr_grpo", None, "none"), ("dr_grpo", "group", "group"), ("grpo", None, "group")],
)
def test_advantages_have_the_objectives_scale_unless_set(tmp_path, monkeypatch, objective, scale_rewards, scale):
    seen = []
    real = trainer_module.policy_loss

    def spy(name, **kw):
        seen.append(kw["advantages"].clone())
        return real(name, **kw)

    monkeypatch.setattr(trainer_module, "policy_loss", spy)
    reward = RecordedReward()
    tr = make_trainer(tmp_path, reward=reward, objective=objective, scale_rewards=scale_rewards)
    assert tr.scale_rewards == scale
    tr.train()
    assert len(reward.returned) == 16 and len(seen) == 2  # one rollout of 4 groups, trained in 2 steps
    expected = torch.tensor(sorted(expected_advantages(reward.returned, 4, scale)))
    got = torch.cat(seen).sort().values  # the rollout is shuffled before it is split into steps
    assert got.abs().max() > 0.5, "every group agreed: nothing to compare"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# the seam: what _compute_loss hands to policy_loss


@pytest.mark.slow
def test_loss_is_policy_loss_on_trl_tensors(tmp_path, monkeypatch):
    calls = []
    real = trainer_module.policy_loss

    def spy(name, **kw):
        out = real(name, **kw)
        calls.append({"name": name, "out": out, **{k: v for k, v in kw.items()}})
        return out

    monkeypatch.setattr(trainer_module, "policy_loss", spy)
    reward = RecordedReward()
    tr = make_trainer(tmp_path, reward=reward, objective="tepo", tepo_kl_coef=0.5, clip_high=0.01, max_steps=2)
    scored = []
    real_score_round = tr.score_round

    def score_round(inputs):
        batch, rewards, stats = real_score_round(inputs)
        scored.append(batch)
        return batch, rewards, stats

    tr.score_round = score_round
    rollout_time_model = copy.deepcopy(tr.model).eval()  # the weights the rollout is sampled and scored with
    tr.train()
    assert len(calls) == 2 and all(c["name"] == "tepo" for c in calls)
    first, second = calls
    for c in calls:
        assert c["tepo_kl_coef"] == 0.5 and c["clip_high"] == 0.01 and c["max_len"] == 8
        assert c["advantages"].shape == (8,) and c["logp"].shape == c["mask"].shape == c["old_logp"].shape
        assert c["entropy"] is not None and c["old_entropy"] is not None
        assert c["old_logp"].requires_grad is False and c["logp"].requires_grad
    # step 2 trains on the same rollout after an update: pi_old and its entropy are the rows recorded when
    # the rollout was scored (it is shuffled before it is split into steps), not the current policy's
    (batch,) = scored
    # ... and those recorded rows are the rollout-time policy's: recomputed with a copy of its weights
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    with torch.no_grad():
        again, again_entropy, _ = GRPOTrainer._get_per_token_logps_and_entropies(
            tr, rollout_time_model, ids, attention, batch["completion_ids"].size(1), batch_size=ids.size(0),
            compute_entropy=True,
        )
    valid = batch["completion_mask"].bool()
    assert torch.allclose(again[valid], batch["old_per_token_logps"][valid], rtol=0, atol=1e-6)
    assert torch.allclose(again_entropy[valid], batch["old_entropy"][valid], rtol=0, atol=1e-6)
    for old_logp, old_entropy in zip(second["old_logp"], second["old_entropy"]):
        same = (batch["old_per_token_logps"] == old_logp).all(dim=1) & (batch["old_entropy"] == old_entropy).all(dim=1)
        assert same.any(), "a row of step 2's pi_old is not a row of the rollout's"
    m = second["mask"].bool()
    assert not torch.allclose(second["old_entropy"][m], second["entropy"].detach()[m], rtol=1e-5, atol=1e-5)
    # the logged loss is exactly the objective's loss (gradient_accumulation_steps == 1)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    for c, row in zip(calls, rows):
        assert row["loss"] == pytest.approx(c["out"].loss.item(), rel=1e-6, abs=1e-9)
        assert row["clip_frac"] == pytest.approx(c["out"].metrics["clip_frac"])
        assert row["kl_mask_frac"] == pytest.approx(c["out"].metrics["kl_mask_frac"])
    # the advantages are the rollout's rewards, group-normalised (tepo's scale), computed by hand
    expected = torch.tensor(sorted(expected_advantages(reward.returned, 4, "group")))
    assert expected.abs().max() > 0.5, "every group agreed: nothing to compare"
    torch.testing.assert_close(torch.cat([c["advantages"] for c in calls]).sort().values, expected,
                               rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# metrics of an optimiser step made of several micro-batches


def test_step_metrics_combine_by_name():
    from tepo.training.step_metrics import StepMetrics

    step = StepMetrics()
    step.add({"clip_frac": 0.5, "ratio_min": 0.9, "ratio_max": 1.1, "kl_mask_frac": float("nan")}, weight=2)
    step.add({"clip_frac": 0.0, "ratio_min": 0.8, "ratio_max": 1.05, "kl_mask_frac": 0.25}, weight=6)
    step.add({"clip_frac": 1.0, "ratio_min": 0.0, "ratio_max": 0.0, "kl_mask_frac": 1.0}, weight=0)  # no valid token
    v = step.values()
    assert v["clip_frac"] == pytest.approx((2 * 0.5 + 6 * 0.0) / 8)  # token-weighted: 1 of 8 tokens clipped
    assert (v["ratio_min"], v["ratio_max"]) == (0.8, 1.1)  # the empty micro-batch's 0 is not a ratio
    assert v["kl_mask_frac"] == 0.25  # NaN left out, with its weight
    step.clear()
    assert step.values() == {}


def lengths_vary(tok):
    """generation_kwargs for completions of varied lengths (the tiny model rarely samples EOS)."""
    return {"sequence_bias": [[[tok.eos_token_id], 4.0]]}


@pytest.mark.slow
@pytest.mark.parametrize("objective, extra", [("dapo", {}), ("tepo", {"tepo_kl_coef": 0.5})])
def test_accumulated_micro_batches_log_what_one_micro_batch_logs(tmp_path, monkeypatch, objective, extra):
    """2 accumulated micro-batches of 4 and 1 micro-batch of 8, same rollout of 16, 2 optimiser steps
    (SGD, so the weights after step 1 agree to rounding): the same ratio extremes, token-weighted
    means and loss on step 2 (step 1 is on-policy), for the objective's metrics and a token-weight
    piece's."""
    calls = {}
    real = trainer_module.policy_loss

    def spy(name, **kw):
        out = real(name, **kw)
        calls.setdefault(tag, []).append((out.metrics, float(kw["mask"].sum())))
        return out

    def piece(trainer, inputs, *, logp, entropy, mask):
        m = mask.bool()
        return None, {"piece_logp_mean": logp[m].mean().item(), "piece_logp_min": logp[m].min().item()}

    monkeypatch.setattr(trainer_module, "policy_loss", spy)
    tok = tiny_tokenizer()
    rows = {}
    for tag, shape in (("one", dict(per_device_train_batch_size=8, gradient_accumulation_steps=1, steps_per_generation=2)),
                       ("two", dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, steps_per_generation=4))):
        args = small_config(tmp_path / tag, objective=objective, optim="sgd", learning_rate=0.5,
                            generation_kwargs=lengths_vary(tok), **extra, **shape)
        tr = TEPOTrainer(model=tiny_model(tok), reward_funcs=parity_reward, args=args,
                         train_dataset=prompt_dataset(), processing_class=tok)
        tr.token_weights.append(piece)
        tr.train()
        rows[tag] = [r for r in tr.state.log_history if "loss" in r]  # every logged key, by step
    one, two = rows["one"][1], rows["two"][1]
    keys = [k for k in calls["one"][0][0]] + ["loss"]
    assert {"ratio_min", "ratio_max", "clip_frac", "entropy_mean", "approx_kl", "piece_logp_min"} <= set(keys)
    for key in keys:
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key
    # the test can tell: step 2's micro-batches differ in tokens and values, so averaging them (the old
    # log) misses the step's ratio extremes and token means by far more than the tolerance above
    # (not entropy_mean: the random model's entropy is about the same everywhere)
    (m1, n1), (m2, n2) = calls["two"][2:4]
    assert n1 != n2
    plain = {k: (m1[k] + m2[k]) / 2 for k in ("ratio_max", "ratio_min", "approx_kl", "ratio_mean", "clip_frac")}
    missed = {k: (plain[k], one[k]) for k in plain if abs(plain[k] - one[k]) <= 1e-4 * abs(one[k])}
    assert not missed, missed


# ----------------------------------------------------------------------------------------------
# pi_old: exactly on-policy until the first optimiser step after a rollout


def perturb_recorded_pi_old(trainer, size=1e-3):
    """Make the rollout's no-grad pass (TRL's old_per_token_logps, our old_entropy) differ from the
    training pass by `size`, as compilation or another attention backend can; returns the recorded
    (perturbed) tensors of each rollout."""
    recorded = []
    real = trainer.score_round

    def score_round(inputs):
        batch, rewards, stats = real(inputs)
        batch["old_per_token_logps"] = batch["old_per_token_logps"] + size
        batch["old_entropy"] = batch["old_entropy"] + size  # entropy < old_entropy everywhere: the KL mask would fire
        recorded.append((batch["old_per_token_logps"], batch["old_entropy"]))
        return batch, rewards, stats

    trainer.score_round = score_round
    return recorded


def spy_pi_old(monkeypatch):
    """Per policy_loss call: (logp, old_logp, entropy, old_entropy), detached."""
    calls = []
    real = trainer_module.policy_loss

    def spy(name, **kw):
        calls.append(tuple(kw[k].detach().clone() for k in ("logp", "old_logp", "entropy", "old_entropy")))
        return real(name, **kw)

    monkeypatch.setattr(trainer_module, "policy_loss", spy)
    return calls


@pytest.mark.slow
def test_first_step_after_a_rollout_is_exactly_on_policy(tmp_path, monkeypatch):
    calls = spy_pi_old(monkeypatch)
    tr = make_trainer(tmp_path, objective="tepo", tepo_kl_coef=0.5, max_steps=4)  # 2 rollouts x 2 steps
    recorded = perturb_recorded_pi_old(tr)
    tr.train()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(recorded) == 2 and len(calls) == 4
    for first in (0, 2):  # the first step of each rollout: pi_old is the training pass's own values
        logp, old_logp, entropy, old_entropy = calls[first]
        assert torch.equal(old_logp, logp) and torch.equal(old_entropy, entropy)
        r = rows[first]
        assert r["ratio_min"] == r["ratio_max"] == 1.0 and r["clip_frac"] == 0.0 and r["kl_mask_frac"] == 0.0, r
    for later, rollout in ((1, 0), (3, 1)):  # later steps keep what was recorded at the rollout (shuffled rows)
        _, old_logp, _, old_entropy = calls[later]
        rec_logp, rec_entropy = recorded[rollout]
        for row_logp, row_entropy in zip(old_logp, old_entropy):
            match = (rec_logp == row_logp).all(dim=1) & (rec_entropy == row_entropy).all(dim=1)
            assert match.any(), "step 2's pi_old is not the rollout's recorded one"


# ----------------------------------------------------------------------------------------------
# TRL's evaluation loop and dropout


@pytest.mark.slow
def test_trl_evaluation_loop_runs_with_the_kl_mask(tmp_path, monkeypatch):
    """eval_dataset + eval_strategy with tepo_kl_coef > 0 and an off-policy batch shape (2 optimiser
    steps per rollout, so TRL records old_per_token_logps, in evaluation too): evaluation batches are
    scored just before their loss, so pi_old (with its entropy) is the evaluation pass's own."""
    calls = spy_pi_old(monkeypatch)
    tok = tiny_tokenizer()
    args = small_config(tmp_path / "run", objective="tepo", tepo_kl_coef=0.5, eval_strategy="steps", eval_steps=1,
                        per_device_eval_batch_size=8)
    tr = TEPOTrainer(model=tiny_model(tok), reward_funcs=parity_reward, args=args, train_dataset=prompt_dataset(),
                     eval_dataset=prompt_dataset(8), processing_class=tok)
    tr.train()
    evals = [r for r in tr.state.log_history if "eval_loss" in r]
    assert [r["step"] for r in evals] == [1, 2]
    for r in evals:
        assert math.isfinite(r["eval_loss"]) and r["eval_kl_mask_frac"] == 0.0
        assert r["eval_ratio_min"] == r["eval_ratio_max"] == 1.0
    assert len(calls) == 2 + 2 * (8 * 4 // 8)  # 2 training steps; per evaluation 8 prompts x 4 completions in 8s
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and not any(k.startswith("eval_") for r in rows for k in r)


def test_disable_dropout_is_the_default_and_covers_attention_dropout(tmp_path):
    """A model with dropout (the tiny Llama's attention dropout at 0.5, and an nn.Dropout on its
    embeddings): with the default config its training-mode forward is deterministic; with
    disable_dropout=False (TRL's default) it is not."""
    assert TEPOConfig(output_dir=str(tmp_path), **BASE).disable_dropout is True

    def model_with_dropout():
        tok = tiny_tokenizer()
        model = tiny_model(tok)
        model.config.attention_dropout = 0.5
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = 0.5
        model.model.embedding_dropout = torch.nn.Dropout(0.5)
        model.model.embed_tokens.register_forward_hook(lambda module, args, out: model.model.embedding_dropout(out))
        return model, tok

    def train_mode_forwards_agree(**overrides) -> bool:
        model, tok = model_with_dropout()
        tr = TEPOTrainer(model=model, reward_funcs=parity_reward, args=small_config(tmp_path / "run", **overrides),
                         train_dataset=prompt_dataset(), processing_class=tok)
        tr.model.train()
        ids = torch.tensor([tok.encode("What is 1 + 1?")])
        with torch.no_grad():
            return torch.equal(tr.model(ids).logits, tr.model(ids).logits)

    assert train_mode_forwards_agree()
    assert not train_mode_forwards_agree(disable_dropout=False)


# ----------------------------------------------------------------------------------------------
# dynamic sampling


def index_reward(completions, answer, **kwargs):
    """Prompts whose answer is divisible by 4 always get 0 (their groups have no variance);
    the others get parity_reward."""
    return [0.0 if int(a) % 4 == 0 else text_parity(c[0]["content"]) for c, a in zip(completions, answer)]


@pytest.mark.slow
@pytest.mark.parametrize("dynamic", [False, True])
def test_dynamic_sampling(tmp_path, dynamic):
    tr = make_trainer(tmp_path, reward=index_reward, dynamic_sampling=dynamic, max_resample_rounds=4, bf16=True,
                      per_device_train_batch_size=8, steps_per_generation=2, max_steps=4)
    seen = []
    real = tr._compute_loss

    def spy(model, inputs):
        seen.append(inputs["advantages"].clone())
        return real(model, inputs)

    tr._compute_loss = spy
    tr.train()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["zero_var_frac"] is not None for r in rows)
    # the first step of each rollout is on-policy: pi_old is exactly pi_theta on the tensors trained on
    # (with dynamic sampling too, whose spliced batch changes the padding the rollout was scored with)
    for r in rows[::2]:
        assert r["ratio_min"] == r["ratio_max"] == 1.0, r
    if dynamic:
        assert all("dynamic_sampling/kept_frac" in r for r in rows)
        for r in rows:  # refills only add groups that vary
            assert r["dynamic_sampling/kept_frac"] >= 1.0 - r["zero_var_frac"]
        assert any(r["zero_var_frac"] > 0 and r["dynamic_sampling/rounds"] >= 1 for r in rows)
        # a full batch (not short) holds only groups that vary: binary rewards -> every advantage != 0
        for r, adv in zip(rows, seen):
            if r["dynamic_sampling/short"] == 0.0:
                assert bool((adv != 0).all()), adv
    else:
        assert not any("dynamic_sampling/kept_frac" in r for r in rows)


def zero_reward(completions, **kwargs):
    return [0.0] * len(completions)


@pytest.mark.slow
def test_dynamic_sampling_short_batch_is_logged_and_trains_on(tmp_path):
    """No group varies, even after a refill round: training goes on, on zero-variance rows (all
    advantages 0, so the policy term has no gradient)."""
    tr = make_trainer(tmp_path, reward=zero_reward, dynamic_sampling=True, max_resample_rounds=1, max_steps=2)
    trained = []
    real = tr._compute_loss

    def spy(model, inputs):
        trained.append(inputs["advantages"].clone())
        return real(model, inputs)

    tr._compute_loss = spy
    tr.train()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["zero_var_frac"] == 1.0
    assert rows[0]["dynamic_sampling/short"] == 1.0 and rows[0]["dynamic_sampling/kept_frac"] == 0.0
    assert rows[0]["dynamic_sampling/rounds"] == 1.0
    # both optimiser steps ran, on the zero-variance rows topped up only as far as steps_per_generation
    # needs: 2 rows, one per step
    assert [a.numel() for a in trained] == [1, 1] and all(bool((a == 0).all()) for a in trained)
    assert all(r["loss"] is not None and math.isfinite(r["loss"]) and r["grad_norm"] == 0.0 for r in rows)


@pytest.mark.slow
def test_dynamic_sampling_short_batch_with_some_varied_groups_moves_the_weights(tmp_path):
    """No refill round allowed and half the prompts never vary (index_reward): the kept groups,
    topped up with zero-variance rows, are trained on, and the weights move."""
    tr = make_trainer(tmp_path, reward=index_reward, dynamic_sampling=True, max_resample_rounds=0, max_steps=2)
    before = params(tr.model)
    tr.train()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert rows[0]["dynamic_sampling/short"] == 1.0 and 0.0 < rows[0]["dynamic_sampling/kept_frac"] < 1.0
    assert rows[0]["grad_norm"] > 0 and not torch.equal(before, params(tr.model))


def test_sampling_helpers_pad_and_select():
    from tepo.training import sampling

    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, float("nan"), float("nan"), 0.0, float("nan")])
    assert sampling.varied_groups(rewards, 2).tolist() == [True, False, False, True]
    a = {"prompt_ids": torch.tensor([[5, 6]]), "prompt_mask": torch.tensor([[1, 1]]),
         "completion_ids": torch.tensor([[7]]), "completion_mask": torch.tensor([[1]]),
         "advantages": torch.tensor([0.5]), "old_per_token_logps": torch.tensor([[-1.0]])}
    b = {"prompt_ids": torch.tensor([[4]]), "prompt_mask": torch.tensor([[1]]),
         "completion_ids": torch.tensor([[8, 9, 0]]), "completion_mask": torch.tensor([[1, 1, 0]]),
         "advantages": torch.tensor([-0.5]), "old_per_token_logps": torch.tensor([[-2.0, -3.0, 0.0]])}
    m = sampling.trim_prompt_padding(sampling.concat_batches([a, b], pad_token_id=0))
    assert m["prompt_ids"].tolist() == [[5, 6], [0, 4]] and m["prompt_mask"].tolist() == [[1, 1], [0, 1]]
    assert m["completion_ids"].tolist() == [[7, 0], [8, 9]] and m["completion_mask"].tolist() == [[1, 0], [1, 1]]
    assert m["old_per_token_logps"].tolist() == [[-1.0, 0.0], [-2.0, -3.0]]
    with pytest.raises(ValueError, match="pixel_values"):
        sampling.select_rows({**a, "pixel_values": torch.zeros(1, 3)}, torch.tensor([0]))


# ----------------------------------------------------------------------------------------------
# non-finite guard


class Snapshots:
    """Clone the weights at every step end."""

    def __init__(self):
        from transformers import TrainerCallback

        outer = self
        self.by_step = {}

        class CB(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kw):
                outer.by_step[state.global_step] = params(model)

        self.callback = CB()


def nan_on_steps(monkeypatch, trainer_ref, steps):
    real = trainer_module.policy_loss

    def poisoned(name, **kw):
        out = real(name, **kw)
        if trainer_ref[0].state.global_step + 1 in steps:
            out.loss = out.loss * float("nan")  # NaN loss, NaN gradients
        return out

    monkeypatch.setattr(trainer_module, "policy_loss", poisoned)


@pytest.mark.slow
def test_nonfinite_step_is_skipped(tmp_path, monkeypatch):
    ref = [None]
    nan_on_steps(monkeypatch, ref, {2})
    tr = make_trainer(tmp_path, max_steps=3, max_nonfinite_steps=2)
    ref[0] = tr
    snaps = Snapshots()
    tr.add_callback(snaps.callback)
    tr.train()
    assert torch.equal(snaps.by_step[1], snaps.by_step[2]), "a NaN step moved the weights"
    assert not torch.equal(snaps.by_step[2], snaps.by_step[3])
    assert torch.isfinite(snaps.by_step[3]).all()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["nonfinite_skipped"] for r in rows] == [0, 1, 1]
    assert rows[1]["loss"] is None and rows[2]["loss"] is not None
    assert tr.nonfinite_guard.stopped_at is None


@pytest.mark.slow
def test_k_nonfinite_steps_in_a_row_stop_with_a_checkpoint(tmp_path, monkeypatch):
    ref = [None]
    nan_on_steps(monkeypatch, ref, {2, 3, 4, 5, 6})
    tr = make_trainer(tmp_path, max_steps=6, max_nonfinite_steps=2)
    ref[0] = tr
    tr.train()
    assert tr.nonfinite_guard.stopped_at == 3 and "2 optimiser steps in a row" in tr.nonfinite_guard.message
    checkpoint = tmp_path / "run" / "checkpoint-3"
    assert (checkpoint / "trainer_state.json").exists()
    from safetensors.torch import load_file

    weights = load_file(str(checkpoint / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]


def test_metrics_reader_drops_torn_last_line_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1}) + "\n" + json.dumps({"step": 2}) + "\n" + '{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    path.write_text('{"step": 1, "lo\n' + json.dumps({"step": 2}) + "\n")
    with pytest.raises(ValueError, match="metrics.jsonl:1"):
        read_metrics(path)


@pytest.mark.slow
def test_heldout_eval_every_n_steps_lands_in_its_row(tmp_path):
    tok = tiny_tokenizer()
    problems = [{"id": f"h{i}", "problem": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(3)]
    args = small_config(tmp_path / "run", max_steps=2, heldout_eval_steps=2, heldout_max_new_tokens=4)
    tr = TEPOTrainer(model=tiny_model(tok), reward_funcs=parity_reward, args=args,
                     train_dataset=prompt_dataset(), processing_class=tok, heldout_problems=problems)
    tr.train()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert "heldout_accuracy" not in rows[0]
    assert 0.0 <= rows[1]["heldout_accuracy"] <= 1.0
    assert tr.heldout_callback.results[2]["num_problems"] == 3
    assert tr.model.training, "evaluation must hand the model back in training mode"
    assert (tmp_path / "run" / "monitor.json").exists()


# ----------------------------------------------------------------------------------------------
# torch.compile (docs/scaling.md: the lever for the update phase's element-wise work)


@pytest.mark.slow
def test_torch_compile_trains_like_eager(tmp_path, monkeypatch):
    """`torch_compile=True` (TrainingArguments) compiles the training forward/backward; the losses and
    metrics, the rollout-time old entropy (TEPO's KL mask) and the update match eager training."""
    seen = {}
    real = trainer_module.policy_loss

    def spy(name, **kw):
        seen.setdefault(tag, []).append(kw)  # tag: the run in progress (read at call time)
        return real(name, **kw)

    monkeypatch.setattr(trainer_module, "policy_loss", spy)
    runs = {}
    for tag in ("eager", "compiled"):
        tr = make_trainer(tmp_path / tag, objective="tepo", tepo_kl_coef=0.5, torch_compile=tag == "compiled")
        tr.train()
        if tag == "compiled":  # the model trained through torch.compile, generation through the plain module
            assert type(tr.model_wrapped).__name__ == "OptimizedModule"
        runs[tag] = (read_metrics(tmp_path / tag / "run" / "metrics.jsonl"), params(tr.model))
    (eager_rows, eager_w), (comp_rows, comp_w) = runs["eager"], runs["compiled"]
    assert [r["step"] for r in comp_rows] == [1, 2]
    for e, c in zip(eager_rows, comp_rows):
        for key in ("loss", "entropy_mean", "clip_frac", "approx_kl", "reward_mean"):
            assert c[key] == pytest.approx(e[key], rel=1e-4, abs=1e-6), key
    # Step 1 is exactly on-policy in both: pi_old is the training pass's own (compiled) values, not the
    # rollout's scoring pass (plain module, no grad), whose float32 rounding differs from the compiled
    # pass and used to make the spec's strict `entropy < old_entropy` select rounding noise.
    for rows in (eager_rows, comp_rows):
        assert rows[0]["kl_mask_frac"] == 0.0 and rows[0]["ratio_min"] == rows[0]["ratio_max"] == 1.0
    assert comp_rows[1]["kl_mask_frac"] == pytest.approx(eager_rows[1]["kl_mask_frac"], abs=0.02)
    # step 2 reuses the rollout: the old entropy came from the rollout's scoring pass in both runs
    for tag in ("eager", "compiled"):
        second = seen[tag][1]
        m = second["mask"].bool()
        assert second["old_entropy"] is not None
        assert not torch.allclose(second["old_entropy"][m], second["entropy"].detach()[m])
    # Weights after two AdamW steps (lr 1e-2): the same but where a gradient is at rounding size, which
    # Adam's m / sqrt(v) scales up to a whole step; each step moves a weight by at most about lr.
    off = (comp_w - eager_w).abs()
    assert (off > 1e-5).float().mean().item() < 1e-3, f"{int((off > 1e-5).sum())} of {off.numel()} weights differ"
    assert off.max().item() <= 2 * 1e-2


@pytest.mark.slow
def test_regional_compile_of_an_eval_mode_model_logs_training(tmp_path, monkeypatch):
    """accelerate's regional compilation (per decoder layer) trains new copies of the model's
    containers, so a model that arrives in eval mode (as from_pretrained gives it) used to stay
    `training == False` at the top: TRL and this trainer then took every step for evaluation
    (eval_-prefixed metrics, an empty metrics.jsonl, no non-finite guard, no accumulation scaling)."""
    monkeypatch.setenv("ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION", "true")
    tok = tiny_tokenizer()
    model = tiny_model(tok).eval()
    tr = TEPOTrainer(model=model, reward_funcs=parity_reward, args=small_config(tmp_path / "run", torch_compile=True),
                     train_dataset=prompt_dataset(), processing_class=tok)
    before = params(tr.model)
    tr.train()
    assert tr.model_wrapped is not tr.model  # the regionally compiled copy
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["loss"] is not None and r["entropy_mean"] is not None for r in rows)
    assert not torch.equal(before, params(tr.model))
