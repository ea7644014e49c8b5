"""Log-probabilities and entropies of the scored positions through the LM head, in whole-vocabulary rows.

TRL's fused LM head (`add_fused_lm_head`, `ChunkedLogProbFunction`) never materialises the logits: it
walks the vocabulary in tiles with an online log-sum-exp, which on a GPU saves memory and on a CPU
costs ~1 s per update micro-batch of the quickstart (16 x 49 scored positions: forward 0.33 s,
backward 0.74 s, for ~0.3 s of matrix products; docs/benchmarks.md, "The shared-prefix path"). Here the
same quantities are computed a block of positions at a time with the whole vocabulary in one product,
and the backward is written out (it keeps each block's log p up to 512 MiB, else recomputes it):

    z = h W^T / T,  log p = z - logsumexp(z),  score = log p[label],  H = -sum_v p_v log p_v
    d score / dz = onehot(label) - p,          dH / dz = -p (log p + H)

Used by the shared-prefix scoring (tepo/shared_prefix.py) on the CPU for fp32 models whose head is a
plain linear map (no bias, no soft-capping or logit scale); anywhere else TRL's head runs. Equal to
TRL's to float32 rounding (tests/test_lm_head_scores.py, and the shared-vs-plain tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.utils import ModelOutput

BLOCK_ELEMENTS = 2 ** 25  # logits per block (128 MiB in fp32): the positions per block are this over the vocabulary
KEEP_ELEMENTS = 2 ** 27  # up to this many logits (512 MiB) the forward keeps log p for the backward


def _blocks(n: int, vocab: int):
    step = max(1, BLOCK_ELEMENTS // max(vocab, 1))
    return [(s, min(s + step, n)) for s in range(0, n, step)]


class TokenScores(torch.autograd.Function):
    """(hidden (N, H), weight (V, H), labels (N,) in [0, V), temperature) -> (log p (N,), entropy (N,))."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, temperature: float):
        inv_t = 1.0 / temperature
        n = hidden.size(0)
        logps, entropy, lse = hidden.new_empty(n), hidden.new_empty(n), hidden.new_empty(n)
        # the backward needs each block's log p again: kept when small, else recomputed there
        keep = torch.is_grad_enabled() and n * weight.size(0) <= KEEP_ELEMENTS
        kept = []
        for start, end in _blocks(n, weight.size(0)):
            z = (hidden[start:end] @ weight.t()).mul_(inv_t)
            top = z.amax(dim=-1, keepdim=True)
            e = (z - top).exp_()
            total = e.sum(-1, keepdim=True)
            lse[start:end] = (top + total.log()).squeeze(1)
            log_p = z.sub_(lse[start:end, None])
            entropy[start:end] = -(e * log_p).sum(-1) / total.squeeze(1)  # (log Z - E_p[z] cancels in fp32)
            logps[start:end] = log_p.gather(1, labels[start:end, None]).squeeze(1)
            if keep:
                kept.append(log_p)
        ctx.save_for_backward(hidden, weight, labels, lse, entropy)
        ctx.kept, ctx.inv_t = kept, inv_t
        ctx.set_materialize_grads(False)
        return logps, entropy

    @staticmethod
    def backward(ctx, grad_logps: Tensor | None, grad_entropy: Tensor | None):
        hidden, weight, labels, lse, entropy = ctx.saved_tensors
        inv_t, kept = ctx.inv_t, ctx.kept
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = None
        if grad_logps is None and grad_entropy is None:
            return grad_hidden, torch.zeros_like(weight) if need_weight else None, None, None
        for i, (start, end) in enumerate(_blocks(hidden.size(0), weight.size(0))):
            h = hidden[start:end]
            log_p = kept[i] if kept else (h @ weight.t()).mul_(inv_t).sub_(lse[start:end, None])
            p = log_p.exp()
            grad_z = None
            if grad_entropy is not None:  # -g p (log p + H)
                grad_z = log_p.add_(entropy[start:end, None]).mul_(p).mul_(-grad_entropy[start:end, None])
            if grad_logps is not None:  # g (onehot - p)
                g = grad_logps[start:end, None]
                grad_z = p.mul_(-g) if grad_z is None else grad_z.sub_(p.mul_(g))
                grad_z.scatter_add_(1, labels[start:end, None], g)
            grad_z.mul_(inv_t)
            if need_hidden:
                grad_hidden[start:end] = grad_z @ weight
            if need_weight:
                grad_weight = grad_z.t() @ h if grad_weight is None else grad_weight.addmm_(grad_z.t(), h)
        ctx.kept = None
        return grad_hidden, grad_weight, None, None


@dataclass
class ScoredTokens(ModelOutput):
    """What TRL's fused head returns and its callers read: the mean negative log-likelihood of the scored
    labels (`loss`), and per position `log_probs` and `entropy` (zero where the label is -100)."""

    loss: Tensor | None = None
    log_probs: Tensor | None = None
    entropy: Tensor | None = None


def token_scores(hidden: Tensor, weight: Tensor, labels: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Log-probability of each label and the entropy at each position under softmax(hidden @ weight.T / T).
    hidden (..., H), labels (...) with -100 where nothing is scored -> two tensors shaped like labels,
    zero where the label is -100 (as TRL's fused head returns them)."""
    shape = labels.shape
    scored = labels != -100
    logps, entropy = TokenScores.apply(hidden.reshape(-1, hidden.size(-1)), weight,
                                       labels.clamp(min=0).reshape(-1), float(temperature))
    return logps.view(shape).masked_fill(~scored, 0), entropy.view(shape).masked_fill(~scored, 0)


def applies(model, hidden_dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `token_scores` computes what TRL's fused head would for `model`: a CPU fp32 model whose
    output embedding is a plain linear map, no logit soft-capping or scale, no autocast."""
    head = model.get_output_embeddings()
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return (
        device.type == "cpu" and hidden_dtype == torch.float32 and isinstance(head, torch.nn.Linear)
        and head.bias is None and head.weight.dtype == torch.float32 and type(head.weight) is torch.nn.Parameter
        and getattr(config, "final_logit_softcapping", None) is None and getattr(config, "logit_scale", None) is None
        and not torch.is_autocast_enabled("cpu")
    )
