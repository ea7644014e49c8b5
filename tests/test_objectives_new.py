"""cispo, sapo, luspo, vespo, gmpo, gpg against docs/objectives.md: worked examples derived here from
the formulas, a float64 reference written with loops (values and analytic gradients, independently of
the library), gradcheck, padding garbage, metrics and hyper-parameter errors.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tepo.objectives import (
    InvalidHyperparameterError,
    UnknownHyperparameterError,
    advantage_scale,
    default_hparams,
    list_objectives,
    policy_loss,
)

NEW_OBJECTIVES = ["cispo", "sapo", "luspo", "vespo", "gmpo", "gpg"]
SHARED = {"agg": "token-mean", "max_len": None, "beta_kl": 0.0, "kl_estimator": "k3", "entropy_coef": 0.0}
# docs/objectives.md's defaults, typed in again (not read from the library)
DOC_DEFAULTS = {
    "cispo": dict(SHARED, clip_low=1.0, clip_high=4.0),
    "sapo": dict(SHARED, agg="seq-mean-token-mean", sapo_temperature_pos=1.0, sapo_temperature_neg=1.05),
    "luspo": dict(SHARED, agg="seq-mean-token-sum", clip_low=3e-4, clip_high=4e-4),
    "vespo": dict(SHARED, vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0),
    "gmpo": dict(SHARED, agg="seq-mean-token-mean", log_clip_low=0.4, log_clip_high=0.4),
    "gpg": dict(SHARED, gpg_alpha_rescale=True),
}
BASE_METRICS = {"clip_frac", "clip_frac_low", "clip_frac_high", "ratio_mean", "ratio_min", "ratio_max", "approx_kl"}
EXTRA_METRICS = {"cispo": set(), "sapo": {"soft_gate_weight_mean"}, "luspo": set(), "vespo": {"phi_mean"},
                 "gmpo": set(), "gpg": {"gpg_alpha"}}


def run(name, logp, old, adv, mask, **kw):
    """policy_loss in float64; returns (output, dloss/dlogp as numpy)."""
    lp = torch.tensor(np.asarray(logp, dtype=np.float64), requires_grad=True)
    extra = {k: torch.as_tensor(np.asarray(v, dtype=np.float64)) if k in ("ref_logp", "entropy") else v
             for k, v in kw.items()}
    out = policy_loss(name, logp=lp, old_logp=torch.tensor(np.asarray(old, dtype=np.float64)),
                      advantages=torch.tensor(np.asarray(adv, dtype=np.float64)),
                      mask=torch.tensor(np.asarray(mask)), **extra)
    out.loss.backward()
    return out, lp.grad.numpy()


def test_registry_has_the_six_with_their_defaults_and_advantage_scales():
    assert set(NEW_OBJECTIVES) <= set(list_objectives())
    for name in NEW_OBJECTIVES:
        assert default_hparams(name) == DOC_DEFAULTS[name], name
        assert advantage_scale(name) == ("none" if name == "gpg" else "group"), name


# ------------------------------------------------------------------------------------------------
# Worked examples (docs/objectives.md): two responses, the second with 2 valid tokens of 3

OLD = [[-1.0, -0.5, -2.0], [-0.7, -1.2, -0.3]]
NEW = [[-0.9, -0.6, -1.5], [-0.8, -1.0, -0.6]]
MASK = [[1, 1, 1], [1, 1, 0]]
ADV = [1.0, -1.0]
# valid tokens and log-ratios d, by hand: row 0: .1, -.1, .5; row 1: -.1, .2
D0, D1 = [0.1, -0.1, 0.5], [-0.1, 0.2]
LP0, LP1 = NEW[0], NEW[1][:2]
N = 5


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def expected_worked(name, **hp):
    """(loss, grad rows) of the worked example, from the formulas of docs/objectives.md."""
    if name == "cispo":
        cap = 1.0 + hp.get("clip_high", 4.0)
        w0, w1 = [min(math.exp(x), cap) for x in D0], [min(math.exp(x), cap) for x in D1]
        loss = (sum(-w * lp for w, lp in zip(w0, LP0)) + sum(w * lp for w, lp in zip(w1, LP1))) / N
        return loss, [[-w / N for w in w0], [w / N for w in w1] + [0.0]]
    if name == "sapo":  # tau 1.0 for A = +1, 1.05 for A = -1
        def row(ds, tau, a):
            s = [sigmoid(tau * (math.exp(x) - 1)) for x in ds]
            value = sum(-v * 4 / tau * a for v in s) / len(ds)
            grad = [-4 * v * (1 - v) * math.exp(x) * a / (2 * len(ds)) for v, x in zip(s, ds)]
            return value, grad
        (v0, g0), (v1, g1) = row(D0, 1.0, 1.0), row(D1, 1.05, -1.0)
        return (v0 + v1) / 2, [g0, g1 + [0.0]]
    if name == "luspo":  # clip 0.2/0.2 here: s_0 = e^(1/6) is clipped at the default 4e-4
        lo, hi = 1 - hp["clip_low"], 1 + hp["clip_high"]
        s0, s1 = math.exp(sum(D0) / 3), math.exp(sum(D1) / 2)
        l0, l1 = max(-s0, -min(max(s0, lo), hi)), max(s1, min(max(s1, lo), hi))
        g0 = 0.0 if s0 > hi else -s0 / 2  # (1/B) * L_i * (-A s_i / L_i)
        g1 = 0.0 if s1 < lo else s1 / 2
        return (3 * l0 + 2 * l1) / 2, [[g0] * 3, [g1, g1, 0.0]]
    if name == "vespo":  # W = e^(sum d); (k, lambda) = (2, 3) for A >= 0, (3, 2) for A < 0
        w0, w1 = math.exp(sum(D0)), math.exp(sum(D1))
        phi0, phi1 = w0 ** 2 * math.exp(3 * (1 - w0)), w1 ** 3 * math.exp(2 * (1 - w1))
        loss = (-phi0 * sum(LP0) + phi1 * sum(LP1)) / N
        return loss, [[-phi0 / N] * 3, [phi1 / N, phi1 / N, 0.0]]
    if name == "gmpo":
        lo, hi = hp.get("log_clip_low", 0.4), hp.get("log_clip_high", 0.4)
        c0 = [min(x, hi) for x in D0]  # A > 0: only the upper bound
        c1 = [max(x, -lo) for x in D1]  # A < 0: only the lower bound
        g0, g1 = math.exp(sum(c0) / 3), math.exp(sum(c1) / 2)
        grad0 = [-g0 / 3 / 2 * (0.0 if x > hi else 1.0) for x in D0]
        grad1 = [g1 / 2 / 2 * (0.0 if x < -lo else 1.0) for x in D1]
        return (-g0 + g1) / 2, [grad0, grad1 + [0.0]]
    raise AssertionError(name)


WORKED = [
    ("cispo", {}, 0.413073), ("cispo", {"clip_high": 0.2}, 0.282737), ("sapo", {}, -0.122433),
    ("luspo", {}, -0.449329), ("luspo", {"clip_low": 0.2, "clip_high": 0.2}, -0.720770),
    ("vespo", {}, -0.160832), ("gmpo", {}, -0.045680), ("gmpo", {"log_clip_low": 0.05, "log_clip_high": 0.05}, 0.038942),
]


@pytest.mark.parametrize("name,hp,doc_loss", WORKED, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(WORKED)])
def test_worked_examples(name, hp, doc_loss):
    out, grad = run(name, NEW, OLD, ADV, MASK, **hp)
    full = dict(DOC_DEFAULTS[name], **hp)
    loss, expected_grad = expected_worked(name, **full)
    assert out.loss.item() == pytest.approx(loss, rel=1e-13, abs=1e-15)
    np.testing.assert_allclose(grad, np.array(expected_grad), rtol=1e-12, atol=1e-15)
    assert loss == pytest.approx(doc_loss, abs=1e-6)  # the figure printed in docs/objectives.md


def test_luspo_default_clip_zeroes_the_clipped_response_and_gmpo_clips_in_log_space():
    out, grad = run("luspo", NEW, OLD, ADV, MASK)
    assert out.metrics["clip_frac_high"] == pytest.approx(3 / 5)  # s_0 = 1.18 > 1.0004, A > 0: 3 tokens
    assert np.all(grad[0] == 0) and np.all(grad[1, :2] > 0)
    out, _ = run("gmpo", NEW, OLD, ADV, MASK)
    assert out.metrics["clip_frac_high"] == pytest.approx(1 / 5)  # d = .5 > .4 at A > 0
    assert out.metrics["clip_frac_low"] == 0.0


def test_gpg_worked_example_with_a_zero_advantage_row():
    # rewards (1, 0) unscaled: A = +-0.5; a third response with A = 0 (two tokens), so alpha = 3/2
    new = NEW + [[-0.5, -0.5, 0.0]]
    old = OLD + [[-0.5, -0.5, 0.0]]
    mask = MASK + [[1, 1, 0]]
    adv = [0.5, -0.5, 0.0]
    raw = (0.5 * (0.9 + 0.6 + 1.5) - 0.5 * (0.8 + 1.0)) / 7  # sum of -A * logp over the 7 tokens / N
    out, grad = run("gpg", new, old, adv, mask)
    assert out.loss.item() == pytest.approx(1.5 * raw, rel=1e-13)
    assert 1.5 * raw == pytest.approx(0.128571, abs=1e-6)
    assert out.metrics["gpg_alpha"] == 1.5
    np.testing.assert_allclose(grad, [[-0.75 / 7] * 3, [0.75 / 7, 0.75 / 7, 0], [0, 0, 0]], rtol=1e-13, atol=1e-16)
    plain, _ = run("gpg", new, old, adv, mask, gpg_alpha_rescale=False)
    assert plain.loss.item() == pytest.approx(raw, rel=1e-13) and plain.metrics["gpg_alpha"] == 1.0


# ------------------------------------------------------------------------------------------------
# Independent float64 reference (numpy, loops): loss and dloss/dlogp


def reference(name, logp, old, adv, mask, ref=None, **given):
    hp = dict(DOC_DEFAULTS[name], **{k: v for k, v in given.items() if v is not None})
    logp, old = np.asarray(logp, dtype=np.float64), np.asarray(old, dtype=np.float64)
    valid = np.asarray(mask) != 0
    B, T = logp.shape
    adv = np.asarray(adv, dtype=np.float64)
    A = np.broadcast_to(adv[:, None], (B, T)) if adv.ndim == 1 else adv
    L = np.maximum(valid.sum(1), 1)
    Ntok = max(1, int(valid.sum()))
    max_len = hp["max_len"] or T
    weight = {"token-mean": lambda i: 1.0 / Ntok, "seq-mean-token-mean": lambda i: 1.0 / (B * L[i]),
              "seq-mean-token-sum": lambda i: 1.0 / B, "seq-mean-token-sum-norm": lambda i: 1.0 / (B * max_len)}[hp["agg"]]
    rows = [[t for t in range(T) if valid[i, t]] for i in range(B)]
    d = logp - old
    dc = np.clip(d, -20.0, 20.0)
    loss, grad = 0.0, np.zeros((B, T))
    low = high = 0  # clipped tokens
    extra = []  # per valid token: soft gate slope (sapo), phi (vespo)

    def ppo(x, a, lo, hi):  # value and d/dx
        if a > 0 and x > 1 + hi:
            return -a * (1 + hi), 0.0
        if a < 0 and x < 1 - lo:
            return -a * (1 - lo), 0.0
        return -a * x, -a

    for i in range(B):
        if name == "gpg" and hp["gpg_alpha_rescale"]:
            n_rows = sum(1 for r in rows if r)
            n_inf = sum(1 for j, r in enumerate(rows) if any(A[j, t] != 0 for t in r))
            alpha = n_rows / max(1, n_inf)
        else:
            alpha = 1.0
        if name in ("luspo", "gmpo"):
            if name == "luspo":
                m = sum(d[i, t] for t in rows[i]) / L[i]
                slope = [1.0 / L[i]] * T
            else:
                lo, hi = hp["log_clip_low"], hp["log_clip_high"]
                c = {t: (min(dc[i, t], hi) if A[i, t] > 0 else max(dc[i, t], -lo)) for t in rows[i]}
                m = sum(c.values()) / L[i]
                passes = {t: 0.0 if (A[i, t] > 0 and dc[i, t] > hi) or (A[i, t] <= 0 and dc[i, t] < -lo)
                          or abs(d[i, t]) > 20 else 1.0 for t in rows[i]}
                slope = [passes.get(t, 0.0) / L[i] for t in range(T)]
            g = math.exp(min(m, 10.0))
            dg = g * (1.0 if m <= 10.0 else 0.0)  # d g / d m
            for t in rows[i]:
                if name == "luspo":
                    value, dvalue = ppo(g, A[i, t], hp["clip_low"], hp["clip_high"])
                    low += A[i, t] < 0 and g < 1 - hp["clip_low"]
                    high += A[i, t] > 0 and g > 1 + hp["clip_high"]
                else:
                    value, dvalue = -A[i, t] * g, -A[i, t]
                    low += A[i, t] < 0 and dc[i, t] < -hp["log_clip_low"]
                    high += A[i, t] > 0 and dc[i, t] > hp["log_clip_high"]
                loss += weight(i) * value
                for s in rows[i]:
                    grad[i, s] += weight(i) * dvalue * dg * slope[s]
            continue
        log_w = min(max(sum(dc[i, t] for t in rows[i]), math.log(1e-8)), 20.0)
        for t in rows[i]:
            a = A[i, t]
            r = math.exp(dc[i, t])
            dr = r if abs(d[i, t]) < 20 else 0.0
            if name == "cispo":
                w = min(max(r, 1 - hp["clip_low"]), 1 + hp["clip_high"])
                value, dvalue = -w * a * logp[i, t], -w * a
                low, high = low + (r < 1 - hp["clip_low"]), high + (r > 1 + hp["clip_high"])
            elif name == "vespo":
                k, lam = ((hp["vespo_k_pos"], hp["vespo_lambda_pos"]) if a >= 0
                          else (hp["vespo_k_neg"], hp["vespo_lambda_neg"]))
                W = math.exp(log_w)
                phi = W ** k * math.exp(lam * (1 - W))
                value, dvalue = -phi * a * logp[i, t], -phi * a
                extra.append(phi)
            elif name == "gpg":
                value, dvalue = -alpha * a * logp[i, t], -alpha * a
            elif name == "sapo":
                tau = hp["sapo_temperature_pos"] if a > 0 else hp["sapo_temperature_neg"]
                s = sigmoid(tau * (r - 1))
                value, dvalue = -s * 4 / tau * a, -4 * s * (1 - s) * dr * a
                extra.append(4 * s * (1 - s))
            else:
                raise AssertionError(name)
            if hp["beta_kl"] > 0:
                u = ref[i, t] - logp[i, t]
                value += hp["beta_kl"] * (math.exp(u) - u - 1)
                dvalue += hp["beta_kl"] * (1 - math.exp(u))
            loss += weight(i) * value
            grad[i, t] += weight(i) * dvalue
    if name in ("luspo", "gmpo") and hp["beta_kl"] > 0:
        for i in range(B):
            for t in rows[i]:
                u = ref[i, t] - logp[i, t]
                loss += weight(i) * hp["beta_kl"] * (math.exp(u) - u - 1)
                grad[i, t] += weight(i) * hp["beta_kl"] * (1 - math.exp(u))
    metrics = {"clip_frac_low": low / Ntok, "clip_frac_high": high / Ntok}
    if extra:
        metrics[{"sapo": "soft_gate_weight_mean", "vespo": "phi_mean"}[name]] = sum(extra) / Ntok
    if name == "gpg":
        metrics["gpg_alpha"] = alpha
    return loss, grad, metrics


def random_inputs(seed, B=4, T=7, sigma=0.3, per_token_adv=False):
    rng = np.random.default_rng(seed)
    old = -rng.exponential(1.0, size=(B, T))
    logp = old + rng.normal(0, sigma, size=(B, T))
    ref = old + rng.normal(0, 0.2, size=(B, T))
    lengths = rng.integers(1, T + 1, size=B)
    lengths[1] = 0  # an empty row
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int64)
    adv = rng.normal(size=(B, T) if per_token_adv else (B,))
    adv[2] = 0.0  # a zero advantage (a whole row of them for token advantages)
    return dict(logp=logp, old=old, adv=adv, mask=mask, ref=ref)


RANDOM_HP = {
    "cispo": [{}, {"clip_low": 0.2, "clip_high": 0.1}, {"agg": "seq-mean-token-mean", "beta_kl": 0.1}],
    "sapo": [{}, {"sapo_temperature_pos": 3.0, "sapo_temperature_neg": 0.5}, {"agg": "token-mean", "beta_kl": 0.1}],
    "luspo": [{"clip_low": 0.1, "clip_high": 0.1}, {}, {"agg": "seq-mean-token-mean", "beta_kl": 0.1}],
    "vespo": [{}, {"vespo_k_pos": 0.0, "vespo_lambda_pos": 0.5, "vespo_k_neg": 5.0, "vespo_lambda_neg": 4.0},
              {"agg": "seq-mean-token-sum", "beta_kl": 0.1}],
    "gmpo": [{}, {"log_clip_low": 0.1, "log_clip_high": 0.05}, {"agg": "token-mean", "beta_kl": 0.1}],
    "gpg": [{}, {"gpg_alpha_rescale": False}, {"agg": "seq-mean-token-sum-norm", "max_len": 9, "beta_kl": 0.1}],
}
RANDOM_CASES = [(n, i, hp, per_token) for n, hps in RANDOM_HP.items() for i, hp in enumerate(hps)
                for per_token in (False, True)]


@pytest.mark.parametrize("name,_i,hp,per_token", RANDOM_CASES,
                         ids=[f"{n}-{i}-{'tok' if p else 'seq'}" for n, i, _, p in RANDOM_CASES])
def test_matches_float64_reference(name, _i, hp, per_token):
    for seed in range(3):
        x = random_inputs(seed, sigma=0.4, per_token_adv=per_token)
        out, grad = run(name, x["logp"], x["old"], x["adv"], x["mask"], ref_logp=x["ref"], **hp)
        ref_loss, ref_grad, ref_metrics = reference(name, x["logp"], x["old"], x["adv"], x["mask"], ref=x["ref"], **hp)
        assert out.loss.item() == pytest.approx(ref_loss, rel=1e-12, abs=1e-14)
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-11, atol=1e-14)
        assert {k: out.metrics[k] for k in ref_metrics} == pytest.approx(ref_metrics, rel=1e-12, abs=1e-15)


def test_reference_cases_exercise_the_clips():
    x = random_inputs(0, sigma=0.4)
    flags = {n: run(n, x["logp"], x["old"], x["adv"], x["mask"], **RANDOM_HP[n][1])[0].metrics["clip_frac"]
             for n in ("cispo", "luspo", "gmpo")}
    assert all(0 < f < 1 for f in flags.values()), flags


# ------------------------------------------------------------------------------------------------
# Finite differences


def test_gradcheck():
    x = random_inputs(3, sigma=0.3)
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in x.items() if k != "mask"}
    mask = torch.tensor(x["mask"])
    ent = torch.rand(t["logp"].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for name, hp in [("sapo", {"beta_kl": 0.1}), ("luspo", {"clip_low": 0.3, "clip_high": 0.3}),
                     ("gmpo", {"beta_kl": 0.1}), ("gpg", {"beta_kl": 0.2}), ("cispo", {"clip_high": 0.1}),
                     ("vespo", {"beta_kl": 0.1})]:
        x0 = t["logp"].clone()

        def f(lp, e, name=name, hp=hp, x0=x0):
            # cispo and vespo weight logp by a detached sg(w(d)): their gradient is that of the loss with
            # the weight frozen at its value, so old_logp moves with logp here (d, hence w, stays put in
            # the finite differences; old_logp is detached, so autograd never sees this)
            old = t["old"] + (lp - x0) if name in ("cispo", "vespo") else t["old"]
            return policy_loss(name, logp=lp, old_logp=old, advantages=t["adv"], mask=mask, ref_logp=t["ref"],
                               entropy=e, entropy_coef=0.01, **hp).loss

        inputs = (t["logp"].clone().requires_grad_(True), ent.clone().requires_grad_(True))
        assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5), name


def test_stop_gradient_weights_are_not_differentiated():
    # without freezing, finite differences of cispo's value include dw/dlogp: the two must differ
    x = random_inputs(3, sigma=0.3)
    out, grad = run("cispo", x["logp"], x["old"], x["adv"], x["mask"])
    lp = torch.tensor(x["logp"], requires_grad=True)
    value = policy_loss("cispo", logp=lp, old_logp=torch.tensor(x["old"]), advantages=torch.tensor(x["adv"]),
                        mask=torch.tensor(x["mask"])).loss
    full = torch.autograd.functional.jacobian(
        lambda z: -(torch.exp(z - torch.tensor(x["old"])).clamp(0, 5) * torch.tensor(x["adv"])[:, None] * z
                    * torch.tensor(x["mask"])).sum() / int(x["mask"].sum()), lp.detach())
    assert value.item() == pytest.approx(out.loss.item())
    assert np.abs(full.numpy() - grad).max() > 1e-3


# ------------------------------------------------------------------------------------------------
# On-policy: every one reduces to a known policy gradient (no hard-coded figure)


@pytest.mark.parametrize("name,like,factor", [
    ("cispo", "dapo", None), ("vespo", "dapo", None), ("sapo", "grpo", None), ("gmpo", "grpo", None),
    ("luspo", "grpo", "length"), ("gpg", "dapo", None),
])
def test_on_policy_gradient(name, like, factor):
    x = random_inputs(5)
    _, g = run(name, x["logp"], x["logp"], x["adv"], x["mask"], **({"gpg_alpha_rescale": False} if name == "gpg" else {}))
    _, g_like = run(like, x["logp"], x["logp"], x["adv"], x["mask"])
    if factor == "length":  # LUSPO = GRPO's gradient times each response's length
        g_like = g_like * np.maximum(np.asarray(x["mask"]).sum(1), 1)[:, None]
    np.testing.assert_allclose(g, g_like, rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------------------------------------
# Padding garbage, metrics


@pytest.mark.parametrize("name", NEW_OBJECTIVES)
@pytest.mark.parametrize("per_token", [False, True])
def test_padding_garbage_changes_nothing(name, per_token):
    x = random_inputs(2, per_token_adv=per_token)
    pad = np.asarray(x["mask"]) == 0
    dirty = dict(x)
    for k, junk in (("logp", np.nan), ("old", np.inf), ("ref", -np.inf)):
        dirty[k] = np.where(pad, junk, x[k])
    if per_token:
        dirty["adv"] = np.where(pad, np.nan, x["adv"])
    ent = np.full(pad.shape, 0.5)
    kw = dict(beta_kl=0.05, entropy_coef=0.01)
    clean, g_clean = run(name, x["logp"], x["old"], x["adv"], x["mask"], ref_logp=x["ref"], entropy=ent, **kw)
    messy, g_messy = run(name, dirty["logp"], dirty["old"], dirty["adv"], x["mask"], ref_logp=dirty["ref"],
                         entropy=np.where(pad, np.nan, ent), **kw)
    assert messy.loss.item() == clean.loss.item()
    np.testing.assert_array_equal(g_messy, g_clean)
    assert np.all(g_messy[pad] == 0)
    assert messy.metrics == clean.metrics


@pytest.mark.parametrize("name", NEW_OBJECTIVES)
def test_metrics_are_sane(name):
    x = random_inputs(4, sigma=0.4)
    out, _ = run(name, x["logp"], x["old"], x["adv"], x["mask"])
    m = out.metrics
    assert set(m) == BASE_METRICS | EXTRA_METRICS[name]
    assert all(math.isfinite(v) for v in m.values())
    assert 0 <= m["clip_frac_low"] <= 1 and 0 <= m["clip_frac_high"] <= 1
    assert m["clip_frac"] == pytest.approx(m["clip_frac_low"] + m["clip_frac_high"]) and m["clip_frac"] <= 1
    assert 0 < m["ratio_min"] <= m["ratio_mean"] <= m["ratio_max"]
    assert m["approx_kl"] >= 0
    if name in ("sapo", "gpg", "vespo"):
        assert m["clip_frac"] == 0.0  # nothing is clipped
    # on policy: ratios 1, nothing clipped, the gate and phi at 1
    on, _ = run(name, x["logp"], x["logp"], x["adv"], x["mask"])
    assert on.metrics["ratio_min"] == on.metrics["ratio_max"] == 1.0 and on.metrics["clip_frac"] == 0.0
    assert on.metrics["approx_kl"] == 0.0
    if name == "sapo":
        assert 0 < m["soft_gate_weight_mean"] < 1 and on.metrics["soft_gate_weight_mean"] == 1.0
    if name == "vespo":
        assert m["phi_mean"] > 0 and on.metrics["phi_mean"] == 1.0
    if name == "gpg":  # 3 rows with tokens, one of them with A = 0
        assert m["gpg_alpha"] == pytest.approx(3 / 2)


def test_vespo_weight_is_the_sequence_likelihood_ratio_not_its_geometric_mean():
    x = random_inputs(6, sigma=0.2)
    out, _ = run("vespo", x["logp"], x["old"], x["adv"], x["mask"])
    d = (np.asarray(x["logp"]) - x["old"]) * x["mask"]
    valid_rows = np.asarray(x["mask"]).sum(1) > 0
    w = np.exp(d.sum(1))
    assert out.metrics["ratio_max"] == pytest.approx(w[valid_rows].max(), rel=1e-12)
    assert out.metrics["ratio_min"] == pytest.approx(w[valid_rows].min(), rel=1e-12)


def test_empty_mask_gives_zero_loss():
    z = np.zeros((2, 3))
    for name in NEW_OBJECTIVES:
        out, g = run(name, z - 1, z - 1.5, [1.0, -1.0], np.zeros((2, 3), dtype=np.int64))
        assert out.loss.item() == 0.0 and np.all(g == 0), name


# ------------------------------------------------------------------------------------------------
# Hyper-parameter errors


@pytest.mark.parametrize("name,hp,words", [
    ("sapo", {"sapo_temperature_pos": 0.0}, "sapo_temperature_pos must be > 0"),
    ("sapo", {"sapo_temperature_neg": -1.0}, "sapo_temperature_neg must be > 0"),
    ("sapo", {"sapo_temperature_pos": float("nan")}, "must be finite"),
    ("sapo", {"sapo_temperature_pos": True}, "must be a real number"),
    ("vespo", {"vespo_lambda_pos": 0.0}, "vespo_lambda_pos must be > 0"),
    ("vespo", {"vespo_lambda_neg": -2.0}, "vespo_lambda_neg must be > 0"),
    ("vespo", {"vespo_k_pos": -1.0}, "vespo_k_pos must be >= 0"),
    ("vespo", {"vespo_k_neg": "3"}, "must be a real number"),
    ("gmpo", {"log_clip_low": -0.1}, "log_clip_low must be >= 0"),
    ("gmpo", {"log_clip_high": float("inf")}, "must be finite"),
    ("gpg", {"gpg_alpha_rescale": 1}, "gpg_alpha_rescale must be True or False"),
    ("cispo", {"clip_low": 1.5}, "clip_low must be in [0, 1]"),
    ("cispo", {"clip_high": -0.1}, "clip_high must be >= 0"),
])
def test_invalid_hyperparameters(name, hp, words):
    z = torch.zeros(1, 2)
    with pytest.raises(InvalidHyperparameterError, match=words.replace("[", r"\[")):
        policy_loss(name, logp=z, old_logp=z, advantages=torch.zeros(1), mask=torch.ones(1, 2), **hp)


@pytest.mark.parametrize("name,hp", [
    ("gmpo", {"clip_low": 0.2}), ("sapo", {"clip_high": 0.2}), ("vespo", {"clip_low": 0.2}),
    ("gpg", {"clip_high": 0.2}), ("cispo", {"sapo_temperature_pos": 1.0}), ("luspo", {"log_clip_low": 0.4}),
])
def test_hyperparameters_of_other_objectives_are_refused(name, hp):
    z = torch.zeros(1, 2)
    with pytest.raises(UnknownHyperparameterError, match=f"objective '{name}' has no hyper-parameter"):
        policy_loss(name, logp=z, old_logp=z, advantages=torch.zeros(1), mask=torch.ones(1, 2), **hp)


# ------------------------------------------------------------------------------------------------
# TEPOConfig: the new hyper-parameters as fields (TRL's names for sapo_/vespo_)


def _config(tmp_path, **fields_):
    from tepo.training import TEPOConfig

    return TEPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=8,
                      num_generations=4, max_completion_length=8, **fields_)


def test_config_fields_reach_the_objective(tmp_path):
    hp = _config(tmp_path, objective="sapo", sapo_temperature_neg=2.0).resolved_hparams()
    assert (hp["sapo_temperature_pos"], hp["sapo_temperature_neg"]) == (1.0, 2.0)
    hp = _config(tmp_path, objective="gmpo", log_clip_high=0.3).resolved_hparams()
    assert (hp["log_clip_low"], hp["log_clip_high"]) == (0.4, 0.3)
    with pytest.raises(ValueError, match="sapo_temperature_neg=2.0 is not a hyper-parameter of objective 'gmpo'"):
        _config(tmp_path, objective="gmpo", sapo_temperature_neg=2.0)
    with pytest.raises(ValueError, match="objective 'vespo': hyper-parameter vespo_lambda_neg must be > 0"):
        _config(tmp_path, objective="vespo", vespo_lambda_neg=0.0)
    with pytest.raises(ValueError, match=r"loss_type='sapo'.*set --objective \(.*cispo.*gmpo.*gpg.*luspo.*sapo.*vespo\) instead"):
        _config(tmp_path, objective="sapo", loss_type="sapo")
    with pytest.warns(UserWarning, match="gpg's alpha .* within each micro-batch"):
        _config(tmp_path, objective="gpg", gradient_accumulation_steps=2)


def test_train_cli_parses_the_new_fields(tmp_path):
    from tepo.training.cli import parse

    _, config = parse(["--task", "arithmetic", "--objective", "gpg", "--gpg_alpha_rescale", "false",
                       "--output_dir", str(tmp_path)])
    assert config.gpg_alpha_rescale is False and config.resolved_hparams()["gpg_alpha_rescale"] is False
    _, config = parse(["--task", "arithmetic", "--objective", "vespo", "--vespo_k_pos", "1.5",
                       "--output_dir", str(tmp_path)])
    assert config.resolved_hparams()["vespo_k_pos"] == 1.5
