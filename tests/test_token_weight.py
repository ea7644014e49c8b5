"""policy_loss's token_weight: a detached per-token weight on the policy term only (not on the KL to
the reference, not on TEPO's KL-mask term, not on the entropy bonus); padding values are ignored."""

import pytest
import torch

from tepo.objectives import ShapeMismatchError, policy_loss


def _batch():
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(3, 4, generator=g, dtype=torch.float64)).requires_grad_()
    old = logp.detach() + 0.05 * torch.randn(3, 4, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float64)
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    return logp, old, mask, adv


@pytest.mark.parametrize("objective", ["grpo", "dapo", "gspo", "tepo"])
def test_weight_scales_the_policy_term_token_by_token(objective):
    logp, old, mask, adv = _batch()
    w = torch.tensor([[0.5, 1.0, 0.0, 7.0], [2.0, 1.0, 9.0, 9.0], [1.0, 1.0, 0.25, 1.0]], dtype=torch.float64)
    ref = old - 0.1
    weighted = policy_loss(objective, logp=logp, old_logp=old, advantages=adv, mask=mask, ref_logp=ref,
                           beta_kl=0.3, token_weight=w)
    # By hand: the per-token policy loss times w, plus the unweighted KL, aggregated as the objective does.
    # With every weight 1 the loss is the unweighted one; the weighted one differs exactly by the
    # aggregation of (w - 1) * l, which we get from a call without KL.
    plain = policy_loss(objective, logp=logp, old_logp=old, advantages=adv, mask=mask, ref_logp=ref, beta_kl=0.3)
    ones = policy_loss(objective, logp=logp, old_logp=old, advantages=adv, mask=mask, ref_logp=ref,
                       beta_kl=0.3, token_weight=torch.ones(3, 4, dtype=torch.float64))
    assert ones.loss.item() == plain.loss.item()
    no_kl_w = policy_loss(objective, logp=logp, old_logp=old, advantages=adv, mask=mask, token_weight=w)
    no_kl = policy_loss(objective, logp=logp, old_logp=old, advantages=adv, mask=mask)
    assert weighted.loss.item() == pytest.approx(plain.loss.item() - no_kl.loss.item() + no_kl_w.loss.item(), abs=1e-14)
    assert weighted.loss.item() != pytest.approx(plain.loss.item())


def test_weight_by_hand_dapo_on_policy():
    # On-policy, unclipped: l = -A * r with r = 1, so the dapo loss is -sum(w * A * mask) / N.
    logp = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.float64)
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    w = torch.tensor([[0.5, 0.0, float("nan")], [1.0, 2.0, 0.25]], dtype=torch.float64)
    out = policy_loss("dapo", logp=logp, old_logp=logp.detach(), advantages=adv, mask=mask, token_weight=w)
    expected = -(1.0 * 0.5 + 0.0 - 2.0 * (1.0 + 2.0 + 0.25)) / 5
    assert out.loss.item() == pytest.approx(expected, abs=1e-15)
    out.loss.backward()
    # d loss / d logp = -A * w / N at unclipped tokens; 0 at padding despite the NaN weight there
    assert torch.allclose(logp.grad, torch.tensor([[-0.1, 0.0, 0.0], [0.4, 0.8, 0.1]], dtype=torch.float64))


def test_weight_must_have_the_shape_of_logp():
    logp, old, mask, adv = _batch()
    with pytest.raises(ShapeMismatchError, match="token_weight"):
        policy_loss("grpo", logp=logp, old_logp=old, advantages=adv, mask=mask, token_weight=torch.ones(3))

