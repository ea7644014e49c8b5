"""Rollout correction (tepo.training.rollout_correction) against the formulas of
docs/rollout-correction.md, on a batch worked out by hand; and its options in TEPOConfig."""

import math

import pytest
import torch

from tepo.training.config import TEPOConfig
from tepo.training.rollout_correction import METRIC_NAMES, MODES, RolloutCorrection, correction_weight

E = math.exp
LN2, LN4 = math.log(2.0), math.log(4.0)
# log pi_old - log pi_sampler; row 1 has 2 valid tokens (its third would be ignored whatever it is)
DELTA = torch.tensor([[0.1, -0.2, 0.3], [LN4, -LN2, 5.0]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float64)


def weight(mode, low, high):
    level, kind = MODES[mode]
    return correction_weight(DELTA * MASK, MASK, level=level, kind=kind, low=low, high=high)[0]


def expect(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_token_truncate():
    # w_t = clamp(exp(delta_t), 0.6, 3): exp(ln 4) = 4 -> 3, exp(-ln 2) = 0.5 -> 0.6
    torch.testing.assert_close(weight("token_truncate", 0.6, 3.0), expect([[E(0.1), E(-0.2), E(0.3)], [3.0, 0.6, 0.0]]), rtol=0, atol=1e-15)
    # no lower bound: 0.5 stays
    torch.testing.assert_close(weight("token_truncate", None, 3.0), expect([[E(0.1), E(-0.2), E(0.3)], [3.0, 0.5, 0.0]]), rtol=0, atol=1e-15)


def test_sequence_truncate():
    # row ratios exp(0.1 - 0.2 + 0.3) = e^0.2 and exp(ln 4 - ln 2) = 2; cap 1.5
    torch.testing.assert_close(weight("sequence_truncate", None, 1.5), expect([[E(0.2)] * 3, [1.5, 1.5, 0.0]]), rtol=0, atol=1e-15)


def test_token_mask():
    # ratio kept inside [0.6, 3], 0 outside: 4 and 0.5 are out
    torch.testing.assert_close(weight("token_mask", 0.6, 3.0), expect([[E(0.1), E(-0.2), E(0.3)], [0.0, 0.0, 0.0]]), rtol=0, atol=1e-15)


def test_sequence_mask_by_product():
    # row 1's product ratio 2 > 1.5: the whole row is masked
    torch.testing.assert_close(weight("sequence_mask", None, 1.5), expect([[E(0.2)] * 3, [0.0, 0.0, 0.0]]), rtol=0, atol=1e-15)
    # e^0.2 = 1.2214 < 1.25 as lower bound: row 0 masked, row 1 kept
    torch.testing.assert_close(weight("sequence_mask", 1.25, 3.0), expect([[0.0] * 3, [2.0, 2.0, 0.0]]), rtol=0, atol=1e-15)


def test_sequence_mask_by_geometric_mean():
    # geometric means exp(0.2 / 3) and exp(ln 2 / 2) = sqrt(2) = 1.414 < 1.5: both kept
    torch.testing.assert_close(weight("geometric_mask", None, 1.5), expect([[E(0.2 / 3)] * 3, [2 ** 0.5, 2 ** 0.5, 0.0]]), rtol=0, atol=1e-15)
    torch.testing.assert_close(weight("geometric_mask", None, 1.4), expect([[E(0.2 / 3)] * 3, [0.0, 0.0, 0.0]]), rtol=0, atol=1e-15)


class _Trainer:
    pass


def test_piece_reads_the_batch_and_reports_metrics():
    sampler = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, float("nan"), 0.0]], dtype=torch.float64)
    old = torch.tensor([[-0.9, -2.2, -0.2], [-3.0 + LN4, -1.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    piece = RolloutCorrection("token_mask", 0.6, 3.0)
    w, m = piece(_Trainer(), {"sampling_per_token_logps": sampler, "old_per_token_logps": old},
                 logp=torch.zeros(2, 3, dtype=torch.float64), entropy=None, mask=mask)
    # deltas 0.1, -0.2, 0.3, ln 4, and NaN (vLLM returned no log-prob) -> 0 (ratio 1, no correction)
    torch.testing.assert_close(w, expect([[E(0.1), E(-0.2), E(0.3)], [0.0, 1.0, 0.0]]), rtol=0, atol=1e-12)
    assert set(m) == set(METRIC_NAMES)
    assert m["rollout_logp_gap"] == pytest.approx((0.1 + 0.2 + 0.3 + LN4) / 4, abs=1e-12)  # the NaN token left out
    assert m["rollout_logp_gap_max"] == pytest.approx(LN4, abs=1e-12)
    assert m["rollout_is_ratio_min"] == pytest.approx(E(-0.2), abs=1e-12)
    assert m["rollout_is_ratio_max"] == pytest.approx(4.0, abs=1e-12)
    assert m["rollout_is_ratio_mean"] == pytest.approx((E(0.1) + E(-0.2) + E(0.3) + 4.0 + 1.0) / 5, abs=1e-12)
    assert m["rollout_is_masked_frac"] == pytest.approx(1 / 5)
    assert m["rollout_is_truncated_frac"] == 0.0


def test_piece_uses_current_logp_when_trl_skipped_the_old_pass():
    sampler = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    logp = torch.tensor([[-1.0 + LN2, -2.0]], dtype=torch.float64)
    w, _ = RolloutCorrection("token_truncate", None, 3.0)(
        _Trainer(), {"sampling_per_token_logps": sampler}, logp=logp, entropy=None, mask=torch.ones(1, 2))
    torch.testing.assert_close(w, expect([[2.0, 1.0]]), rtol=0, atol=1e-12)


def test_piece_is_a_no_op_without_sampler_logprobs():
    assert RolloutCorrection("sequence_mask", None, 3.0)(_Trainer(), {}, logp=torch.zeros(1, 2), entropy=None, mask=torch.ones(1, 2)) == (None, {})


def _config(tmp_path, **kw):
    return TEPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, use_cpu=True, report_to="none", **kw)


def test_config_takes_trls_correction_options(tmp_path):
    config = _config(tmp_path, use_vllm=True)  # TRL's defaults: correction on, sequence_mask, clip_max 3
    assert RolloutCorrection.from_config(config) == RolloutCorrection("sequence_mask", None, 3.0)
    config = _config(tmp_path, use_vllm=True, vllm_importance_sampling_mode="geometric_mask",
                     vllm_importance_sampling_clip_min=0.999, vllm_importance_sampling_clip_max=1.001)
    assert RolloutCorrection.from_config(config) == RolloutCorrection("geometric_mask", 0.999, 1.001)
    assert RolloutCorrection.from_config(_config(tmp_path, use_vllm=True, vllm_importance_sampling_correction=False)) is None
    assert RolloutCorrection.from_config(_config(tmp_path)) is None  # HF generate: nothing to correct


@pytest.mark.parametrize("options, message", [
    ({"vllm_importance_sampling_mode": "geometric_truncate"}, "valid modes are token_truncate"),
    ({"vllm_importance_sampling_clip_min": 2.0, "vllm_importance_sampling_clip_max": 1.5}, "clip_min.*clip_max"),
    ({"vllm_importance_sampling_clip_max": -1.0}, "must be a finite ratio"),
])
def test_config_refuses_what_is_not_implemented(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, use_vllm=True, **options)
