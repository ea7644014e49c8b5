"""tepo.lm_head_scores: log-probs and entropies of softmax(h W^T / T) in whole-vocabulary blocks, with a
written-out backward. Checked against a float64 reference (log_softmax), by finite differences
(gradcheck), across block boundaries, and against TRL's fused head (the shared-vs-plain tests in
test_shared_prefix.py run both heads)."""

from __future__ import annotations

import pytest
import torch

from tepo import lm_head_scores
from tepo.lm_head_scores import ScoredTokens, TokenScores, applies, token_scores


def reference(hidden, weight, labels, temperature):
    log_p = torch.log_softmax(hidden.double() @ weight.double().t() / temperature, dim=-1)
    return log_p.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1), -(log_p.exp() * log_p).sum(-1)


def test_values_match_log_softmax():
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(3, 5, 8, generator=g), torch.randn(40, 8, generator=g)
    labels = torch.randint(0, 40, (3, 5), generator=g)
    labels[0, :2] = -100
    logps, entropy = token_scores(hidden, weight, labels, 0.7)
    want_logps, want_entropy = reference(hidden, weight, labels, 0.7)
    scored = labels != -100
    torch.testing.assert_close(logps[scored].double(), want_logps[scored], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(entropy[scored].double(), want_entropy[scored], rtol=1e-5, atol=1e-6)
    assert (logps[~scored] == 0).all() and (entropy[~scored] == 0).all()


@pytest.mark.parametrize("which", ["both", "logps", "entropy"])
@pytest.mark.parametrize("keep", [True, False], ids=["kept", "recomputed"])
def test_gradients_by_finite_differences(which, keep, monkeypatch):
    monkeypatch.setattr(lm_head_scores, "BLOCK_ELEMENTS", 20)  # 2 positions per block: blocks are crossed
    monkeypatch.setattr(lm_head_scores, "KEEP_ELEMENTS", 2 ** 27 if keep else 0)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 9, (5,), generator=g)

    def f(h, w):
        logps, entropy = TokenScores.apply(h, w, labels, 0.8)
        return {"both": (logps, entropy), "logps": logps, "entropy": entropy}[which]

    assert torch.autograd.gradcheck(f, (hidden, weight))


def test_blocks_do_not_change_the_result(monkeypatch):
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(7, 6, generator=g, requires_grad=True)
    weight = torch.randn(30, 6, generator=g, requires_grad=True)
    labels = torch.randint(0, 30, (7,), generator=g)

    def run():
        hidden.grad = weight.grad = None
        logps, entropy = TokenScores.apply(hidden, weight, labels, 1.0)
        (logps.sum() + 0.5 * entropy.sum()).backward()
        return logps.detach(), entropy.detach(), hidden.grad.clone(), weight.grad.clone()

    whole = run()
    monkeypatch.setattr(lm_head_scores, "BLOCK_ELEMENTS", 60)  # 2 positions per block
    for a, b in zip(whole, run()):
        torch.testing.assert_close(a, b)
    monkeypatch.setattr(lm_head_scores, "KEEP_ELEMENTS", 0)  # the backward recomputes log p
    for a, b in zip(whole, run()):
        torch.testing.assert_close(a, b)


def test_where_it_applies():
    from _tiny_llm import tiny_model, tiny_tokenizer

    model = tiny_model(tiny_tokenizer())
    assert applies(model, torch.float32, torch.device("cpu"))
    assert not applies(model, torch.bfloat16, torch.device("cpu"))
    assert not applies(model, torch.float32, torch.device("meta"))
    model.config.final_logit_softcapping = 30.0
    assert not applies(model, torch.float32, torch.device("cpu"))


def test_the_shared_path_uses_it_when_given_the_temperature():
    from test_shared_prefix import C, ragged_batch, scoring_model

    for own_head in (True, False):
        model, tok = scoring_model("llama", "sdpa", own_head)
        ids, mask, labels = ragged_batch(tok.pad_token_id)
        out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, shared_prefix=C)
        assert isinstance(out, ScoredTokens) == own_head
