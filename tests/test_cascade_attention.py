"""Cascade attention (tepo.cascade_attention): the attention of rows over their copy's shared prefix
and their own keys equals plain attention over each row's whole sequence (shared prefix expanded,
heads repeated), for any assignment of rows to copies, with padding, and for several queries at once
(causal within the own part)."""

from __future__ import annotations

import pytest
import torch

import tepo.cascade_attention as cascade_attention_module
from tepo.cascade_attention import CascadeLayer, cascade_attention


def plain_attention(query, keys, values, visible):
    """query (B, H, Q, D); keys/values (B, KVH, K, D); visible (B, Q, K) bool -> (B, Q, H, D)."""
    group = query.size(1) // keys.size(1)
    keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    scores = (query @ keys.transpose(-1, -2)) * query.size(-1) ** -0.5
    probs = scores.masked_fill(~visible[:, None], float("-inf")).softmax(-1)
    return (probs @ values).transpose(1, 2)


@pytest.mark.parametrize("copy_of_row", [
    [0, 0, 1, 1, 2, 2],        # sorted, equal counts: the dense view
    [2, 0, 1, 0, 2, 1],        # scattered
    [1, 0, 1, 1, 2, 1],        # unequal counts
    [0, 0, 0, 0, 0, 0],        # one shared prefix for every row (held-out evaluation)
], ids=["dense", "scattered", "unequal", "one-copy"])
@pytest.mark.parametrize("queries", [1, 3])
@pytest.mark.parametrize("blocked", [False, True], ids=["one-block", "query-blocks"])
def test_cascade_equals_plain_attention(copy_of_row, queries, blocked, monkeypatch):
    if blocked:  # scores for 2 queries at most at once: 3 queries are taken in 2 blocks
        monkeypatch.setattr(cascade_attention_module, "SCORE_ELEMENTS", 2 * 6 * 6 * 9)
    g = torch.Generator().manual_seed(0)
    rows, heads, kv_heads, dim, shared, own = len(copy_of_row), 6, 2, 8, 5, 4
    copies = max(copy_of_row) + 1
    copy_of_row = torch.tensor(copy_of_row)
    sk, sv = torch.randn(copies, kv_heads, shared, dim, generator=g), torch.randn(copies, kv_heads, shared, dim, generator=g)
    layer = CascadeLayer(sk, sv, copy_of_row, capacity=2)  # capacity below what is written: the cache grows
    ok, ov = torch.randn(rows, kv_heads, own, dim, generator=g), torch.randn(rows, kv_heads, own, dim, generator=g)
    layer.update(ok[:, :, :own - queries], ov[:, :, :own - queries])
    layer.update(ok[:, :, own - queries:], ov[:, :, own - queries:])
    assert layer.get_seq_length() == shared + own
    query = torch.randn(rows, heads, queries, dim, generator=g)
    mask = torch.ones(rows, shared + own, dtype=torch.long)
    mask[:, 1] = (copy_of_row != 1).long()  # padding inside copy 1's shared part (the same for its rows)
    mask[0, shared] = 0  # padding at the start of row 0's own part
    out, _ = cascade_attention(None, query, layer, layer, mask)
    keys = torch.cat([sk[copy_of_row], ok], dim=2)
    values = torch.cat([sv[copy_of_row], ov], dim=2)
    visible = mask.bool()[:, None, :].expand(rows, queries, shared + own).clone()
    i = torch.arange(queries).view(-1, 1)
    j = torch.arange(own).view(1, -1)
    visible[:, :, shared:] &= j <= own - queries + i
    torch.testing.assert_close(out, plain_attention(query, keys, values, visible), rtol=1e-5, atol=1e-6)


def test_rows_leave_the_batch():
    """Selecting rows (finished rows leave a decoding batch) keeps each remaining row's attention."""
    g = torch.Generator().manual_seed(1)
    copy_of_row = torch.tensor([0, 0, 1, 1])
    sk, sv = torch.randn(2, 1, 3, 4, generator=g), torch.randn(2, 1, 3, 4, generator=g)
    layer = CascadeLayer(sk, sv, copy_of_row, capacity=4)
    ok, ov = torch.randn(4, 1, 2, 4, generator=g), torch.randn(4, 1, 2, 4, generator=g)
    layer.update(ok, ov)
    query = torch.randn(4, 2, 1, 4, generator=g)
    before, _ = cascade_attention(None, query, layer, layer, None)
    keep = torch.tensor([1, 2, 3])
    layer.batch_select_indices(keep)
    after, _ = cascade_attention(None, query[keep], layer, layer, None)
    torch.testing.assert_close(after, before[keep])


def test_a_plain_cache_is_refused():
    with pytest.raises(TypeError, match="CascadeCache"):
        cascade_attention(None, torch.zeros(1, 2, 1, 4), torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 3, 4), None)
