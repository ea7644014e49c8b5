"""tepo.advantages.group_advantages against the spec (Bessel std, scales, edge cases)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tepo.advantages import group_advantages


def test_worked_example_bessel_population_and_none():
    # research-notes 0.5: R = [1, 0], G = 2 -> +-0.707106 (Bessel std, eps 1e-6), +-0.5 unscaled
    a = group_advantages(torch.tensor([1.0, 0.0], dtype=torch.float64), 2)
    assert a.tolist() == pytest.approx([0.5 / (math.sqrt(0.5) + 1e-6), -0.5 / (math.sqrt(0.5) + 1e-6)], rel=1e-15)
    assert a[0].item() == pytest.approx(0.707106, abs=1e-6)
    assert group_advantages(torch.tensor([1.0, 0.0]), 2, scale="none").tolist() == [0.5, -0.5]


def _reference(rewards, group_size, scale, eps):
    out = []
    batch_std = statistics.stdev(rewards) if len(rewards) > 1 else float("nan")
    for g in range(0, len(rewards), group_size):
        group = rewards[g : g + group_size]
        mean = sum(group) / len(group)
        for r in group:
            if group_size == 1 or r == mean:
                out.append(0.0)
            elif scale == "group":
                out.append((r - mean) / (statistics.stdev(group) + eps))
            elif scale == "batch":
                out.append((r - mean) / (batch_std + eps))
            else:
                out.append(r - mean)
    return out


@settings(max_examples=60, deadline=None)
@given(
    group_size=st.integers(1, 6),
    groups=st.integers(1, 5),
    scale=st.sampled_from(["group", "batch", "none"]),
    eps=st.sampled_from([1e-6, 1e-4, 0.0]),
    data=st.data(),
)
def test_matches_plain_reference(group_size, groups, scale, eps, data):
    rewards = data.draw(
        st.lists(st.sampled_from([0.0, 1.0, -1.0, 0.5, 2.25]), min_size=group_size * groups, max_size=group_size * groups)
    )
    got = group_advantages(torch.tensor(rewards, dtype=torch.float64), group_size, scale=scale, eps=eps)
    expected = _reference(rewards, group_size, scale, eps)
    assert got.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_constant_groups_and_size_one_groups_get_zero():
    assert group_advantages(torch.tensor([1.0, 1.0, 0.0, 0.0]), 2).tolist() == [0.0] * 4
    assert group_advantages(torch.tensor([1.0, 1.0, 0.0, 1.0]), 2, eps=0.0).tolist() == pytest.approx(
        [0.0, 0.0, -math.sqrt(0.5), math.sqrt(0.5)]
    )  # eps = 0: no 0/0 for the constant group
    for scale in ("group", "batch", "none"):
        assert group_advantages(torch.tensor([3.0, -1.0, 7.0]), 1, scale=scale).tolist() == [0.0] * 3


def test_groups_are_consecutive_and_independent():
    a = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0]), 3)
    b = torch.cat([group_advantages(torch.tensor([1.0, 0.0, 0.0]), 3), group_advantages(torch.tensor([0.0, 1.0, 1.0]), 3)])
    assert torch.equal(a, b)
    assert abs(a[:3].sum().item()) < 1e-6 and abs(a[3:].sum().item()) < 1e-6


def test_dtypes_and_inputs():
    assert group_advantages(torch.tensor([1.0, 0.0], dtype=torch.float64), 2).dtype == torch.float64
    assert group_advantages(torch.tensor([1.0, 0.0], dtype=torch.bfloat16), 2).dtype == torch.float32
    assert group_advantages(torch.tensor([1, 0]), 2).dtype == torch.float32
    assert group_advantages([1.0, 0.0, 1.0, 1.0], 2).shape == (4,)


def test_errors():
    with pytest.raises(ValueError, match=r"5 entries.*group_size=2"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match=r"scale='std'.*group, batch, none"):
        group_advantages(torch.zeros(4), 2, scale="std")
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(4), 0)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2), 2)
    with pytest.raises(ValueError, match="finite"):
        group_advantages(torch.tensor([1.0, float("nan")]), 2)
    with pytest.raises(ValueError, match="eps"):
        group_advantages(torch.zeros(2), 2, eps=-1.0)


def test_each_objective_declares_its_advantage_scale():
    from tepo.objectives import advantage_scale, list_objectives

    assert advantage_scale("dr_grpo") == "none"  # Dr. GRPO: no division by the group std
    assert advantage_scale("gpg") == "none"  # GPG: centred rewards, F_norm = 1
    assert advantage_scale("grpo") == advantage_scale("tepo") == "group"
    assert {advantage_scale(n) for n in list_objectives()} <= {"group", "batch", "none"}
