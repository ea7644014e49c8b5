"""The objective-independent controls (docs/controls.md): high-entropy token selection, off-policy
sequence masking, the adaptive entropy coefficient, adaptive TEPO and the soft overlong punishment.

Unit tests check each piece against the formulas of docs/controls.md on numbers worked by hand;
the slow tests run all of them together on the tiny model with tepo, dapo and gspo. Parity with
stock TRL is in tests/test_stock_parity.py."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from tepo.training import TEPOConfig, read_metrics
from tepo.training import token_selection
from tepo.training.adaptive_tepo import AdaptiveTEPOKLCoef, adaptive_tepo_update
from tepo.training.entropy_control import AdaptiveEntropyCoef, StepEntropyMeter, skywork_applied, skywork_update
from tepo.training.off_policy_mask import OffPolicySequenceMask, off_policy_sequence_mask
from tepo.training.overlong import SoftOverlongPunishment, soft_overlong_penalty
from tepo.training.token_selection import HighEntropyTokenSelection, high_entropy_mask, quantile

from _tiny_llm import save_tiny, small_config, tiny_train_argv


# ----------------------------------------------------------------------------------------------
# a stand-in trainer: what the pieces and controllers read


class FakeTrainer:
    def __init__(self, *, accumulation: int = 1, step: int = 0, buffer=None, entropies_of=None, hparams=None):
        self.model = SimpleNamespace(training=True, is_gradient_checkpointing=False)
        self.accelerator = SimpleNamespace(num_processes=1, device=torch.device("cpu"))
        self.current_gradient_accumulation_steps = accumulation
        self.args = SimpleNamespace(steps_per_generation=len(buffer) if buffer else 1, gradient_checkpointing_kwargs=None)
        self.micro_step = step
        self.rollout_buffer = buffer
        self._entropies_of = entropies_of or {}
        self.loss_hparams = dict(hparams or {})
        self.metrics = {"train": __import__("collections").defaultdict(list)}
        self.token_weights = []
        self.scored = []

    # TEPOTrainer's public surface for plugins
    def loss_hparam(self, name):
        return self.loss_hparams[name]

    def set_loss_hparam(self, name, value):
        self.loss_hparams[name] = value

    def record_metric(self, name, value, mode="train"):
        self.metrics[mode][name].append(float(value))

    def pi_old(self, inputs, logp, entropy):  # TEPOTrainer's rule, on-policy when nothing was recorded
        recorded = inputs.get("old_per_token_logps")
        return (logp, entropy) if recorded is None else (recorded, inputs.get("old_entropy"))

    def score_batch(self, model, batch, *, chunk=None, compute_entropy=True):
        key = int(batch["prompt_ids"][0, 0])  # each fake micro-batch is tagged by its first prompt id
        self.scored.append(key)
        entropy = self._entropies_of[key]
        return torch.zeros_like(entropy), entropy


def micro_batch(tag: int, mask: torch.Tensor) -> dict:
    B, T = mask.shape
    return {"prompt_ids": torch.full((B, 1), tag), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
            "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask.long()}


# ----------------------------------------------------------------------------------------------
# high-entropy token selection


def test_quantile_is_linear_interpolation_worked_by_hand(monkeypatch):
    values = torch.tensor([0.1, 0.5, 0.2, 0.9, 0.4], dtype=torch.float64)
    # sorted 0.1 0.2 0.4 0.5 0.9; p = 0.8: h = 0.8 * 4 = 3.2 -> 0.5 + 0.2 * (0.9 - 0.5) = 0.58
    assert quantile(values.double(), 0.8).item() == pytest.approx(0.58, abs=1e-15)
    assert quantile(values.double(), 0.0).item() == pytest.approx(0.1, abs=1e-15)
    assert quantile(values.double(), 1.0).item() == pytest.approx(0.9, abs=1e-15)
    monkeypatch.setattr(token_selection, "_TORCH_QUANTILE_MAX", 0)  # the sorting path for huge inputs
    assert quantile(values.double(), 0.8).item() == pytest.approx(0.58, abs=1e-15)
    assert quantile(values.double(), 1.0).item() == pytest.approx(0.9, abs=1e-15)


def test_token_selection_keeps_the_top_fraction_and_ignores_padding():
    entropy = torch.tensor([[0.1, 0.5, 0.2, 7.0], [0.9, 0.4, 9.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])  # 7.0 and 9.0 are padding garbage
    piece = HighEntropyTokenSelection(0.2)  # tau = quantile_0.8 of (0.1 0.5 0.2 0.9 0.4) = 0.58
    weight, metrics = piece(FakeTrainer(), {}, logp=entropy, entropy=entropy, mask=mask)
    assert weight.tolist() == [[0, 0, 0, 0], [1, 0, 0, 0]]
    assert metrics["entropy_select_threshold"] == pytest.approx(0.58)
    assert metrics["entropy_select_frac"] == pytest.approx(1 / 5)
    # q = 0.6: tau = quantile_0.4: h = 1.6 -> 0.2 + 0.6 * 0.2 = 0.32 -> 0.5, 0.9, 0.4 kept
    weight, _ = HighEntropyTokenSelection(0.6)(FakeTrainer(), {}, logp=entropy, entropy=entropy, mask=mask)
    assert weight.tolist() == [[0, 1, 0, 0], [1, 1, 0, 0]]
    # q = 0: only the maximum; q = 1: every valid token
    assert high_entropy_mask(entropy, mask, 0.9).sum().item() == 1
    weight, _ = HighEntropyTokenSelection(1.0)(FakeTrainer(), {}, logp=entropy, entropy=entropy, mask=mask)
    assert weight.tolist() == mask.tolist()


def test_token_selection_quantile_is_over_the_whole_optimiser_step():
    """Gradient accumulation 2: the first micro-batch scores the second one (no grad) and the
    threshold is the quantile of both micro-batches' tokens; the second micro-batch reuses it."""
    mask0 = torch.tensor([[1, 1, 1]])
    mask1 = torch.tensor([[1, 1, 0]])
    e0 = torch.tensor([[0.1, 0.2, 0.3]])
    e1 = torch.tensor([[0.8, 0.9, 5.0]])  # 5.0 is padding
    buffer = [micro_batch(0, mask0), micro_batch(1, mask1)]
    trainer = FakeTrainer(accumulation=2, step=0, buffer=buffer, entropies_of={1: e1})
    piece = HighEntropyTokenSelection(0.4)
    # step tokens 0.1 0.2 0.3 0.8 0.9, p = 0.6: h = 2.4 -> 0.3 + 0.4 * 0.5 = 0.5
    w0, m0 = piece(trainer, {}, logp=e0, entropy=e0, mask=mask0)
    assert trainer.scored == [1]
    assert m0["entropy_select_threshold"] == pytest.approx(0.5)
    assert w0.tolist() == [[0, 0, 0]]  # micro-batch 0 alone would keep its top 40% (0.3)
    trainer.micro_step = 1
    w1, m1 = piece(trainer, {}, logp=e1, entropy=e1, mask=mask1)
    assert trainer.scored == [1]  # no second scoring pass
    assert m1["entropy_select_threshold"] == pytest.approx(0.5)
    assert w1.tolist() == [[1, 1, 0]]


# ----------------------------------------------------------------------------------------------
# off-policy sequence mask


def test_off_policy_mask_worked_by_hand():
    logp = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -2.0, -9.0], [-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]], dtype=torch.float64)
    sampling = torch.tensor([[0.0, 0.0, 0.0], [-0.5, -1.3, 5.0], [-0.7, -0.7, float("nan")], [0.0, 0.0, 0.0]],
                            dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [0, 0, 0]])
    A = torch.tensor([1.0, -1.0, -1.0, -1.0], dtype=torch.float64)
    # drift means: row 0: 1.0 (A >= 0: kept); row 1: (0.5 + 0.7) / 2 = 0.6 > 0.5: dropped;
    # row 2: (0.3 + 0.3 + 0 [NaN]) / 3 = 0.2 <= 0.5: kept; row 3: no tokens, drift 0: kept
    w = off_policy_sequence_mask(A, logp, sampling, mask, 0.5)
    assert w.tolist() == [[1, 1, 1], [0, 0, 0], [1, 1, 1], [1, 1, 1]]
    assert off_policy_sequence_mask(A, logp, sampling, mask, 0.6).tolist()[1] == [1, 1, 1]  # D <= delta kept
    # per-token advantages broadcast the same way
    assert off_policy_sequence_mask(A[:, None].expand(4, 3), logp, sampling, mask, 0.5).tolist() == w.tolist()


def test_off_policy_mask_piece_prefers_sampler_logps_and_is_off_on_policy():
    logp = torch.tensor([[-1.0, -1.0]])
    mask = torch.ones(1, 2)
    piece = OffPolicySequenceMask(0.1)
    inputs = {"advantages": torch.tensor([-1.0]), "old_per_token_logps": torch.tensor([[-1.0, -1.0]]),
              "sampling_per_token_logps": torch.tensor([[0.0, 0.0]])}
    w, m = piece(FakeTrainer(), inputs, logp=logp, entropy=logp, mask=mask)
    assert w.tolist() == [[0.0, 0.0]] and m["off_policy_mask_frac"] == 1.0
    del inputs["sampling_per_token_logps"]  # pi_old == pi_theta here: drift 0
    w, m = piece(FakeTrainer(), inputs, logp=logp, entropy=logp, mask=mask)
    assert w.tolist() == [[1.0, 1.0]] and m["off_policy_mask_frac"] == 0.0
    w, _ = piece(FakeTrainer(), {"advantages": torch.tensor([-1.0])}, logp=logp, entropy=logp, mask=mask)
    assert w.tolist() == [[1.0, 1.0]]
    with pytest.raises(ValueError, match="off_policy_mask_threshold=-1"):
        OffPolicySequenceMask(-1)


# ----------------------------------------------------------------------------------------------
# entropy meter and the adaptive entropy coefficient (Skywork-OR1 / TRL)


def feed(trainer, meter, entropy, mask):
    meter(trainer, {}, logp=entropy, entropy=torch.tensor(entropy), mask=torch.tensor(mask))


def test_step_entropy_meter_is_token_weighted_over_micro_batches():
    trainer, meter = FakeTrainer(), StepEntropyMeter()
    feed(trainer, meter, [[1.0, 2.0, 99.0]], [[1, 1, 0]])
    feed(trainer, meter, [[4.0, 0.0, 0.0]], [[1, 0, 0]])
    assert meter.take(trainer) == pytest.approx((1 + 2 + 4) / 3)  # not the mean of 1.5 and 4
    assert math.isnan(meter.take(trainer))  # reset after each step
    trainer.model.training = False
    feed(trainer, meter, [[4.0]], [[1]])  # evaluation passes are not counted
    assert math.isnan(meter.take(trainer))


def test_skywork_update_and_gate():
    assert skywork_update(0.1, 0.3, target=0.3, delta=0.05, low=0.0, high=1.0) == pytest.approx(0.15)  # H <= target
    assert skywork_update(0.1, 0.31, target=0.3, delta=0.05, low=0.0, high=1.0) == pytest.approx(0.05)
    assert skywork_update(0.98, 0.1, target=0.3, delta=0.05, low=0.0, high=1.0) == 1.0
    assert skywork_update(0.02, 0.9, target=0.3, delta=0.05, low=0.01, high=1.0) == 0.01
    assert skywork_applied(0.2, math.inf, 0.3) == 0.0 and skywork_applied(0.2, 0.3, 0.3) == 0.2


def run_steps(controller, trainer, entropies):
    """Feed one step of entropy H each (one token), end the step; the coefficients each step used."""
    used = []
    for h in entropies:
        used.append(trainer.loss_hparams[controller.hparam])
        feed(trainer, controller.meter, [[h]], [[1]])
        controller.on_step_end(None, None, None)
    return used


def test_adaptive_entropy_coefficient_sequence_worked_by_hand():
    trainer = FakeTrainer(hparams={"entropy_coef": 0.0})
    ctl = AdaptiveEntropyCoef(trainer, initial=0.1, target=0.5, delta=0.05, low=0.0, high=0.2)
    assert trainer.token_weights == [ctl.meter]
    # c: 0.1 -> H 0.4 <= 0.5: 0.15 -> H 0.3: 0.2 -> H 0.2: 0.2 (max) -> H 0.6: 0.15 -> H 0.7: 0.1
    # applied: step 1: 0 (no measurement yet); then c while the last H <= target, else 0
    used = run_steps(ctl, trainer, [0.4, 0.3, 0.2, 0.6, 0.7, 0.1])
    assert used == pytest.approx([0.0, 0.15, 0.2, 0.2, 0.0, 0.0])
    assert ctl.coef == pytest.approx(0.15)  # 0.1 -> H 0.1 <= 0.5: 0.15
    assert trainer.loss_hparams["entropy_coef"] == pytest.approx(0.15)
    assert trainer.metrics["train"]["entropy_coef"] == pytest.approx(used)  # logged every step


# ----------------------------------------------------------------------------------------------
# adaptive TEPO


def test_adaptive_tepo_raises_the_coefficient_below_the_target_and_lowers_it_above():
    assert adaptive_tepo_update(2.0, 0.3, target=0.4, rate=10.0, high=100.0) == pytest.approx(2.0 + 10 * 0.25)
    assert adaptive_tepo_update(3.0, 0.5, target=0.4, rate=10.0, high=100.0) == pytest.approx(3.0 - 10 * 0.25)
    assert adaptive_tepo_update(2.0, 0.8, target=0.4, rate=10.0, high=100.0) == 0.0  # floor 0
    assert adaptive_tepo_update(99.0, 0.0, target=0.4, rate=10.0, high=100.0) == 100.0  # ceiling
    assert adaptive_tepo_update(2.0, 0.4, target=0.4, rate=10.0, high=100.0) == 2.0


def test_adaptive_tepo_controller_worked_by_hand():
    trainer = FakeTrainer(hparams={"tepo_kl_coef": 0.0})
    ctl = AdaptiveTEPOKLCoef(trainer, initial=0.0, target=None, target_ratio=0.75, rate=10.0, high=4.0)
    # step 1: H = 0.8 -> H* = 0.6, c = max(0, 0 + 10 * (0.6 - 0.8) / 0.6) = 0
    # healthy entropy: c stays exactly 0 (the mask term is 0)
    # H 0.45: c = 10 * 0.15 / 0.6 = 2.5;  H 0.48: 2.5 + 2 = 4.5 -> 4 (max);  H 0.66: 4 - 1 = 3;  H 0.9: 3 - 5 -> 0
    used = run_steps(ctl, trainer, [0.8, 0.7, 0.61, 0.45, 0.48, 0.66, 0.9])
    assert used == pytest.approx([0.0, 0.0, 0.0, 0.0, 2.5, 4.0, 3.0])
    assert ctl.target == pytest.approx(0.6)
    assert trainer.loss_hparams["tepo_kl_coef"] == 0.0
    logged = trainer.metrics["train"]
    assert logged["tepo_kl_coef"] == pytest.approx(used)
    assert logged["adaptive_tepo_target"] == pytest.approx([0.6] * 7)
    assert logged["adaptive_tepo_entropy"] == pytest.approx([0.8, 0.7, 0.61, 0.45, 0.48, 0.66, 0.9])


def test_controller_state_round_trips_through_trainer_state():
    trainer = FakeTrainer(hparams={"tepo_kl_coef": 0.0})
    ctl = AdaptiveTEPOKLCoef(trainer, initial=0.0, target=0.6, target_ratio=0.75, rate=10.0, high=100.0)
    run_steps(ctl, trainer, [0.45])
    saved = ctl.state()
    fresh_trainer = FakeTrainer(hparams={"tepo_kl_coef": 0.0})
    fresh = AdaptiveTEPOKLCoef(fresh_trainer, initial=0.0, target=None, target_ratio=0.75, rate=10.0, high=100.0)
    fresh.on_step_begin(None, SimpleNamespace(stateful_callbacks={"AdaptiveTEPOKLCoef": saved}), None)
    assert (fresh.coef, fresh.target) == pytest.approx((2.5, 0.6))
    assert fresh_trainer.loss_hparams["tepo_kl_coef"] == pytest.approx(2.5)


# ----------------------------------------------------------------------------------------------
# soft overlong punishment


def test_soft_overlong_penalty_worked_by_hand_and_as_trl():
    from trl.rewards import get_soft_overlong_punishment

    # L_max 10, L_cache 4: 0 up to 6, then (6 - |y|) / 4, -1 beyond 10
    assert [soft_overlong_penalty(n, max_len=10, cache=4) for n in (0, 6, 7, 8, 10, 11)] == [0, 0, -0.25, -0.5, -1, -1]
    ids = [[1] * n for n in range(14)]
    ours = SoftOverlongPunishment(max_len=10, cache=4)(completions=None, completion_ids=ids)
    assert ours == get_soft_overlong_punishment(max_completion_len=10, soft_punish_cache=4)(ids)
    assert SoftOverlongPunishment(10, 0)(completion_ids=[[1] * 10, [1] * 11]) == [0.0, -1.0]
    with pytest.raises(ValueError, match="cache=11 is longer than max_len=10"):
        SoftOverlongPunishment(10, 11)


# ----------------------------------------------------------------------------------------------
# configuration


def test_config_takes_the_trl_fields_with_trl_defaults(tmp_path):
    from trl import GRPOConfig

    config = small_config(tmp_path)
    stock = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False)
    for name in ("top_entropy_quantile", "off_policy_mask_threshold", "use_adaptive_entropy", "entropy_target",
                 "entropy_coef_delta", "entropy_coef_min", "entropy_coef_max"):
        assert getattr(config, name) == getattr(stock, name), name
    small_config(tmp_path, top_entropy_quantile=0.2, off_policy_mask_threshold=0.5, use_adaptive_entropy=True,
                 adaptive_tepo=True, objective="tepo")


@pytest.mark.parametrize(
    "fields_, message",
    [
        (dict(top_entropy_quantile=1.5), r"top_entropy_quantile=1.5 must be in \[0, 1\]"),
        (dict(top_entropy_quantile=0.2, gradient_accumulation_steps=2, steps_per_generation=3,
              per_device_train_batch_size=4), "steps_per_generation=3 must be a multiple of 2"),
        (dict(off_policy_mask_threshold=-0.1), "off_policy_mask_threshold=-0.1 must be a finite number >= 0"),
        (dict(use_adaptive_entropy=True, entropy_coef_min=0.5, entropy_coef_max=0.1), "entropy_coef_min=0.5 is above"),
        (dict(use_adaptive_entropy=True, entropy_target=float("nan")), "entropy_target=nan must be a finite number"),
        (dict(adaptive_tepo=True, objective="dapo"), "adaptive_tepo=True sets tepo_kl_coef, a hyper-parameter of"),
        (dict(adaptive_tepo=True, adaptive_tepo_target=0.0), "adaptive_tepo_target=0.0 must be a finite number > 0"),
        (dict(adaptive_tepo=True, tepo_kl_coef=5.0, adaptive_tepo_kl_max=1.0), "tepo_kl_coef=5.0 .* is above"),
    ],
)
def test_config_refuses_bad_control_settings(tmp_path, fields_, message):
    with pytest.raises(ValueError, match=message):
        small_config(tmp_path, **fields_)


def test_soft_overlong_option_is_checked_at_parse(tmp_path, capsys):
    from tepo.training.cli import overlong_reward, parse, train_main

    argv = ["--output_dir", str(tmp_path / "o"), "--task", "arithmetic", "--max_completion_length", "16"]
    script, config = parse(argv + ["--soft_overlong_cache", "4"])
    reward = overlong_reward(script, config)
    assert (reward.max_len, reward.cache) == (16, 4)
    assert train_main(argv + ["--soft_overlong_cache", "20"]) == 2
    assert "--soft_overlong_cache / --soft_overlong_max_len: soft overlong punishment: cache=20 is longer" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# on the tiny model


CONTROL_OPTIONS = dict(
    top_entropy_quantile=0.5, off_policy_mask_threshold=0.0, use_adaptive_entropy="true", entropy_target=10.0,
    entropy_coef_delta=0.01, soft_overlong_cache=4, gradient_accumulation_steps=2, num_iterations=2, max_steps=3,
    save_strategy="no",
)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["tepo", "dapo", "gspo"])
def test_the_four_controls_train_with_each_objective(tmp_path, objective):
    """All four controls at once, gradient accumulation 2, an off-policy second step per rollout;
    tepo also with adaptive TEPO (the entropy target is above the tiny model's ~4.6 nats, so both
    controllers engage)."""
    from tepo.training.cli import train_main

    extra = dict(adaptive_tepo="true", adaptive_tepo_target=10.0, adaptive_tepo_rate=1.0) if objective == "tepo" else {}
    out = tmp_path / "out"
    argv = tiny_train_argv(save_tiny(tmp_path / "tiny"), out, objective=objective, heldout_eval="false",
                           **CONTROL_OPTIONS, **extra)
    assert train_main(argv) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert [r["entropy_coef"] for r in rows] == pytest.approx([0.0, 0.01, 0.02])  # off at first, then 0 + k delta
    assert all(0 < r["entropy_select_frac"] <= 1 and r["entropy_select_threshold"] > 0 for r in rows)
    assert all(0 <= r["off_policy_mask_frac"] <= 1 for r in rows)
    assert rows[0]["off_policy_mask_frac"] == 0.0  # on-policy first step: no drift
    if objective == "tepo":
        # H* = 10 > H: c grows by rate * (10 - H) / 10 per step from 0; the KL mask is computed throughout
        coefs = [r["tepo_kl_coef"] for r in rows]
        assert coefs[0] == 0.0 and 0 < coefs[1] < coefs[2]
        assert coefs[1] == pytest.approx(1.0 * (10 - rows[0]["adaptive_tepo_entropy"]) / 10)
        assert all(r["kl_mask_frac"] is not None for r in rows)


@pytest.mark.slow
def test_adaptive_tepo_coefficient_reaches_the_mask_term(tmp_path, monkeypatch):
    """Once the controller raises tepo_kl_coef, the loss the objective computes includes the KL mask
    term (the coefficient reaches policy_loss), starting from 0 with no special handling."""
    from tepo.training import TEPOTrainer
    import tepo.training.trainer as trainer_module

    from _tiny_llm import prompt_dataset, parity_reward, tiny_tokenizer

    seen = []
    real = trainer_module.policy_loss

    def spy(name, **kwargs):
        seen.append((kwargs["tepo_kl_coef"], kwargs["old_entropy"] is not None))
        return real(name, **kwargs)

    monkeypatch.setattr(trainer_module, "policy_loss", spy)
    config = small_config(tmp_path, objective="tepo", adaptive_tepo=True, adaptive_tepo_target=10.0,
                          adaptive_tepo_rate=1.0, max_steps=3)
    trainer = TEPOTrainer(model=str(save_tiny(tmp_path / "tiny")), reward_funcs=parity_reward, args=config,
                          train_dataset=prompt_dataset(), processing_class=tiny_tokenizer())
    trainer.train()
    coefs = [c for c, _ in seen]
    assert coefs[0] == 0.0 and coefs[-1] > 0 and all(has_old for _, has_old in seen)
    logged = [row["tepo_kl_coef"] for row in trainer.state.log_history if "tepo_kl_coef" in row]
    assert logged == pytest.approx(coefs)  # one micro-batch per step here


@pytest.mark.slow
def test_token_selection_threshold_is_the_quantile_of_the_steps_training_pass_entropies(tmp_path, monkeypatch):
    """On the tiny model with 2 accumulated micro-batches: each step's threshold, computed at its
    first micro-batch from the no-grad scoring of the second, is the quantile of the entropies both
    micro-batches' own loss passes computed."""
    from tepo.training import TEPOTrainer

    from _tiny_llm import parity_reward, prompt_dataset, tiny_tokenizer

    calls = []
    real = HighEntropyTokenSelection.__call__

    def spy(self, trainer, inputs, *, logp, entropy, mask):
        weight, metrics = real(self, trainer, inputs, logp=logp, entropy=entropy, mask=mask)
        calls.append((entropy[mask.bool()].float(), metrics["entropy_select_threshold"], weight))
        return weight, metrics

    monkeypatch.setattr(HighEntropyTokenSelection, "__call__", spy)
    config = small_config(tmp_path, objective="dapo", top_entropy_quantile=0.3, gradient_accumulation_steps=2,
                          per_device_train_batch_size=4, steps_per_generation=2, num_iterations=2, max_steps=3)
    trainer = TEPOTrainer(model=str(save_tiny(tmp_path / "tiny")), reward_funcs=parity_reward, args=config,
                          train_dataset=prompt_dataset(), processing_class=tiny_tokenizer())
    trainer.train()
    assert len(calls) == 6  # 3 steps x 2 micro-batches
    for first, second in zip(calls[0::2], calls[1::2]):
        both_ = torch.cat([first[0], second[0]])
        assert first[1] == second[1] == pytest.approx(torch.quantile(both_, 0.7).item(), rel=1e-6)
        kept = sum(float(c[2].sum()) for c in (first, second))
        assert kept == pytest.approx(float((both_ >= first[1]).sum()))
    # the step's threshold is not what each micro-batch alone would give (TRL's rule)
    assert any(torch.quantile(c[0], 0.7).item() != pytest.approx(c[1]) for c in calls)


def test_report_shows_the_controllers_coefficients_when_logged(tmp_path):
    import json

    from tepo.analysis.cli import report_main
    from test_analysis import make_fake_comparison

    plain = make_fake_comparison(tmp_path / "plain", with_results=False)
    assert report_main([str(plain), "--smooth", "1"]) == 0
    assert not (plain / "report" / "controls.png").exists()  # nothing logged, no panel

    root = make_fake_comparison(tmp_path / "adaptive", with_results=False)
    for seed in (0, 1):
        path = root / "runs" / f"tepo-s{seed}" / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for row in rows:
            row.update(tepo_kl_coef=0.5 * row["step"], adaptive_tepo_target=0.45)
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert report_main([str(root), "--smooth", "1"]) == 0
    assert (root / "report" / "controls.png").stat().st_size > 0
    assert "Entropy controllers" in (root / "report" / "index.html").read_text()


@pytest.mark.slow
def test_controller_state_survives_a_resume(tmp_path):
    """2 steps, a checkpoint, then 2 more from it: the same coefficients as 4 steps in one go (without
    the saved state the resumed run would restart adaptive TEPO at 0 and adaptive entropy at +inf)."""
    from tepo.training.cli import train_main

    model = save_tiny(tmp_path / "tiny")
    options = dict(adaptive_tepo="true", adaptive_tepo_target=10.0, adaptive_tepo_rate=1.0,
                   use_adaptive_entropy="true", entropy_target=10.0, entropy_coef_delta=0.01, heldout_eval="false")
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train_main(tiny_train_argv(model, whole, max_steps=4, save_strategy="no", **options)) == 0
    assert train_main(tiny_train_argv(model, parts, max_steps=2, save_strategy="steps", save_steps=2, **options)) == 0
    assert train_main(tiny_train_argv(model, parts, max_steps=4, save_strategy="steps", save_steps=2,
                                      resume_from_checkpoint="true", **options)) == 0
    a, b = read_metrics(whole / "metrics.jsonl"), read_metrics(parts / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for key in ("tepo_kl_coef", "entropy_coef", "adaptive_tepo_target"):
        # a resumed run is not bit-exact here (its entropies differ in the 5th digit): the state is what counts
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], rel=1e-4), key
    assert b[2]["tepo_kl_coef"] > 0 and b[2]["entropy_coef"] == pytest.approx(0.02)
