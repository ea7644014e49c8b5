"""tepo.objectives against the spec: worked examples, a plain float64 reference, finite differences,
dtypes, errors, and Clip-Cov's random selection.

The reference below is written from docs/objectives.md with loops and numpy, independently of the
library code: per-token values *and* analytic per-token gradients.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tepo.advantages import group_advantages
from tepo.objectives import (
    InvalidHyperparameterError,
    MissingInputError,
    ObjectiveError,
    PolicyLossOutput,
    ShapeMismatchError,
    UnknownHyperparameterError,
    UnknownObjectiveError,
    default_hparams,
    list_objectives,
    policy_loss,
    register_objective,
)

ALL = ["grpo", "dapo", "dr_grpo", "gspo", "gspo_token", "tepo", "clip_cov", "kl_cov"]
BASE_METRICS = {"clip_frac", "clip_frac_low", "clip_frac_high", "ratio_mean", "ratio_min", "ratio_max", "approx_kl"}

# The defaults of docs/objectives.md, typed in again (not read from the library).
SHARED = {"agg": "token-mean", "max_len": None, "beta_kl": 0.0, "kl_estimator": "k3", "entropy_coef": 0.0}
SPEC_DEFAULTS = {
    "grpo": dict(SHARED, clip_low=0.2, clip_high=0.2, agg="seq-mean-token-mean"),
    "dapo": dict(SHARED, clip_low=0.2, clip_high=0.28, agg="token-mean"),
    "dr_grpo": dict(SHARED, clip_low=0.2, clip_high=0.2, agg="seq-mean-token-sum-norm"),
    "gspo": dict(SHARED, clip_low=3e-4, clip_high=4e-4, agg="seq-mean-token-mean"),
    "gspo_token": dict(SHARED, clip_low=3e-4, clip_high=4e-4, agg="seq-mean-token-mean"),
    "tepo": dict(SHARED, clip_low=3e-4, clip_high=4e-4, agg="token-mean", tepo_kl_coef=0.0),
    "clip_cov": dict(SHARED, clip_low=0.2, clip_high=0.2, agg="token-mean", cov_ratio=2e-4, cov_lb=1.0, cov_ub=5.0),
    "kl_cov": dict(SHARED, agg="token-mean", cov_ratio=2e-3, kl_cov_coef=1.0),
}


# ------------------------------------------------------------------------------------------------
# Independent reference (numpy float64, loops)


def reference(name, logp, old, adv, mask, ref=None, ent=None, old_ent=None, selected=None, **given):
    """(loss, dloss/dlogp (B,T), dloss/dentropy (B,T), metrics) straight from the spec.

    `selected` (B,T) bool gives Clip-Cov's random choice (needed only when it is random)."""
    hp = dict(SPEC_DEFAULTS[name])
    hp.update({k: v for k, v in given.items() if v is not None})
    logp, old, mask = (np.asarray(x, dtype=np.float64) for x in (logp, old, mask))
    B, T = logp.shape
    adv = np.asarray(adv, dtype=np.float64)
    A = np.broadcast_to(adv[:, None], (B, T)) if adv.ndim == 1 else adv
    valid = mask != 0
    L = np.maximum(valid.sum(1), 1)
    N = max(1, int(valid.sum()))
    max_len = hp["max_len"] or T
    tokens = [(i, t) for i in range(B) for t in range(T) if valid[i, t]]
    weight = {  # aggregation weight of token (i, t)
        "token-mean": lambda i: 1.0 / N,
        "seq-mean-token-mean": lambda i: 1.0 / (B * L[i]),
        "seq-mean-token-sum": lambda i: 1.0 / B,
        "seq-mean-token-sum-norm": lambda i: 1.0 / (B * max_len),
    }[hp["agg"]]

    d = {(i, t): logp[i, t] - old[i, t] for i, t in tokens}
    ls = [sum(d[i, t] for t in range(T) if valid[i, t]) / L[i] for i in range(B)]
    s = [math.exp(min(v, 10.0)) for v in ls]
    s_gate = [1.0 if v <= 10.0 else 0.0 for v in ls]
    token_level = name in ("grpo", "dapo", "dr_grpo", "clip_cov", "kl_cov")

    # ratio x, d x / d logp (token ratio only), PPO value and d l / d x per token
    x, dx, l, dl_dx = {}, {}, {}, {}
    lows = highs = 0
    clipped = set()
    for i, t in tokens:
        a = A[i, t]
        if token_level:
            x[i, t] = math.exp(min(max(d[i, t], -20.0), 20.0))
            dx[i, t] = x[i, t] if abs(d[i, t]) < 20.0 else 0.0
        else:
            x[i, t] = s[i]
        if name == "kl_cov":
            l[i, t], dl_dx[i, t] = -a * x[i, t], -a
            continue
        lo, hi = 1 - hp["clip_low"], 1 + hp["clip_high"]
        if a > 0 and x[i, t] > hi:
            l[i, t], dl_dx[i, t] = -a * hi, 0.0
            highs += 1
            clipped.add((i, t))
        elif a < 0 and x[i, t] < lo:
            l[i, t], dl_dx[i, t] = -a * lo, 0.0
            lows += 1
            clipped.add((i, t))
        else:
            l[i, t], dl_dx[i, t] = -a * x[i, t], -a

    # covariance selection
    sel = set()
    if name in ("clip_cov", "kl_cov"):
        mA = sum(A[i, t] for i, t in tokens) / N
        mlp = sum(logp[i, t] for i, t in tokens) / N
        cov = {(i, t): (A[i, t] - mA) * (logp[i, t] - mlp) for i, t in tokens}
        k = max(1, int(hp["cov_ratio"] * N))
        if name == "kl_cov":
            sel = set(sorted(tokens, key=lambda it: -cov[it])[:k])
        else:
            candidates = {it for it in tokens if it not in clipped and hp["cov_lb"] < cov[it] < hp["cov_ub"]}
            if selected is None:
                assert len(candidates) <= k, "random selection: pass `selected` to the reference"
                sel = candidates
            else:
                sel = {tuple(it) for it in np.argwhere(np.asarray(selected, dtype=bool))}
                assert sel <= candidates and len(sel) == min(k, len(candidates))

    loss = 0.0
    grad = np.zeros((B, T))
    gent = np.zeros((B, T))
    for i, t in tokens:
        w = weight(i)
        if name == "clip_cov" and (i, t) in sel:
            continue  # 0, value and gradient
        loss += w * l[i, t]
        if token_level:
            grad[i, t] += w * dl_dx[i, t] * dx[i, t]
        elif name == "gspo":  # through ls_i = sum_t' d[i,t'] / L_i: reaches every token of row i
            for t2 in range(T):
                if valid[i, t2]:
                    grad[i, t2] += w * dl_dx[i, t] * s[i] * s_gate[i] / L[i]
        else:  # gspo_token, tepo: through token t only
            grad[i, t] += w * dl_dx[i, t] * s[i] * s_gate[i]
        if name == "kl_cov" and (i, t) in sel:
            loss += w * hp["kl_cov_coef"] * abs(d[i, t])
            grad[i, t] += w * hp["kl_cov_coef"] * np.sign(d[i, t])
        if hp["beta_kl"] > 0:  # KL to reference, per token before aggregation
            u = ref[i, t] - logp[i, t]
            kv, dk = {
                "k1": (-u, 1.0),
                "k2": (0.5 * u * u, -u),
                "k3": (math.exp(u) - u - 1, 1 - math.exp(u)),
            }[hp["kl_estimator"]]
            loss += w * hp["beta_kl"] * kv
            grad[i, t] += w * hp["beta_kl"] * dk
        if hp["entropy_coef"] != 0:
            loss -= hp["entropy_coef"] * w * ent[i, t]
            gent[i, t] -= hp["entropy_coef"] * w

    ratios = list(x.values())
    metrics = {
        "clip_frac": (lows + highs) / N,
        "clip_frac_low": lows / N,
        "clip_frac_high": highs / N,
        "ratio_mean": sum(ratios) / N,
        "ratio_min": min(ratios) if ratios else 0.0,
        "ratio_max": max(ratios) if ratios else 0.0,
        "approx_kl": sum(math.exp(-d[it]) + d[it] - 1 for it in tokens) / N,
    }
    if name in ("clip_cov", "kl_cov"):
        metrics["cov_selected"] = float(len(sel))
    if name == "tepo":
        frac = 0.0
        if ent is not None and old_ent is not None:
            m = [(i, t) for i, t in tokens if A[i, t] > 0 and ent[i, t] < old_ent[i, t]]
            frac = len(m) / N
            if hp["tepo_kl_coef"] > 0:
                for it in m:
                    loss += hp["tepo_kl_coef"] * (math.exp(-d[it]) + d[it] - 1) / N
                    grad[it] += hp["tepo_kl_coef"] * (1 - math.exp(-d[it])) / N
        metrics["kl_mask_frac"] = frac
    if ent is not None:
        metrics["entropy_mean"] = sum(ent[i, t] for i, t in tokens) / N
    return loss, grad, gent, metrics


# ------------------------------------------------------------------------------------------------
# Helpers


def run(name, logp, old, adv, mask, ref=None, ent=None, old_ent=None, generator=None, **hp):
    """Call policy_loss on float64 copies; returns (output, grad_logp, grad_entropy)."""
    lp = torch.as_tensor(logp, dtype=torch.float64).clone().requires_grad_(True)
    e = None if ent is None else torch.as_tensor(ent, dtype=torch.float64).clone().requires_grad_(True)
    out = policy_loss(
        name,
        logp=lp,
        old_logp=torch.as_tensor(old, dtype=torch.float64),
        advantages=torch.as_tensor(adv, dtype=torch.float64),
        mask=torch.as_tensor(mask),
        ref_logp=None if ref is None else torch.as_tensor(ref, dtype=torch.float64),
        entropy=e,
        old_entropy=None if old_ent is None else torch.as_tensor(old_ent, dtype=torch.float64),
        generator=generator,
        **hp,
    )
    out.loss.backward()
    gl = lp.grad.numpy().copy()
    ge = None if e is None or e.grad is None else e.grad.numpy().copy()
    return out, gl, ge


def random_inputs(seed, B=4, T=7, sigma=0.3, per_token_adv=False, empty_row=True):
    rng = np.random.default_rng(seed)
    old = -rng.exponential(1.0, size=(B, T))
    logp = old + rng.normal(0, sigma, size=(B, T))
    ref = old + rng.normal(0, 0.2, size=(B, T))
    lengths = rng.integers(1, T + 1, size=B)
    if empty_row and B > 2:
        lengths[1] = 0
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int64)
    adv = rng.normal(size=(B, T) if per_token_adv else (B,))
    ent = rng.uniform(0.1, 2.0, size=(B, T))
    old_ent = ent + rng.normal(0, 0.3, size=(B, T))
    return dict(logp=logp, old=old, adv=adv, mask=mask, ref=ref, ent=ent, old_ent=old_ent)


# ------------------------------------------------------------------------------------------------
# Registry and defaults


def test_registry_lists_every_objective_with_the_spec_defaults():
    # the spec's objectives (docs/objectives.md adds more; tests/test_objectives_new.py covers those)
    assert set(ALL) <= set(list_objectives())
    for name in ALL:
        assert default_hparams(name) == SPEC_DEFAULTS[name], name


def test_default_hparams_returns_a_copy():
    hp = default_hparams("grpo")
    hp["clip_low"] = 0.9
    assert default_hparams("grpo")["clip_low"] == 0.2


def test_none_means_default():
    x = random_inputs(0)
    for name in ALL:
        given = {k: None for k in SPEC_DEFAULTS[name]}
        a, ga, _ = run(name, x["logp"], x["old"], x["adv"], x["mask"], generator=torch.Generator().manual_seed(0), **given)
        b, gb, _ = run(name, x["logp"], x["old"], x["adv"], x["mask"], generator=torch.Generator().manual_seed(0))
        assert a.loss.item() == b.loss.item() and np.array_equal(ga, gb)
    # the trainer may pass every config field; unset ones (None) that another objective uses are fine
    run("kl_cov", x["logp"], x["old"], x["adv"], x["mask"], clip_low=None, clip_high=None, tepo_kl_coef=None)


def test_register_objective_adds_a_new_objective_in_one_function():
    from tepo.objectives import ObjectiveTerms
    from tepo.objectives._common import ppo_term, token_ratio
    from tepo.objectives._registry import _REGISTRY

    @register_objective("_test_reinforce", clip_low=1.0, clip_high=1e9, agg="token-mean")
    def _reinforce(batch, hp):
        r = token_ratio(batch.log_ratio)
        clip = (hp["clip_low"], hp["clip_high"])
        return ObjectiveTerms(per_token=ppo_term(r, batch.advantages, *clip), ratio=r, clip=clip)

    @register_objective("_test_const", agg="token-mean")
    def _const(batch, hp):  # a row-constant (B, 1) per-token loss of 1 (also on empty rows)
        ones = batch.mask.new_ones(batch.shape[0], 1)
        return ObjectiveTerms(per_token=ones, ratio=ones)

    try:
        mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]])  # an empty row
        z = torch.zeros(3, 3, dtype=torch.float64)
        for agg, expected in [("token-mean", 1.0), ("seq-mean-token-mean", 2 / 3), ("seq-mean-token-sum", 1.0),
                              ("seq-mean-token-sum-norm", 3 / 9)]:
            out = policy_loss("_test_const", logp=z, old_logp=z, advantages=torch.zeros(3), mask=mask, agg=agg)
            assert out.loss.item() == pytest.approx(expected, rel=1e-15)
        assert "_test_reinforce" in list_objectives()
        x = random_inputs(1)
        a, ga, _ = run("_test_reinforce", x["logp"], x["old"], x["adv"], x["mask"])
        b, gb, _ = run("kl_cov", x["logp"], x["old"], x["adv"], x["mask"], kl_cov_coef=0.0)
        assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-14)
        np.testing.assert_allclose(ga, gb, rtol=1e-14, atol=1e-17)
        with pytest.raises(ValueError, match="already registered"):
            register_objective("_test_reinforce")(_reinforce)
    finally:
        _REGISTRY.pop("_test_reinforce", None)
        _REGISTRY.pop("_test_const", None)


# ------------------------------------------------------------------------------------------------
# Worked examples of research-notes.md (Examples A and B)

OLD = [[-1.0, -0.5, -2.0], [-0.7, -1.2, -0.3]]
NEW = [[-0.9, -0.6, -1.5], [-0.8, -1.0, -0.6]]
REF = [[-1.1, -0.5, -1.8], [-0.6, -1.3, -0.4]]
MASK_A = [[1, 1, 1], [1, 1, 1]]
MASK_B = [[1, 1, 1], [1, 1, 0]]
A_BESSEL = group_advantages(torch.tensor([1.0, 0.0], dtype=torch.float64), 2).numpy()  # +-0.707106
A_NONE = group_advantages(torch.tensor([1.0, 0.0], dtype=torch.float64), 2, scale="none").numpy()  # +-0.5
A_POP = np.array([1.0, -1.0])

WORKED = [
    # (id, objective, mask, advantages, hparams, loss, grad or None)
    ("3.6 grpo", "grpo", MASK_A, A_BESSEL, {}, -0.033442, [[-0.130245, -0.106636, 0], [0.106636, 0.143943, 0]]),
    ("3.6 grpo+kl", "grpo", MASK_A, A_BESSEL, {"beta_kl": 0.04}, -0.032453,
     [[-0.129037, -0.107337, 0.001728], [0.105160, 0.145671, -0.001476]]),
    ("3.6 grpo pop-std", "grpo", MASK_A, A_POP, {}, -0.047295, None),
    ("4.3 dapo", "dapo", MASK_A, A_BESSEL, {}, -0.042870, [[-0.130245, -0.106636, 0], [0.106636, 0.143943, 0]]),
    ("5.4 dr_grpo TRL", "dr_grpo", MASK_A, A_NONE, {"max_len": 4}, -0.017736,
     [[-0.069073, -0.056552, 0], [0.056552, 0.076338, 0]]),
    ("2.5 gspo", "gspo", MASK_A, A_BESSEL, {}, -0.000247, [[0, 0, 0], [0, 0, 0]]),
    ("2.5 gspo .2", "gspo", MASK_A, A_BESSEL, {"clip_low": 0.2, "clip_high": 0.2}, -0.086922,
     [[-0.139224] * 3, [0.110250] * 3]),
    ("10 tepo .2", "tepo", MASK_A, A_BESSEL, {"clip_low": 0.2, "clip_high": 0.2}, -0.086922,
     [[-0.139224] * 3, [0.110250] * 3]),
    ("6.6 kl_cov", "kl_cov", MASK_A, A_BESSEL, {}, -0.076633,
     [[-0.130246, -0.273303, -0.194304], [0.106636, 0.143944, 0.087306]]),
    ("6.6 clip_cov toy", "clip_cov", MASK_A, A_BESSEL, {"cov_lb": 0.05, "cov_ub": 5.0, "cov_ratio": 2 / 6}, -0.070750,
     [[-0.130246, 0, 0], [0.106636, 0, 0]]),
    ("1.9 tepo .2 B", "tepo", MASK_B, A_BESSEL, {"clip_low": 0.2, "clip_high": 0.2}, -0.203864,
     [[-0.167070] * 3, [0.148672, 0.148672, 0]]),
    ("1.9 tepo B", "tepo", MASK_B, A_BESSEL, {}, -0.127089, [[0, 0, 0], [0.148672, 0.148672, 0]]),
    ("1.9 gspo .2 B", "gspo", MASK_B, A_BESSEL, {"clip_low": 0.2, "clip_high": 0.2}, -0.045993,
     [[-0.139225] * 3, [0.185840, 0.185840, 0]]),
    ("8.4 token-mean", "grpo", MASK_B, A_BESSEL, {"agg": "token-mean"}, -0.153268,
     [[-0.156295, -0.127963, 0], [0.127963, 0.172732, 0]]),
    ("8.4 seq-mean-token-sum", "grpo", MASK_B, A_BESSEL, {"agg": "seq-mean-token-sum"}, -0.383170,
     [[-0.390737, -0.319908, 0], [0.319908, 0.431831, 0]]),
    ("8.4 seq-mean-token-mean", "grpo", MASK_B, A_BESSEL, {}, -0.002433,
     [[-0.130246, -0.106636, 0], [0.159954, 0.215915, 0]]),
    ("8.4 TRL dr_grpo L_max=3", "dr_grpo", MASK_B, A_BESSEL, {"max_len": 3}, -0.127723,
     [[-0.130246, -0.106636, 0], [0.106636, 0.143944, 0]]),
    ("8.4 default max_len = T = 3", "dr_grpo", MASK_B, A_BESSEL, {}, -0.127723, None),
]


@pytest.mark.parametrize("case", WORKED, ids=[c[0] for c in WORKED])
def test_worked_examples(case):
    _, name, mask, adv, hp, loss, grad = case
    out, g, _ = run(name, NEW, OLD, adv, mask, ref=REF, **hp)
    assert out.loss.dtype == torch.float64
    assert out.loss.item() == pytest.approx(loss, abs=1.5e-6)
    if grad is not None:
        np.testing.assert_allclose(g, np.array(grad, dtype=float), atol=1.5e-6)
    # and the reference agrees to float64 rounding
    ref_loss, ref_grad, _, ref_metrics = reference(name, NEW, OLD, adv, mask, ref=np.array(REF), **hp)
    assert out.loss.item() == pytest.approx(ref_loss, rel=1e-13, abs=1e-15)
    np.testing.assert_allclose(g, ref_grad, rtol=1e-12, atol=1e-15)
    assert out.metrics == pytest.approx(ref_metrics, rel=1e-12, abs=1e-15)


def test_verl_seq_mean_token_sum_norm_is_b_times_ours():
    # research-notes 8.4: verl's C=3 value lacks the 1/B of the spec's (TRL's) form
    out, _, _ = run("dr_grpo", NEW, OLD, A_BESSEL, MASK_B, max_len=3)
    assert 2 * out.loss.item() == pytest.approx(-0.255446, abs=2e-6)


def test_worked_example_metrics():
    out, _, _ = run("grpo", NEW, OLD, A_BESSEL, MASK_A)
    # resp1-t3 clipped high (r=1.6487 > 1.2, A>0); resp2-t3 clipped low (r=0.7408 < 0.8, A<0)
    assert out.metrics["clip_frac_high"] == pytest.approx(1 / 6)
    assert out.metrics["clip_frac_low"] == pytest.approx(1 / 6)
    assert out.metrics["clip_frac"] == pytest.approx(2 / 6)
    assert out.metrics["ratio_max"] == pytest.approx(math.exp(0.5))
    assert out.metrics["ratio_min"] == pytest.approx(math.exp(-0.3))
    assert set(out.metrics) == BASE_METRICS
    gs, _, _ = run("gspo", NEW, OLD, A_BESSEL, MASK_A)
    assert gs.metrics["ratio_max"] == pytest.approx(1.181360, abs=1e-6)  # gspo reports s_i
    assert gs.metrics["clip_frac"] == 1.0


def test_kl_cov_worked_example_selects_the_top_covariance_token():
    out, g, _ = run("kl_cov", NEW, OLD, A_BESSEL, MASK_A)
    assert out.metrics["cov_selected"] == 1.0
    # the selected token (resp 1, token 2): -A r / 6 + sign(d) / 6
    assert g[0, 1] == pytest.approx(-0.106636 - 1 / 6, abs=1e-6)


def test_clip_cov_paper_ratio_selects_one_of_the_two_candidates():
    # with cov_ratio 2e-4, k = max(1, int(2e-4 * 6)) = 1 of the 2 candidates, at random
    seen = set()
    for seed in range(12):
        out, g, _ = run("clip_cov", NEW, OLD, A_BESSEL, MASK_A, cov_lb=0.05, generator=torch.Generator().manual_seed(seed))
        zeroed = {(i, t) for i, t in [(0, 1), (1, 1)] if g[i, t] == 0}
        assert len(zeroed) == 1 and out.metrics["cov_selected"] == 1.0
        sel = np.zeros((2, 3), dtype=bool)
        sel[next(iter(zeroed))] = True
        ref_loss, ref_grad, _, _ = reference("clip_cov", NEW, OLD, A_BESSEL, MASK_A, selected=sel, cov_lb=0.05)
        assert out.loss.item() == pytest.approx(ref_loss, rel=1e-13)
        np.testing.assert_allclose(g, ref_grad, rtol=1e-12, atol=1e-15)
        seen |= zeroed
    assert seen == {(0, 1), (1, 1)}


def test_tepo_kl_mask_toy():
    # research-notes 1.9 mask toy: H_old, H_new and A = [+, -] give mask [[1,0,1],[0,0,0]]
    h_old = [[1.2, 0.8, 2.0], [0.9, 1.1, 0.7]]
    h_new = [[1.1, 0.9, 1.6], [0.8, 1.2, 0.7]]
    base, g0, _ = run("tepo", NEW, OLD, A_BESSEL, MASK_A, ent=h_new, old_ent=h_old)
    assert base.metrics["kl_mask_frac"] == pytest.approx(2 / 6)
    coef = 0.3
    out, g, _ = run("tepo", NEW, OLD, A_BESSEL, MASK_A, ent=h_new, old_ent=h_old, tepo_kl_coef=coef)
    d1, d3 = 0.1, 0.5  # d at the two masked tokens (resp 1, tokens 1 and 3)
    k = (math.exp(-d1) + d1 - 1) + (math.exp(-d3) + d3 - 1)
    assert out.loss.item() - base.loss.item() == pytest.approx(coef * k / 6, rel=1e-12)
    expected = np.zeros((2, 3))
    expected[0, 0] = coef * (1 - math.exp(-d1)) / 6
    expected[0, 2] = coef * (1 - math.exp(-d3)) / 6
    np.testing.assert_allclose(g - g0, expected, atol=1e-16)


def test_tepo_kl_mask_is_empty_on_policy():
    # on-policy the trainer passes old_entropy = entropy: "entropy decreased" is strict, so no token
    ent = [[1.0, 2.0, 3.0], [0.5, 0.25, 9.0]]
    out, g, _ = run("tepo", NEW, NEW, A_BESSEL, MASK_B, ent=ent, old_ent=ent, tepo_kl_coef=1.0)
    base, g0, _ = run("tepo", NEW, NEW, A_BESSEL, MASK_B)
    assert out.metrics["kl_mask_frac"] == 0.0
    assert out.loss.item() == base.loss.item() and np.array_equal(g, g0)


def test_entropy_bonus_and_metric():
    ent = [[1.0, 2.0, 3.0], [0.5, 0.25, 9.0]]
    base, _, _ = run("grpo", NEW, OLD, A_BESSEL, MASK_B, ent=ent)
    out, _, ge = run("grpo", NEW, OLD, A_BESSEL, MASK_B, ent=ent, entropy_coef=0.01)
    agg = ((1 + 2 + 3) / 3 + (0.5 + 0.25) / 2) / 2  # seq-mean-token-mean; padding (9.0) ignored
    assert out.loss.item() - base.loss.item() == pytest.approx(-0.01 * agg, rel=1e-12)
    np.testing.assert_allclose(ge, -0.01 * np.array([[1 / 6] * 3, [1 / 4, 1 / 4, 0]]), atol=1e-17)
    assert out.metrics["entropy_mean"] == pytest.approx((1 + 2 + 3 + 0.5 + 0.25) / 5)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators(estimator):
    base, g0, _ = run("dapo", NEW, OLD, A_BESSEL, MASK_A)
    out, g, _ = run("dapo", NEW, OLD, A_BESSEL, MASK_A, ref=REF, beta_kl=0.5, kl_estimator=estimator)
    u = np.array(REF) - np.array(NEW)
    k, dk = {"k1": (-u, np.ones_like(u)), "k2": (u * u / 2, -u), "k3": (np.exp(u) - u - 1, 1 - np.exp(u))}[estimator]
    assert out.loss.item() - base.loss.item() == pytest.approx(0.5 * k.mean(), rel=1e-12)
    np.testing.assert_allclose(g - g0, 0.5 * dk / 6, atol=1e-16)


# ------------------------------------------------------------------------------------------------
# Random inputs against the reference

HPARAM_SETS = {
    "grpo": [{}, {"agg": "token-mean", "clip_high": 0.28}, {"agg": "seq-mean-token-sum", "beta_kl": 0.1}],
    "dapo": [{}, {"beta_kl": 0.05, "kl_estimator": "k2", "entropy_coef": 0.01}],
    "dr_grpo": [{}, {"max_len": 11}],
    "gspo": [{}, {"clip_low": 0.05, "clip_high": 0.05}, {"clip_low": 0.05, "clip_high": 0.05, "agg": "token-mean"}],
    "gspo_token": [{}, {"clip_low": 0.05, "clip_high": 0.05}, {"clip_low": 0.05, "clip_high": 0.05, "agg": "seq-mean-token-sum-norm"}],
    "tepo": [{}, {"clip_low": 0.05, "clip_high": 0.05, "tepo_kl_coef": 0.5},
             {"clip_low": 0.2, "clip_high": 0.2, "tepo_kl_coef": 0.1, "beta_kl": 0.02, "kl_estimator": "k1", "entropy_coef": 0.003}],
    "clip_cov": [{"cov_lb": 0.0, "cov_ub": 1.0, "cov_ratio": 1.0}, {"cov_lb": -5.0, "cov_ub": 0.0, "cov_ratio": 0.5}],
    "kl_cov": [{}, {"cov_ratio": 0.2, "kl_cov_coef": 0.3, "agg": "seq-mean-token-mean"}],
}
CASES = [(n, i, hp) for n, hps in HPARAM_SETS.items() for i, hp in enumerate(hps)]


@pytest.mark.parametrize("per_token_adv", [False, True], ids=["adv(B)", "adv(B,T)"])
@pytest.mark.parametrize("name,_i,hp", CASES, ids=[f"{n}-{i}" for n, i, _ in CASES])
def test_matches_reference_on_random_inputs(name, _i, hp, per_token_adv):
    for seed in range(4):
        x = random_inputs(100 * seed + _i, per_token_adv=per_token_adv)
        gen = torch.Generator().manual_seed(seed)
        out, g, ge = run(name, x["logp"], x["old"], x["adv"], x["mask"], x["ref"], x["ent"], x["old_ent"], generator=gen, **hp)
        selected = None
        if name == "clip_cov":  # random: read the chosen tokens back from the zero gradients
            selected = (g == 0) & (x["mask"] != 0) & (_reference_grad_without_selection(x, hp) != 0)
        ref_loss, ref_grad, ref_gent, ref_metrics = reference(
            name, x["logp"], x["old"], x["adv"], x["mask"], x["ref"], x["ent"], x["old_ent"], selected=selected, **hp
        )
        assert out.loss.item() == pytest.approx(ref_loss, rel=1e-12, abs=1e-14), seed
        np.testing.assert_allclose(g, ref_grad, rtol=1e-11, atol=1e-15)
        if ge is not None:
            np.testing.assert_allclose(ge, ref_gent, rtol=1e-12, atol=1e-16)
        assert out.metrics == pytest.approx(ref_metrics, rel=1e-12, abs=1e-15)


def _reference_grad_without_selection(x, hp):
    hp = dict(hp, cov_lb=1e30, cov_ub=2e30)
    return reference("clip_cov", x["logp"], x["old"], x["adv"], x["mask"], x["ref"], x["ent"], x["old_ent"], **hp)[1]


def test_random_inputs_exercise_clipping_and_selection():
    """Guard against a vacuous comparison: the random cases clip, select and mask something."""
    x = random_inputs(3)
    assert run("grpo", x["logp"], x["old"], x["adv"], x["mask"])[0].metrics["clip_frac"] > 0
    assert run("tepo", x["logp"], x["old"], x["adv"], x["mask"])[0].metrics["clip_frac"] > 0
    out = run("clip_cov", x["logp"], x["old"], x["adv"], x["mask"], cov_lb=0.0, cov_ub=1.0, cov_ratio=1.0)[0]
    assert out.metrics["cov_selected"] > 0
    out = run("tepo", x["logp"], x["old"], x["adv"], x["mask"], ent=x["ent"], old_ent=x["old_ent"])[0]
    assert 0 < out.metrics["kl_mask_frac"] < 1


# ------------------------------------------------------------------------------------------------
# Finite differences


GRADCHECK = [
    ("grpo", {"beta_kl": 0.1}),
    ("dapo", {"agg": "seq-mean-token-sum", "beta_kl": 0.2, "kl_estimator": "k2"}),
    ("dr_grpo", {"max_len": 9}),
    ("gspo", {"clip_low": 0.05, "clip_high": 0.05}),
    ("gspo_token", {"clip_low": 0.05, "clip_high": 0.05}),
    ("tepo", {"clip_low": 0.05, "clip_high": 0.05, "tepo_kl_coef": 0.7, "beta_kl": 0.1}),
    ("clip_cov", {"cov_lb": 0.0, "cov_ub": 1.0, "cov_ratio": 0.1}),
    ("kl_cov", {"cov_ratio": 0.1}),
]


@pytest.mark.parametrize("name,hp", GRADCHECK, ids=[g[0] for g in GRADCHECK])
def test_gradcheck(name, hp):
    x = random_inputs(7, per_token_adv=(name == "dapo"))
    t = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in x.items() if k != "mask"}
    mask = torch.as_tensor(x["mask"])
    logp = t["logp"].clone().requires_grad_(True)
    ent = t["ent"].clone().requires_grad_(True)

    def f(lp, e):
        return policy_loss(
            name, logp=lp, old_logp=t["old"], advantages=t["adv"], mask=mask, ref_logp=t["ref"], entropy=e,
            old_entropy=t["old_ent"], generator=torch.Generator().manual_seed(0), entropy_coef=0.01, **hp,
        ).loss

    assert torch.autograd.gradcheck(f, (logp, ent), eps=1e-6, atol=1e-7, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# dtypes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_compute_dtype(dtype):
    x = random_inputs(5)
    for name in ALL:
        lp = torch.as_tensor(x["logp"]).to(dtype).requires_grad_(True)
        out = policy_loss(
            name, logp=lp, old_logp=torch.as_tensor(x["old"]).to(dtype), advantages=torch.as_tensor(x["adv"]).to(dtype),
            mask=torch.as_tensor(x["mask"]).bool(), entropy=torch.as_tensor(x["ent"]).to(dtype),
        )
        assert out.loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        out.loss.backward()
        assert lp.grad.dtype == dtype and torch.isfinite(lp.grad).all()
        assert all(isinstance(v, float) and math.isfinite(v) for v in out.metrics.values())


@pytest.mark.parametrize("name", ALL)
def test_float32_matches_float64(name):
    x = random_inputs(11, B=6, T=9)
    hp = {"clip_low": 0.05, "clip_high": 0.05} if name in ("gspo", "gspo_token", "tepo") else {}
    res = {}
    for dtype in (torch.float32, torch.float64):
        lp = torch.as_tensor(x["logp"], dtype=dtype).requires_grad_(True)
        out = policy_loss(
            name, logp=lp, old_logp=torch.as_tensor(x["old"], dtype=dtype), advantages=torch.as_tensor(x["adv"], dtype=dtype),
            mask=torch.as_tensor(x["mask"]), generator=torch.Generator().manual_seed(0), **hp,
        )
        out.loss.backward()
        res[dtype] = (out.loss.item(), lp.grad.double().numpy(), out.metrics)
    l32, g32, m32 = res[torch.float32]
    l64, g64, m64 = res[torch.float64]
    assert l32 == pytest.approx(l64, rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(g32, g64, rtol=1e-5, atol=1e-7)
    assert m32 == pytest.approx(m64, rel=1e-5, abs=1e-6)


# ------------------------------------------------------------------------------------------------
# Edge cases


@pytest.mark.parametrize("name", ALL)
def test_empty_mask_gives_zero_loss_zero_metrics(name):
    B, T = 3, 4
    lp = torch.full((B, T), float("nan"), dtype=torch.float64, requires_grad=True)
    out = policy_loss(
        name, logp=lp, old_logp=torch.full((B, T), float("inf")), advantages=torch.full((B,), float("nan")),
        mask=torch.zeros(B, T, dtype=torch.bool), entropy=torch.full((B, T), float("nan")),
        old_entropy=torch.full((B, T), float("nan")), ref_logp=torch.zeros(B, T), beta_kl=0.1,
        **({"tepo_kl_coef": 0.1} if name == "tepo" else {}),
    )
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert torch.equal(lp.grad, torch.zeros(B, T, dtype=torch.float64))
    assert all(v == 0.0 for v in out.metrics.values()), out.metrics


def test_metric_keys_per_objective():
    x = random_inputs(2)
    for name in ALL:
        out, _, _ = run(name, x["logp"], x["old"], x["adv"], x["mask"])
        extra = {"clip_cov": {"cov_selected"}, "kl_cov": {"cov_selected"}, "tepo": {"kl_mask_frac"}}.get(name, set())
        assert set(out.metrics) == BASE_METRICS | extra, name
        out, _, _ = run(name, x["logp"], x["old"], x["adv"], x["mask"], ent=x["ent"])
        assert set(out.metrics) == BASE_METRICS | extra | {"entropy_mean"}, name
        assert isinstance(out, PolicyLossOutput) and out.loss.dim() == 0


def test_large_log_ratios_are_clamped():
    # token ratio: clamp(d, -20, 20); sequence ratio: min(ls, 10) -- finite, no gradient past the clamp
    logp = torch.tensor([[30.0, 0.0], [-30.0, 0.0]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(2, 2, dtype=torch.float64)
    adv = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    mask = torch.tensor([[1, 0], [1, 0]])
    out = policy_loss("kl_cov", logp=logp, old_logp=old, advantages=adv, mask=mask, kl_cov_coef=0.0)
    out.loss.backward()
    assert out.metrics["ratio_max"] == pytest.approx(math.exp(20.0))
    assert out.metrics["ratio_min"] == pytest.approx(math.exp(-20.0))
    assert torch.equal(logp.grad, torch.zeros(2, 2, dtype=torch.float64))
    logp.grad = None
    out = policy_loss("gspo_token", logp=logp, old_logp=old, advantages=adv, mask=mask, clip_low=1.0, clip_high=1e9)
    out.loss.backward()
    assert out.metrics["ratio_max"] == pytest.approx(math.exp(10.0))
    assert logp.grad[0, 0] == 0.0 and logp.grad[1, 0] != 0.0


@pytest.mark.parametrize("name", ["grpo", "gspo", "gspo_token", "tepo", "clip_cov"])
def test_clipping_is_strict_at_the_bound(name):
    # on-policy, ratio exactly 1 = 1 + clip_high = 1 - clip_low: "clipped" needs x > 1+clip_high or
    # x < 1-clip_low, so nothing is clipped and the gradient is -A * weight
    logp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    adv = torch.tensor([[0.5, -0.7]], dtype=torch.float64)
    out, g, _ = run(name, logp, logp, adv, [[1, 1]], clip_low=0.0, clip_high=0.0, agg="token-mean")
    assert out.metrics["clip_frac"] == 0.0
    # gspo's gradient flows through ls = mean_t d, so each token gets the row's mean
    expected = [[0.05, 0.05]] if name == "gspo" else [[-0.25, 0.35]]
    np.testing.assert_allclose(g, expected, rtol=1e-14)


# ------------------------------------------------------------------------------------------------
# Clip-Cov randomness


def _clip_cov_selection(gen, seed_inputs=21, **hp):
    x = random_inputs(seed_inputs, B=6, T=8, empty_row=False)
    _, g, _ = run("clip_cov", x["logp"], x["old"], x["adv"], x["mask"], generator=gen, **hp)
    _, g_none, _ = run("clip_cov", x["logp"], x["old"], x["adv"], x["mask"], cov_lb=1e30, cov_ub=2e30)
    return tuple(map(tuple, np.argwhere((g == 0) & (g_none != 0))))


def test_clip_cov_selection_is_deterministic_given_a_generator_and_uniform():
    hp = {"cov_lb": -10.0, "cov_ub": 10.0, "cov_ratio": 0.05}  # every unclipped valid token is a candidate
    a = _clip_cov_selection(torch.Generator().manual_seed(5), **hp)
    assert a == _clip_cov_selection(torch.Generator().manual_seed(5), **hp)
    picks = [_clip_cov_selection(torch.Generator().manual_seed(s), **hp) for s in range(300)]
    k = len(a)
    assert k >= 1 and all(len(p) == k for p in picks)
    counts: dict = {}
    for p in picks:
        for it in p:
            counts[it] = counts.get(it, 0) + 1
    n_cand = len(counts)
    assert n_cand > 5  # many distinct tokens get picked
    # uniform without replacement: each candidate expected 300*k/n_cand times; a loose chi-square bound
    expected = 300 * k / n_cand
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < n_cand + 6 * math.sqrt(2 * n_cand)


def test_clip_cov_without_generator_uses_global_rng():
    hp = {"cov_lb": -10.0, "cov_ub": 10.0, "cov_ratio": 0.05}
    torch.manual_seed(3)
    a = _clip_cov_selection(None, **hp)
    torch.manual_seed(3)
    assert a == _clip_cov_selection(None, **hp)


# ------------------------------------------------------------------------------------------------
# Errors


def _call(name="grpo", B=2, T=3, **kw):
    args = dict(logp=torch.zeros(B, T), old_logp=torch.zeros(B, T), advantages=torch.zeros(B), mask=torch.ones(B, T))
    args.update(kw)
    return policy_loss(name, **args)


def test_unknown_objective_lists_known():
    with pytest.raises(UnknownObjectiveError) as e:
        _call("ppo2")
    assert isinstance(e.value, KeyError) and isinstance(e.value, ValueError)
    assert "ppo2" in str(e.value) and all(n in str(e.value) for n in ALL)
    with pytest.raises(KeyError):
        default_hparams("nope")


def test_unknown_hparam_names_it_and_lists_valid():
    with pytest.raises(UnknownHyperparameterError) as e:
        _call("kl_cov", clip_low=0.2)
    msg = str(e.value)
    assert "clip_low" in msg and "kl_cov" in msg and "cov_ratio" in msg and "kl_cov_coef" in msg and "agg" in msg
    with pytest.raises(UnknownHyperparameterError, match="clip_lo'"):
        _call("grpo", clip_lo=0.2)
    with pytest.raises(UnknownHyperparameterError, match="cliplow"):
        _call("grpo", cliplow=None)  # a typo is an error even with None


@pytest.mark.parametrize(
    "name,hp,words",
    [
        ("grpo", {"agg": "mean"}, ["agg", "token-mean", "seq-mean-token-sum-norm"]),
        ("grpo", {"kl_estimator": "k4"}, ["kl_estimator", "k1", "k3"]),
        ("grpo", {"clip_low": -0.1}, ["clip_low"]),
        ("grpo", {"clip_low": 20}, ["clip_low"]),
        ("grpo", {"clip_high": float("nan")}, ["clip_high"]),
        ("grpo", {"clip_high": "0.2"}, ["clip_high"]),
        ("grpo", {"beta_kl": -1.0}, ["beta_kl"]),
        ("grpo", {"max_len": 0}, ["max_len"]),
        ("grpo", {"max_len": 2.5}, ["max_len"]),
        ("tepo", {"tepo_kl_coef": -0.1}, ["tepo_kl_coef"]),
        ("clip_cov", {"cov_ratio": 0.0}, ["cov_ratio"]),
        ("clip_cov", {"cov_lb": 5.0, "cov_ub": 1.0}, ["cov_lb", "cov_ub"]),
        ("kl_cov", {"kl_cov_coef": True}, ["kl_cov_coef"]),
    ],
)
def test_invalid_hparam_values(name, hp, words):
    with pytest.raises(InvalidHyperparameterError) as e:
        _call(name, **hp)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_shape_mismatches_name_both_tensors():
    with pytest.raises(ShapeMismatchError) as e:
        _call(old_logp=torch.zeros(2, 4))
    assert "old_logp" in str(e.value) and "(2, 4)" in str(e.value) and "logp" in str(e.value) and "(2, 3)" in str(e.value)
    with pytest.raises(ShapeMismatchError, match=r"advantages.*\(3,\).*\(2, 3\)"):
        _call(advantages=torch.zeros(3))
    with pytest.raises(ShapeMismatchError, match=r"mask.*\(3, 2\)"):
        _call(mask=torch.ones(3, 2))
    with pytest.raises(ShapeMismatchError, match=r"entropy.*\(2,\)"):
        _call(entropy=torch.zeros(2))
    with pytest.raises(ShapeMismatchError, match="logp must be"):
        _call(logp=torch.zeros(6))
    with pytest.raises(ShapeMismatchError, match="0 and 1"):
        _call(mask=torch.full((2, 3), 0.5))
    with pytest.raises(ShapeMismatchError, match="floating-point"):
        _call(logp=torch.zeros(2, 3, dtype=torch.long))


def test_missing_tensor_errors_name_option_and_tensor():
    with pytest.raises(MissingInputError) as e:
        _call(beta_kl=0.1)
    assert "beta_kl" in str(e.value) and "ref_logp" in str(e.value)
    with pytest.raises(MissingInputError) as e:
        _call("tepo", tepo_kl_coef=0.1, entropy=torch.zeros(2, 3))
    assert "tepo_kl_coef" in str(e.value) and "old_entropy" in str(e.value)
    with pytest.raises(MissingInputError, match="entropy_coef.*entropy"):
        _call(entropy_coef=0.01)
    # the tensors are only needed when the option is on
    _call("tepo", tepo_kl_coef=0.0)
    _call(beta_kl=0.0)
    assert issubclass(MissingInputError, ObjectiveError) and issubclass(ObjectiveError, ValueError)
