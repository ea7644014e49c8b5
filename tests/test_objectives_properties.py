"""Property tests (hypothesis) for tepo.objectives: padding can hold anything, advantage shapes
agree, and the identities the spec implies between objectives hold in value and gradient."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tepo.objectives import policy_loss

ALL = ["grpo", "dapo", "dr_grpo", "gspo", "gspo_token", "tepo", "clip_cov", "kl_cov"]
PPO_FAMILY = ["grpo", "dapo", "dr_grpo", "gspo", "gspo_token", "tepo"]
AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
GARBAGE = [float("nan"), float("inf"), float("-inf"), 1e30, -1e30, 123.0]

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
F64 = torch.float64


@st.composite
def batches(draw, full=False, equal_lengths=False, on_policy=False):
    """Random float64 inputs: dict of tensors (B, T) / (B,), float64; padding clean (0)."""
    B = draw(st.integers(1, 5))
    T = draw(st.integers(1, 7))
    seed = draw(st.integers(0, 2**31 - 1))
    sigma = draw(st.sampled_from([0.0, 1e-3, 0.05, 0.3, 1.0]))
    g = torch.Generator().manual_seed(seed)
    if full:
        lengths = torch.full((B,), T)
    elif equal_lengths:
        lengths = torch.full((B,), draw(st.integers(1, T)))
    else:
        lengths = torch.randint(0, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    old = -torch.rand(B, T, generator=g, dtype=F64) * 3
    logp = old.clone() if on_policy else old + sigma * torch.randn(B, T, generator=g, dtype=F64)
    adv = torch.randn(B, generator=g, dtype=F64)
    adv = torch.where(torch.rand(B, generator=g, dtype=F64) < 0.2, 0.0, adv)  # some zero advantages
    ref = old + 0.2 * torch.randn(B, T, generator=g, dtype=F64)
    ent = torch.rand(B, T, generator=g, dtype=F64) * 2
    old_ent = ent + 0.3 * torch.randn(B, T, generator=g, dtype=F64)
    clean = lambda t: torch.where(mask, t, 0.0)  # noqa: E731
    return dict(
        logp=clean(logp), old_logp=clean(old), advantages=adv, mask=mask, ref_logp=clean(ref),
        entropy=clean(ent), old_entropy=clean(old_ent),
    )


def evaluate(name, inputs, seed=0, **hp):
    """(loss, grad logp, grad entropy or None, metrics) with fresh leaves and a seeded generator."""
    args = dict(inputs)
    args["logp"] = args["logp"].clone().requires_grad_(True)
    if args.get("entropy") is not None:
        args["entropy"] = args["entropy"].clone().requires_grad_(True)
    out = policy_loss(name, generator=torch.Generator().manual_seed(seed), **args, **hp)
    out.loss.backward()
    ge = None if args.get("entropy") is None else args["entropy"].grad
    ge = None if ge is None else ge.clone()
    return out.loss.detach(), args["logp"].grad.clone(), ge, out.metrics


def options(name, draw):
    """Hyper-parameters that switch every optional term on (so padding reaches all code paths)."""
    hp = {"beta_kl": 0.1, "kl_estimator": draw(st.sampled_from(["k1", "k2", "k3"])), "entropy_coef": 0.01,
          "agg": draw(st.sampled_from(AGGS))}
    if name in ("gspo", "gspo_token", "tepo"):
        hp.update(clip_low=0.05, clip_high=0.05)
    if name == "tepo":
        hp["tepo_kl_coef"] = 0.5
    if name == "clip_cov":
        hp.update(cov_lb=-1.0, cov_ub=1.0, cov_ratio=0.3)
    if name == "kl_cov":
        hp["cov_ratio"] = 0.3
    return hp


def assert_same(a, b, exact=True, rtol=1e-12, atol=1e-15):
    (la, ga, ea, ma), (lb, gb, eb, mb) = a, b
    if exact:
        assert torch.equal(la, lb), (la, lb)
        assert torch.equal(ga, gb)
        assert (ea is None and eb is None) or torch.equal(ea, eb)
        assert ma == mb
    else:
        torch.testing.assert_close(la, lb, rtol=rtol, atol=atol)
        torch.testing.assert_close(ga, gb, rtol=rtol, atol=atol)
        if ea is not None or eb is not None:
            torch.testing.assert_close(ea, eb, rtol=rtol, atol=atol)
        assert ma == pytest.approx(mb, rel=rtol, abs=atol)


# ------------------------------------------------------------------------------------------------
# Padding holds garbage: nothing changes


@SETTINGS
@given(data=st.data(), name=st.sampled_from(ALL), per_token=st.booleans(), garbage=st.sampled_from(GARBAGE))
def test_padding_garbage_changes_nothing(data, name, per_token, garbage):
    x = data.draw(batches())
    hp = options(name, data.draw)
    if per_token:
        x["advantages"] = torch.where(x["mask"], x["advantages"][:, None], 0.0)
    clean = evaluate(name, x, **hp)
    dirty = dict(x)
    pad = ~x["mask"]
    for key in ("logp", "old_logp", "ref_logp", "entropy", "old_entropy") + (("advantages",) if per_token else ()):
        dirty[key] = torch.where(pad, garbage, x[key])
    if not per_token:  # the advantage of an all-padding row is padding too
        empty = ~x["mask"].any(-1)
        dirty["advantages"] = torch.where(empty, garbage, x["advantages"])
    got = evaluate(name, dirty, **hp)
    assert_same(clean, got)
    assert torch.isfinite(got[0]) and torch.isfinite(got[1]).all()
    assert all(math.isfinite(v) for v in got[3].values())


# ------------------------------------------------------------------------------------------------
# (B,) and its broadcast (B, T) agree


@SETTINGS
@given(data=st.data(), name=st.sampled_from(ALL))
def test_per_sequence_and_broadcast_per_token_advantages_agree(data, name):
    x = data.draw(batches())
    hp = options(name, data.draw)
    a = evaluate(name, x, **hp)
    y = dict(x, advantages=x["advantages"][:, None].expand_as(x["logp"]).clone())
    assert_same(a, evaluate(name, y, **hp), exact=False)


# ------------------------------------------------------------------------------------------------
# Identities between objectives


@SETTINGS
@given(data=st.data())
def test_on_policy_tepo_equals_dapo(data):
    # logp == old_logp: s_it = r = 1, nothing clips at either clip range, both token-mean
    x = data.draw(batches(on_policy=True))
    if data.draw(st.booleans()):
        x["advantages"] = torch.where(x["mask"], torch.randn(x["logp"].shape, dtype=F64), 0.0)
    extra = {"beta_kl": 0.1, "entropy_coef": 0.01}
    a = evaluate("tepo", x, **extra)
    b = evaluate("dapo", x, **extra)
    assert_same(a[:3] + ({},), b[:3] + ({},), exact=False)
    assert a[3]["ratio_mean"] == b[3]["ratio_mean"] and a[3]["clip_frac"] == b[3]["clip_frac"] == 0.0


@SETTINGS
@given(data=st.data(), agg=st.sampled_from(AGGS))
def test_on_policy_gspo_equals_grpo(data, agg):
    x = data.draw(batches(on_policy=True))
    a = evaluate("gspo", x, agg=agg)
    b = evaluate("grpo", x, agg=agg)
    assert_same(a, b, exact=False)


@SETTINGS
@given(data=st.data(), agg=st.sampled_from(AGGS), wide=st.booleans())
def test_gspo_token_equals_gspo_for_per_sequence_advantages(data, agg, wide):
    x = data.draw(batches())
    clip = {"clip_low": 0.2, "clip_high": 0.2} if wide else {}
    assert_same(evaluate("gspo_token", x, agg=agg, **clip), evaluate("gspo", x, agg=agg, **clip), exact=False)


@SETTINGS
@given(data=st.data(), wide=st.booleans())
def test_tepo_is_gspo_token_with_token_mean(data, wide):
    x = data.draw(batches())
    clip = {"clip_low": 0.2, "clip_high": 0.2} if wide else {}
    a = evaluate("tepo", x, **clip)
    b = evaluate("gspo_token", x, agg="token-mean", **clip)
    assert_same(a[:3] + ({},), b[:3] + ({},), exact=False)


@SETTINGS
@given(data=st.data(), wide=st.booleans())
def test_tepo_equals_gspo_when_all_lengths_are_equal(data, wide):
    # research-notes §10: with equal lengths 1/N = 1/(B L), so token-mean = seq-mean-token-mean
    x = data.draw(batches(equal_lengths=True))
    clip = {"clip_low": 0.2, "clip_high": 0.2} if wide else {}
    a = evaluate("tepo", x, **clip)
    b = evaluate("gspo", x, **clip)
    assert_same(a[:3] + ({},), b[:3] + ({},), exact=False)


@SETTINGS
@given(data=st.data())
def test_dr_grpo_equals_grpo_on_full_rows(data):
    # every row has T tokens and max_len = T: sum / (B T) = mean_i (sum_t / T)
    x = data.draw(batches(full=True))
    assert_same(evaluate("dr_grpo", x), evaluate("grpo", x), exact=False)


@SETTINGS
@given(data=st.data())
def test_dr_grpo_is_grpo_scaled_by_length_over_max_len(data):
    # equal lengths L <= T: dr_grpo (max_len) = grpo * L / max_len, value and gradient
    x = data.draw(batches(equal_lengths=True))
    max_len = data.draw(st.integers(1, 20))
    L = int(x["mask"].sum(-1)[0])
    la, ga, _, _ = evaluate("dr_grpo", x, max_len=max_len)
    lb, gb, _, _ = evaluate("grpo", x)
    torch.testing.assert_close(la, lb * L / max_len, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(ga, gb * L / max_len, rtol=1e-12, atol=1e-15)


@SETTINGS
@given(data=st.data())
def test_dapo_equals_grpo_at_equal_lengths_and_clip(data):
    x = data.draw(batches(equal_lengths=True))
    assert_same(evaluate("dapo", x, clip_high=0.2), evaluate("grpo", x), exact=False)


@SETTINGS
@given(data=st.data())
def test_clip_cov_without_candidates_is_the_ppo_term(data):
    x = data.draw(batches())
    a = evaluate("clip_cov", x, cov_lb=1e9, cov_ub=2e9)
    b = evaluate("dapo", x, clip_high=0.2)
    assert a[3].pop("cov_selected") == 0.0
    assert_same(a, b)


@SETTINGS
@given(data=st.data())
def test_kl_cov_without_penalty_is_the_unclipped_ppo_term(data):
    x = data.draw(batches())
    a = evaluate("kl_cov", x, kl_cov_coef=0.0)
    b = evaluate("dapo", x, clip_low=1.0, clip_high=1e9)  # bounds no ratio exp(clamp(d, -20, 20)) can reach
    assert a[3].pop("cov_selected") == min(1 if x["mask"].any() else 0, int(x["mask"].sum()))
    assert_same(a, b)


# ------------------------------------------------------------------------------------------------
# Invariances


@SETTINGS
@given(data=st.data(), name=st.sampled_from(PPO_FAMILY), c=st.floats(0.01, 100.0))
def test_ppo_objectives_are_positively_homogeneous_in_advantages(data, name, c):
    # clipping depends on the sign of A only, so l(cA) = c l(A) for c > 0
    x = data.draw(batches())
    la, ga, _, ma = evaluate(name, x)
    lb, gb, _, mb = evaluate(name, dict(x, advantages=c * x["advantages"]))
    torch.testing.assert_close(lb, c * la, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(gb, c * ga, rtol=1e-12, atol=1e-15)
    assert ma == mb


@SETTINGS
@given(data=st.data(), name=st.sampled_from(ALL))
def test_row_order_does_not_matter(data, name):
    x = data.draw(batches())
    hp = options(name, data.draw)
    if name in ("clip_cov", "kl_cov"):
        # take every candidate: the random draw and topk's tie-break (two tokens always tie on
        # cov) depend on the order
        hp["cov_ratio"] = 1.0
    perm = torch.randperm(x["logp"].shape[0], generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99))))
    y = {k: v[perm] for k, v in x.items()}
    la, ga, ea, ma = evaluate(name, x, **hp)
    lb, gb, eb, mb = evaluate(name, y, **hp)
    torch.testing.assert_close(la, lb, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(ga[perm], gb, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(ea[perm], eb, rtol=1e-12, atol=1e-15)
    assert ma == pytest.approx(mb, rel=1e-12, abs=1e-15)


@SETTINGS
@given(data=st.data(), name=st.sampled_from(ALL), extra=st.integers(1, 4))
def test_extra_padding_columns_change_nothing(data, name, extra):
    x = data.draw(batches())
    hp = options(name, data.draw)
    hp["max_len"] = 13  # explicit, since the default max_len = T moves with the padding
    if name in ("clip_cov", "kl_cov"):
        hp["cov_ratio"] = 1.0  # the random draw and topk's tie-break see flat positions
    B, T = x["logp"].shape
    y = {k: (torch.cat([v, torch.zeros(B, extra, dtype=v.dtype)], 1) if v.dim() == 2 else v) for k, v in x.items()}
    la, ga, ea, ma = evaluate(name, x, **hp)
    lb, gb, eb, mb = evaluate(name, y, **hp)
    torch.testing.assert_close(la, lb, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(ga, gb[:, :T], rtol=1e-12, atol=1e-15)
    assert torch.equal(gb[:, T:], torch.zeros(B, extra, dtype=F64))
    assert ma == pytest.approx(mb, rel=1e-12, abs=1e-15)


@SETTINGS
@given(data=st.data(), name=st.sampled_from(PPO_FAMILY))
def test_zero_advantages_give_zero_loss_and_gradient(data, name):
    x = data.draw(batches())
    loss, grad, _, metrics = evaluate(name, dict(x, advantages=torch.zeros_like(x["advantages"])))
    assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0 and metrics["clip_frac"] == 0.0
