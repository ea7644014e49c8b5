"""Shared prefixes: each distinct prompt of a batch forwarded once, its completions attending to it.

In RL on verifiable rewards every prompt is sampled G times, so in a batch of B = U x G rows a plain
forward computes each prompt G times (and on the CPU, TRL's fused LM head projects every prompt
position through the vocabulary too). Here the distinct prompts go through the model once, with a
KV cache (with gradient when training); the cache is indexed out to the B rows; and each row's
completion is forwarded against its own prompt's cache. A completion therefore attends causally to
itself and to its prompt, never to a sibling (each row is its own batch row), every token keeps its
distance to every other token of its row, and the per-token log-probs, entropies and parameter
gradients are those of the plain path up to float32 rounding (different summation order in
attention). Prefix Grouper (arXiv 2506.05433) is the same idea with a packed row and a custom mask;
the cache form needs no model-specific mask and works with any decoder that takes a `DynamicCache`
(tests: Llama and Qwen2). docs/benchmarks.md, "Shared prefix", has the measurements.

Two uses, one rule ("rows with the same prompt ids and mask share one forward of the prompt"):
- `add_shared_prefix_forward(model, temperature)`: after TRL's `add_fused_lm_head`, a call
  ``model(input_ids, attention_mask, labels=..., fused_lm_head=True, shared_prefix=C)`` computes the
  last C positions' log-probs/entropies this way, inside one forward of the model (so a DDP wrapper
  sees one forward and one backward). The prompts' common prefix (the chat template and worked
  example every prompt starts with) is forwarded once for all distinct prompts where positions are
  relative (rotary embeddings); the scored positions go through `tepo.lm_head_scores` where it
  applies (CPU, fp32), else through TRL's fused head.
- `generate_shared_prefix(model, input_ids, attention_mask, **generate_kwargs)` (rollouts, through
  Hugging Face `generate`) and `decode_shared_prefix` (held-out evaluation): the prompts prefilled
  once each (and their common prefix once), kept once in a `CascadeCache` and read by cascade
  attention (tepo/cascade_attention.py) while decoding, never copied per row.

`unsupported_reason(model, ...)` says when neither applies (the caller logs it once and takes the
plain path).
"""

from __future__ import annotations

import functools
import types

import torch
from torch import Tensor

from tepo import lm_head_scores
from tepo.cascade_attention import CascadeCache, cascade_attention_on

SUPPORTED_ATTENTION = ("eager", "sdpa")


def prompt_groups(prompt_ids: Tensor, prompt_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Rows with the same prompt: (first (U,), inverse (B,)) with row `first[u]` a row of group u and
    `inverse[b]` the group of row b, so that `x[first][inverse]` gives each row its group's copy.

    Two rows are one group when their prompt ids and prompt mask are equal (B, P), padding included:
    then their prompt forwards are the same computation."""
    key = torch.cat([prompt_ids, prompt_mask.to(prompt_ids.dtype)], dim=1)
    _, inverse = torch.unique(key, dim=0, return_inverse=True)
    rows = torch.arange(key.size(0), device=key.device)
    first = torch.full((int(inverse.max()) + 1,), key.size(0), dtype=torch.long, device=key.device)
    first = first.scatter_reduce(0, inverse, rows, reduce="amin")
    return first, inverse


def unsupported_reason(model, *, gradient_checkpointing: bool = False) -> str | None:
    """Why the shared-prefix path cannot run on `model`, or None when it can."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return "the model is not a decoder-only transformers model"
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text is not config:
        return f"{type(model).__name__} is a multimodal model (its prompts carry non-text inputs)"
    attention = getattr(config, "_attn_implementation", None) or "eager"
    if attention not in SUPPORTED_ATTENTION:
        return f"attention implementation {attention!r} (supported: {', '.join(SUPPORTED_ATTENTION)})"
    layer_types = getattr(config, "layer_types", None) or ()
    if any(t != "full_attention" for t in layer_types) or getattr(config, "use_sliding_window", False):
        return "the model has sliding-window or non-attention layers (their caches are not plain key/value rows)"
    if not callable(getattr(model, "get_decoder", None)) and getattr(model, "base_model", model) is model:
        return f"{type(model).__name__} exposes no decoder to prefill"
    if gradient_checkpointing:
        return "gradient checkpointing is on (transformers drops the KV cache inside checkpointed layers)"
    return None


def _new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _select_rows(cache, index: Tensor) -> None:
    """Index every layer of `cache` by rows (differentiable: gradients of a shared prompt add up)."""
    for layer in cache.layers:
        layer.batch_select_indices(index)


def _prefill(model, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None):
    """The KV cache of `input_ids` (B, L) under `model`'s decoder (no LM head)."""
    cache = _new_cache(model)
    model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        past_key_values=cache, use_cache=True,
    )
    return cache


# ------------------------------------------------------------------------------------------------
# the sharing plan: which rows share a prompt, the prompts' common prefix, its layout and cache


def _sharing_plan(input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor, int]:
    """(first, inverse, k): the rows' prompt groups (`prompt_groups`) and their common prefix length."""
    first, inverse = prompt_groups(input_ids, attention_mask)
    return first, inverse, _common_prefix_length(input_ids, attention_mask)


def _common_prefix_length(input_ids: Tensor, attention_mask: Tensor) -> int:
    """Tokens every row starts with (after its left padding), at most the shortest prompt minus one."""
    lengths = attention_mask.sum(dim=1)
    shortest = int(lengths.min())
    if shortest < 2 or not bool((attention_mask.flip(1).cumprod(1).sum(1) == lengths).all()):
        return 0  # not left-padded rows: no claim about their starts
    width = input_ids.size(1)
    starts = width - lengths
    offsets = torch.arange(shortest - 1, device=input_ids.device)
    tokens = input_ids.gather(1, (starts.unsqueeze(1) + offsets).clamp(max=width - 1))
    same = (tokens == tokens[:1]).all(dim=0)
    return int(same.long().cumprod(0).sum())


def _to_prefix_layout(input_ids: Tensor, attention_mask: Tensor, k: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-padded rows (B, P) re-laid as [common prefix (k) | padding | rest of the prompt], same width:
    the common prefix then sits in the same columns of every row, and positions counted from the
    attention mask (as `generate` counts them) are unchanged."""
    width = input_ids.size(1)
    lengths = attention_mask.sum(dim=1)
    starts = width - lengths
    cols = torch.arange(width, device=input_ids.device).unsqueeze(0)
    # column c of the new row takes: c < k -> start + c; c >= width - (len - k) -> c; else padding
    rest_from = width - (lengths - k)
    source = torch.where(cols < k, starts.unsqueeze(1) + cols, cols)
    keep = (cols < k) | (cols >= rest_from.unsqueeze(1))
    ids = torch.where(keep, input_ids.gather(1, source.clamp(max=width - 1)), torch.full_like(input_ids, pad_id))
    return ids, keep.to(attention_mask.dtype)


def _relative_positions(model) -> bool:
    """Rotary position embeddings: attention depends on positions only through their differences, so
    a left-padded row and the same tokens without the padding score alike (up to rounding). Not the
    rope types whose frequencies depend on the longest position seen ("dynamic", "longrope")."""
    if getattr(model.base_model, "rotary_emb", None) is None:
        return False
    rope = getattr(model.config, "rope_parameters", None) or getattr(model.config, "rope_scaling", None) or {}
    kinds = [rope] if "rope_type" in rope or "type" in rope else [v for v in rope.values() if isinstance(v, dict)]
    return not any(k.get("rope_type", k.get("type")) in ("dynamic", "longrope") for k in kinds)


def _positions(mask: Tensor) -> Tensor:
    """Positions counted from the attention mask (`generate`'s rule): each row's tokens 0, 1, ..."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def _prompt_cache(model, ids: Tensor, mask: Tensor, positions: Tensor, k: int):
    """The KV cache of distinct prompts (U, P) laid out as [common prefix (k) | padding | rest], all
    columns but the last: the common prefix forwarded once (k >= 2) and indexed out to the U rows,
    then each prompt's remainder. With gradient when grad is enabled (the shared prefix's gradients
    add up over its rows through the indexing)."""
    width = ids.size(1)
    if k < 2:
        return _prefill(model, ids[:, :-1], mask[:, :-1], positions[:, :-1])
    cache = _prefill(model, ids[:1, :k], mask[:1, :k], positions[:1, :k])
    _select_rows(cache, torch.zeros(ids.size(0), dtype=torch.long, device=ids.device))
    if width - 1 > k:
        model.base_model(input_ids=ids[:, k:-1], attention_mask=mask[:, :-1], position_ids=positions[:, k:-1],
                         past_key_values=cache, use_cache=True)
    return cache


# ------------------------------------------------------------------------------------------------
# scoring (training pass, pi_old pass, reference pass)


def add_shared_prefix_forward(model, temperature: float | None = None) -> None:
    """Let `model(..., fused_lm_head=True, shared_prefix=C)` score the last C tokens of each row with
    each distinct prompt forwarded once. Call after TRL's `add_fused_lm_head`; without `shared_prefix`
    the forward is the one it wraps. `temperature`: the one given to `add_fused_lm_head`; with it, the
    scored positions go through `tepo.lm_head_scores` where that applies (CPU, fp32), else through
    TRL's head. Idempotent."""
    if getattr(model.forward, "_tepo_shared_prefix", False):
        return
    # TRL's fused LM head around the model's own forward, as a function: bound to `self` at each call,
    # so that a deep copy of the model runs on the copy's weights
    inner = getattr(model.forward, "__func__", None)
    if inner is None:
        raise TypeError(f"{type(model).__name__}.forward is not a method: cannot wrap it")

    @functools.wraps(type(model).forward)  # keep the signature: generate validates kwargs against it
    def forward(self, *args, shared_prefix: int | None = None, **kwargs):
        fused_forward = types.MethodType(inner, self)
        if shared_prefix is None:
            return fused_forward(*args, **kwargs)
        return _score_completions(self, fused_forward, completion_length=int(shared_prefix), temperature=temperature,
                                  **kwargs)

    forward._tepo_shared_prefix = True
    model.forward = types.MethodType(forward, model)


def _score_completions(model, fused_forward, *, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                       completion_length: int, temperature: float | None = None, **kwargs):
    """TRL's fused-LM-head output for the last `completion_length` labels of each row (B, C), the
    prompt part (B, T - C) forwarded once per distinct prompt, and the prompts' common prefix (the
    chat template and worked example) once for all of them where positions are relative (`_prompt_cache`).

    The prompt pass covers all prompt columns but the last; the row pass then runs
    [last prompt token, completion[:-1]] (C tokens) against the indexed cache, so its C hidden
    states predict exactly the C completion tokens (`shift_labels`)."""
    C = completion_length
    prompt_ids, prompt_mask = input_ids[:, :-C], attention_mask[:, :-C]
    if C < 1 or prompt_ids.size(1) < 2:
        return fused_forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
    first, inverse, k = _sharing_plan(prompt_ids, prompt_mask)
    if k >= 2 and _relative_positions(model):
        ids, mask = _to_prefix_layout(prompt_ids, prompt_mask, k, 0)
        positions = _positions(mask)
    else:  # whole prompts only, at the positions the plain row gives them (its column index)
        ids, mask, k = prompt_ids, prompt_mask, 0
        positions = torch.arange(ids.size(1), device=ids.device).expand_as(ids)
    cache = _prompt_cache(model, ids[first], mask[first], positions[first], k)
    _select_rows(cache, inverse)
    rows = torch.cat([ids[:, -1:], input_ids[:, -C:-1]], dim=1)
    return _score_rows(
        model, fused_forward, temperature, input_ids=rows, attention_mask=torch.cat([mask, attention_mask[:, -C:-1]], dim=1),
        position_ids=positions[:, -1:] + torch.arange(C, device=ids.device), past_key_values=cache,
        shift_labels=labels[:, -C:], **kwargs,
    )


def _score_rows(model, fused_forward, temperature: float | None, *, shift_labels: Tensor, fused_lm_head: bool = True,
                **inputs):
    """The rows' hidden states through the LM head at the `shift_labels` positions: `tepo.lm_head_scores`
    where it applies and nothing else is asked of the call, TRL's fused head otherwise."""
    weight = model.get_input_embeddings().weight
    if (temperature is None or set(inputs) - _ROW_INPUTS or getattr(model.config, "output_router_logits", False)
            or not lm_head_scores.applies(model, weight.dtype, weight.device)):
        return fused_forward(shift_labels=shift_labels, fused_lm_head=fused_lm_head, **inputs)
    hidden = model.base_model(**inputs, use_cache=False).last_hidden_state
    log_probs, entropy = lm_head_scores.token_scores(hidden, model.get_output_embeddings().weight, shift_labels,
                                                     temperature)
    scored = shift_labels != -100
    return lm_head_scores.ScoredTokens(loss=-log_probs.sum() / scored.sum().clamp(min=1), log_probs=log_probs,
                                       entropy=entropy)


_ROW_INPUTS = {"input_ids", "attention_mask", "position_ids", "past_key_values"}


# ------------------------------------------------------------------------------------------------
# generation


def add_shared_prefix_generate(model) -> None:
    """Make `model.generate(input_ids=, attention_mask=, ...)` prefill through `generate_shared_prefix`
    where it can (left-padded token prompts, one sequence per row, tensor output); any other call
    goes to the model's own `generate` unchanged. Idempotent."""
    if getattr(model.generate, "_tepo_shared_prefix", False):
        return
    inner = model.generate.__func__  # bound to `self` at each call: a deep copy generates with its own weights

    @functools.wraps(inner)
    def generate(self, *args, **kwargs):
        plain_generate = types.MethodType(inner, self)
        config = kwargs.get("generation_config") or self.generation_config
        def setting(name, default):  # transformers 5 leaves unset generation settings None
            value = kwargs.get(name, getattr(config, name, None))
            return default if value is None else value

        plain = (
            args or kwargs.get("input_ids") is None or kwargs.get("attention_mask") is None
            or kwargs.get("past_key_values") is not None
            or any(isinstance(v, Tensor) for k, v in kwargs.items() if k not in ("input_ids", "attention_mask"))
            or setting("return_dict_in_generate", False)
            or setting("num_beams", 1) != 1
            or setting("num_return_sequences", 1) != 1
            or setting("cache_implementation", None) is not None  # generate builds that cache itself
            or setting("use_cache", True) is False
        )
        if plain:
            return plain_generate(*args, **kwargs)
        pad = getattr(config, "pad_token_id", None)
        return generate_shared_prefix(
            self, kwargs.pop("input_ids"), kwargs.pop("attention_mask"), pad_token_id=0 if pad is None else int(pad),
            generate=plain_generate, **kwargs,
        )

    generate._tepo_shared_prefix = True
    model.generate = types.MethodType(generate, model)


def _prefill_shared(model, input_ids: Tensor, attention_mask: Tensor, plan: tuple[Tensor, Tensor, int],
                    pad_token_id: int, capacity: int = 64):
    """A `CascadeCache` (tepo/cascade_attention.py) holding every row's prompt but its last token, each
    shared part computed and stored once (`plan`: `_sharing_plan`):
    - rows repeat prompts (G completions each): the shared part is each distinct prompt, its common
      prefix with the others (k tokens, when k >= 2) forwarded once for all of them;
    - every prompt distinct (held-out evaluation): the shared part is the common prefix, forwarded
      once, and each row's remainder is forwarded into its own part (cascade attention).
    Returns (ids, mask, positions, cache): the prompts as re-laid for the cache (`_to_prefix_layout`),
    their attention mask, and the positions `generate` gives them (counted from the mask).
    `capacity`: own positions to reserve per row (the new tokens to come)."""
    first, inverse, k = plan
    ids, mask = (input_ids, attention_mask) if k < 2 else _to_prefix_layout(input_ids, attention_mask, k, pad_token_id)
    positions = _positions(mask)
    if first.numel() == ids.size(0) and k >= 2:  # all distinct: share the common prefix only
        prefix = _prefill(model, ids[:1, :k], mask[:1, :k], positions[:1, :k])
        cache = CascadeCache.from_prefill(prefix, torch.zeros_like(inverse), capacity + ids.size(1) - k)
        if ids.size(1) - 1 > k:  # each row's remainder into its own part, against the prefix kept once
            with cascade_attention_on(model):
                model.base_model(input_ids=ids[:, k:-1], attention_mask=mask[:, :-1], position_ids=positions[:, k:-1],
                                 past_key_values=cache, use_cache=True)
        return ids, mask, positions, cache
    prompts = _prompt_cache(model, ids[first], mask[first], positions[first], k)
    return ids, mask, positions, CascadeCache.from_prefill(prompts, inverse, capacity)


@torch.no_grad()
def generate_shared_prefix(model, input_ids: Tensor, attention_mask: Tensor, *, pad_token_id: int, generate=None,
                           **generate_kwargs):
    """`model.generate(input_ids, attention_mask, **generate_kwargs)` for left-padded prompts (B, P), with
    the prompt prefill shared: the common prefix of all rows is forwarded once, each distinct prompt's
    remainder once, and the cache indexed out to the rows before `generate` decodes. Returns what
    `generate` returns (B, P + new tokens), the prompt columns as given. `generate`: the model's own
    generate to call (default `model.generate`).

    Prompts are re-laid as [common prefix | padding | rest] (`_to_prefix_layout`); `generate` counts
    positions from the attention mask, so every token keeps its position. Falls back to plain
    `generate` when there is nothing to share."""
    generate = generate or model.generate
    plan = _sharing_plan(input_ids, attention_mask)
    first, _, k = plan
    if first.numel() == input_ids.size(0) and k < 2:  # nothing to share
        return generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
    config = generate_kwargs.get("generation_config") or model.generation_config
    new_tokens = generate_kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None)) or 64
    ids, mask, _, cache = _prefill_shared(model, input_ids, attention_mask, plan, pad_token_id, new_tokens + 1)
    with cascade_attention_on(model):
        out = generate(input_ids=ids, attention_mask=mask, past_key_values=cache, **generate_kwargs)
    return torch.cat([input_ids, out[:, ids.size(1):]], dim=1)


@torch.no_grad()
def decode_shared_prefix(model, input_ids: Tensor, attention_mask: Tensor, *, max_new_tokens: int, eos_ids,
                         pad_token_id: int, choose=None) -> list[list[int]]:
    """New tokens for left-padded prompts (B, P): the shared-prefix prefill (`_prefill_shared`), then one
    token per step for the rows still going, each row leaving the batch at its end-of-sequence token
    or at `max_new_tokens` (plain `generate` keeps computing finished rows until the last one ends).
    `choose(scores (R, V) fp32, rows (R,)) -> tokens (R,)` picks each step's tokens for the rows still
    in the batch (`rows`: their indices in the input); default greedy (argmax, as `generate`). Returns
    each row's tokens, its end-of-sequence token included. The same tokens as plain greedy `generate`
    up to float32 rounding (the batch shrinks, so matrix products round differently)."""
    eos = torch.tensor(sorted({int(e) for e in eos_ids}), device=input_ids.device)
    plan = _sharing_plan(input_ids, attention_mask)
    ids, mask, positions, cache = _prefill_shared(model, input_ids, attention_mask, plan, pad_token_id,
                                                  max_new_tokens + 1)
    with cascade_attention_on(model):
        return _decode(model, ids, mask, positions, cache, max_new_tokens, eos, choose)


def _decode(model, ids, mask, positions, cache, max_new_tokens, eos, choose) -> list[list[int]]:
    """The decoding loop of `decode_shared_prefix`. A finished row stays in the batch (fed an
    end-of-sequence token, its outputs dropped) until an eighth of the batch has finished: removing
    rows copies every layer's cache, which costs more than computing a few extra rows."""
    rows = torch.arange(ids.size(0), device=ids.device)  # each batch row's index in the input
    alive = torch.ones(ids.size(0), dtype=torch.bool, device=ids.device)
    out: list[list[int]] = [[] for _ in range(ids.size(0))]
    step_ids, step_pos = ids[:, -1:], positions[:, -1:]
    for step in range(max_new_tokens):
        logits = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, past_key_values=cache,
                       use_cache=True, logits_to_keep=1).logits
        live = alive.nonzero().flatten()
        scores = logits[live, -1].float()
        chosen = scores.argmax(dim=-1) if choose is None else choose(scores, rows[live])
        for row, token in zip(rows[live].tolist(), chosen.tolist()):
            out[row].append(token)
        alive[live] = ~torch.isin(chosen, eos)
        if step + 1 >= max_new_tokens or not bool(alive.any()):
            break
        tokens = torch.full_like(rows, int(eos[0])).index_copy_(0, live, chosen)
        if int((~alive).sum()) * 8 >= alive.numel():
            keep = alive.nonzero().flatten()
            _select_rows(cache, keep)
            rows, tokens, mask, step_pos, alive = rows[keep], tokens[keep], mask[keep], step_pos[keep], alive[keep]
        mask = torch.cat([mask, mask.new_ones(mask.size(0), 1)], dim=1)
        step_ids, step_pos = tokens.unsqueeze(1), step_pos + 1
    return out
