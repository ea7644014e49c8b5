"""Cascade attention for decoding: rows that share a prefix read its keys and values once.

When G completions of one prompt are sampled (or 150 held-out prompts that all start with the same
chat template and worked example are decoded), a plain KV cache holds the shared prefix once per
row, and every decoding step copies the whole cache (`DynamicCache` concatenates) and expands its
key/value heads to the query heads (`repeat_kv`): on this project's CPU that memory traffic cost
as much as the model's matrix products (docs/benchmarks.md, "The shared-prefix path").

Here a layer's cache has two parts:
- shared keys/values (C, KVH, S, D), one copy per distinct prefix, and `copy_of_row` (B,);
- each row's own keys/values (B, KVH, capacity, D), written in place (no concatenation).
A query row scores the shared part of its copy and its own part; the two score blocks are joined
before one softmax, so the result is the attention over the row's whole sequence (the same sum as
the plain path, in a different order: equal up to float rounding). The shared products run once per
copy for all its rows and heads of one KV head together (queries reshaped to (C, KVH, rows x heads, D)),
so the shared part is read once per step, never copied or expanded.

Used through Hugging Face's attention interface: `CascadeCache` is an ordinary `Cache` (so
`generate`, its logits processors and its sampling run unchanged), and `cascade_attention_on(model)`
switches the model to the registered attention function while it decodes. The 2D attention mask
`generate` passes is split at S: its first S columns are the shared part (the same for all rows of
a copy), the rest the row's own part. Supported where `shared_prefix.unsupported_reason` is None.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.masking_utils import AttentionMaskInterface

ATTENTION_NAME = "tepo_cascade"


class CascadeLayer(DynamicLayer):
    """One layer of a `CascadeCache`: shared keys/values per copy and each row's own, in place."""

    def __init__(self, keys: Tensor, values: Tensor, copy_of_row: Tensor, capacity: int):
        super().__init__()
        self.shared_keys, self.shared_values = keys, values
        rows, (_, kv_heads, _, head_dim) = copy_of_row.numel(), keys.shape
        self.own_keys = keys.new_empty(rows, kv_heads, capacity, head_dim)
        self.own_values = values.new_empty(rows, kv_heads, capacity, head_dim)
        self.length = 0
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self._set_rows(copy_of_row)

    def _set_rows(self, copy_of_row: Tensor) -> None:
        """Index the rows by copy: `slots` (C, g), the rows of each copy padded with the dummy row B,
        and `slot_of_row` (B,), each row's place in `slots.flatten()`."""
        self.copy_of_row = copy_of_row
        rows, copies = copy_of_row.numel(), self.shared_keys.size(0)
        counts = torch.bincount(copy_of_row, minlength=copies)
        width = max(int(counts.max()), 1)
        order = torch.argsort(copy_of_row, stable=True)
        rank = torch.arange(rows, device=order.device) - (counts.cumsum(0) - counts)[copy_of_row[order]]
        slots = torch.full((copies, width), rows, dtype=torch.long, device=order.device)
        slots[copy_of_row[order], rank] = order
        self.slots = slots
        self.slot_of_row = torch.empty_like(order)
        self.slot_of_row[order] = copy_of_row[order] * width + rank
        # rows already sorted by copy, equal counts: a view instead of a gather
        self.dense = copies * width == rows and bool((slots.flatten() == torch.arange(rows, device=order.device)).all())

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        q = key_states.size(-2)
        if self.length + q > self.own_keys.size(2):  # grow (a call past the planned length still works)
            grow = max(self.own_keys.size(2), q)

            def grown(buffer: Tensor) -> Tensor:
                rows, kv_heads, _, head_dim = buffer.shape
                return torch.cat([buffer, buffer.new_empty(rows, kv_heads, grow, head_dim)], dim=2)

            self.own_keys, self.own_values = grown(self.own_keys), grown(self.own_values)
        self.own_keys[:, :, self.length:self.length + q] = key_states
        self.own_values[:, :, self.length:self.length + q] = value_states
        self.length += q
        return self, self  # the attention function reads both parts from the layer

    def get_seq_length(self) -> int:
        return self.shared_keys.size(2) + self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def batch_select_indices(self, indices: Tensor) -> None:
        def select(buffer: Tensor) -> Tensor:  # only the written positions are copied
            kept = buffer.new_empty(indices.numel(), *buffer.shape[1:])
            kept[:, :, :self.length] = buffer[indices, :, :self.length]
            return kept

        self.own_keys, self.own_values = select(self.own_keys), select(self.own_values)
        self._set_rows(self.copy_of_row[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("CascadeLayer: rows are added by building a new cache with their copy index")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("CascadeLayer: cropping is not supported")

    # grouped products over the shared part -------------------------------------------------------
    def to_slots(self, x: Tensor) -> Tensor:
        """(B, KVH, M, X) per row -> (C, KVH, g*M, X) per copy (dummy rows zero)."""
        rows, kv_heads, m, last = x.shape
        copies, width = self.slots.shape
        if self.dense:
            grouped = x.view(copies, width, kv_heads, m, last)
        else:
            padded = torch.cat([x, x.new_zeros(1, kv_heads, m, last)])
            grouped = padded[self.slots.flatten()].view(copies, width, kv_heads, m, last)
        return grouped.transpose(1, 2).reshape(copies, kv_heads, width * m, last)

    def from_slots(self, y: Tensor, m: int) -> Tensor:
        """(C, KVH, g*M, X) per copy -> (B, KVH, M, X) per row."""
        copies, kv_heads, _, last = y.shape
        width = self.slots.size(1)
        per_slot = y.view(copies, kv_heads, width, m, last).transpose(1, 2).reshape(copies * width, kv_heads, m, last)
        return per_slot if self.dense else per_slot[self.slot_of_row]


class CascadeCache(Cache):
    """A KV cache whose rows share prefixes (module docstring): one `CascadeLayer` per decoder layer."""

    def __init__(self, layers: list[CascadeLayer]):
        super().__init__(layers=layers)

    @classmethod
    def from_prefill(cls, cache, copy_of_row: Tensor, capacity: int) -> "CascadeCache":
        """From a `DynamicCache` of the C distinct prefixes (its tensors are taken, not copied) and each
        row's copy `copy_of_row` (B,); `capacity`: the own positions to reserve per row (the cache grows
        past it if needed)."""
        return cls([CascadeLayer(layer.keys, layer.values, copy_of_row, capacity) for layer in cache.layers])


SCORE_ELEMENTS = 2 ** 25  # attention scores held at once (128 MiB in fp32): longer query blocks are cut


def cascade_attention(module, query: Tensor, key, value, attention_mask: Tensor | None, scaling: float | None = None,
                      dropout: float = 0.0, **kwargs):
    """Attention of `query` (B, H, Q, D) over a `CascadeLayer` (passed as key and value), the Q queries
    being the last Q own positions: each attends to its copy's shared part and causally to its own part.
    `attention_mask` (B, S + own length), 2D, 1 = attend (as `generate` passes it), or None (all).
    Returns (B, Q, H, D) and no weights, as Hugging Face's attention functions do. Many queries at once
    (a prefill) are taken in blocks, so that the scores held at once stay under `SCORE_ELEMENTS`."""
    layer = key
    if not isinstance(layer, CascadeLayer):
        raise TypeError(f"{ATTENTION_NAME} attention needs a CascadeCache (got {type(key).__name__} keys)")
    rows, heads, q, head_dim = query.shape
    width = layer.shared_keys.size(2) + layer.length
    if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.size(-1) < width):
        raise ValueError(f"{ATTENTION_NAME} attention: need a 2D mask of width >= {width}, "
                         f"got shape {tuple(attention_mask.shape)}")
    scale = head_dim ** -0.5 if scaling is None else scaling
    block = max(1, SCORE_ELEMENTS // max(rows * heads * width, 1))
    outs = [_attend(layer, query[:, :, start:start + block], attention_mask, q - start, scale)
            for start in range(0, q, block)]
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2), None


def _attend(layer: CascadeLayer, query: Tensor, attention_mask: Tensor | None, back: int, scale: float) -> Tensor:
    """`query` (B, H, q, D): own positions own - back ... own - back + q - 1. Returns (B, H, q, D)."""
    rows, heads, q, head_dim = query.shape
    kv_heads, shared = layer.shared_keys.size(1), layer.shared_keys.size(2)
    own = layer.length
    group = heads // kv_heads  # query heads h*group ... h*group+group-1 read KV head h (as repeat_kv)
    qg = query.reshape(rows, kv_heads, group * q, head_dim)
    shared_scores = layer.from_slots(layer.to_slots(qg) @ layer.shared_keys.transpose(-1, -2), group * q)
    own_scores = qg @ layer.own_keys[:, :, :own].transpose(-1, -2)
    scores = torch.cat([shared_scores, own_scores], dim=-1).float() * scale  # (B, KVH, group*q, S + own)
    visible = torch.ones(rows, 1, q, shared + own, dtype=torch.bool, device=query.device)
    if attention_mask is not None:
        visible = visible & attention_mask[:, :shared + own].bool().view(rows, 1, 1, -1)
    if back > 1:  # causal within the own part: query i is own position own - back + i
        i = torch.arange(q, device=query.device).view(q, 1)
        j = torch.arange(own, device=query.device).view(1, own)
        visible[..., shared:] &= (j <= own - back + i)
    visible = visible.expand(rows, group, q, shared + own).reshape(rows, 1, group * q, shared + own)
    probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1).to(query.dtype)
    shared_probs, own_probs = probs[..., :shared], probs[..., shared:]
    out = layer.from_slots(layer.to_slots(shared_probs.contiguous()) @ layer.shared_values, group * q)
    out = out + own_probs @ layer.own_values[:, :, :own]
    return out.reshape(rows, heads, q, head_dim)


def _padding_mask(*, attention_mask: Tensor | None = None, **kwargs) -> Tensor | None:
    """The mask `cascade_attention` takes: the 2D padding mask as given (it builds the causal part itself)."""
    return attention_mask


AttentionInterface.register(ATTENTION_NAME, cascade_attention)
AttentionMaskInterface.register(ATTENTION_NAME, _padding_mask)


@contextlib.contextmanager
def cascade_attention_on(model):
    """Run `model` with `cascade_attention` inside the block (its attention implementation restored after)."""
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME
    try:
        yield model
    finally:
        config._attn_implementation = before
