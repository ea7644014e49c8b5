"""The shared-prefix path (tepo.shared_prefix): each distinct prompt forwarded once, its completions
attending to it. It must be the plain path's computation: per-token log-probs, entropies and
parameter gradients equal to float32 rounding, on two architectures (Llama-like, Qwen2-like), with
left-padded prompts of different lengths, rows of a group scattered over the batch, in training
with gradient accumulation (groups split across micro-batches), and in generation. Two processes
(DDP) are covered in test_distributed.py (`test_two_processes_with_shared_prefix_match_the_plain_path`)."""

from __future__ import annotations

import logging

import pytest
import torch
from trl.trainer.utils import add_fused_lm_head

from tepo.shared_prefix import (
    add_shared_prefix_forward,
    generate_shared_prefix,
    prompt_groups,
    unsupported_reason,
)

from _tiny_llm import parity_reward, prompt_dataset, small_config, tiny_model, tiny_tokenizer

C = 6  # completion width of the hand-made batches


def qwen2_model(tok, seed: int = 0):
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    ))
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return model


ARCHS = {"llama": lambda tok: tiny_model(tok), "qwen2": qwen2_model}


def scoring_model(arch: str, attention: str, own_head: bool = True):
    """A tiny model patched as TEPOTrainer patches it; `own_head=False`: the shared path through TRL's
    fused head (no temperature given), else through tepo.lm_head_scores."""
    tok = tiny_tokenizer()
    model = ARCHS[arch](tok)
    model.config._attn_implementation = attention
    add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))  # as GRPOTrainer does
    add_shared_prefix_forward(model, temperature=0.7 if own_head else None)
    return model, tok


def ragged_batch(pad_id: int, seed: int = 1):
    """3 prompts of 5, 7 and 9 tokens (left-padded to 9), 3 completions each of 2..C tokens (right-padded),
    rows shuffled so that no group is contiguous. Returns ids (B, 9 + C), mask, labels as TRL builds them."""
    g = torch.Generator().manual_seed(seed)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 12, 13], [5, 6, 14, 15, 16, 17, 18, 19, 20]]
    P = max(map(len, prompts))
    rows = []
    for p in prompts:
        for _ in range(3):
            n = int(torch.randint(2, C + 1, (1,), generator=g))
            rows.append((p, torch.randint(3, 60, (n,), generator=g).tolist()))
    rows = [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]
    ids = torch.full((len(rows), P + C), pad_id)
    mask = torch.zeros_like(ids)
    for r, (p, c) in enumerate(rows):
        ids[r, P - len(p):P], mask[r, P - len(p):P] = torch.tensor(p), 1
        ids[r, P:P + len(c)], mask[r, P:P + len(c)] = torch.tensor(c), 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :-C] = -100
    return ids, mask, labels


def count_embedded_tokens(model) -> list[int]:
    """A list that grows by the number of token positions each forward embeds."""
    seen: list[int] = []
    model.get_input_embeddings().register_forward_hook(lambda mod, inp, out: seen.append(inp[0].numel()))
    return seen


def score(model, ids, mask, labels, *, shared: bool):
    """Log-probs and entropies (B, C) and the gradient of a weighted sum of both."""
    model.zero_grad()
    extra = {"shared_prefix": C} if shared else {}
    out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, **extra)
    logp, entropy = out.log_probs[:, -C:], out.entropy[:, -C:]
    weights = torch.linspace(0.5, 1.5, logp.numel()).reshape(logp.shape)
    ((logp * weights).sum() - 0.3 * entropy.sum()).backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    return logp.detach(), entropy.detach(), grads


def test_prompt_groups():
    ids = torch.tensor([[0, 1, 2], [3, 1, 2], [0, 1, 2], [3, 1, 2], [0, 1, 2]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 1, 1], [1, 1, 1], [0, 1, 1]])
    first, inverse = prompt_groups(ids, mask)
    assert first.numel() == 2
    assert torch.equal(ids[first][inverse], ids) and torch.equal(mask[first][inverse], mask)
    assert inverse[0] == inverse[2] == inverse[4] != inverse[1] == inverse[3]
    # same ids, other mask: another group (another computation)
    first, _ = prompt_groups(ids[:2].clone().fill_(1), mask[:2])
    assert first.numel() == 2


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("own_head", [True, False], ids=["tepo-head", "trl-head"])
def test_scores_and_gradients_equal_the_plain_path(arch, attention, own_head):
    model, tok = scoring_model(arch, attention, own_head)
    ids, mask, labels = ragged_batch(tok.pad_token_id)
    embedded = count_embedded_tokens(model)
    plain = score(model, ids, mask, labels, shared=False)
    plain_tokens = sum(embedded)
    embedded.clear()
    shared = score(model, ids, mask, labels, shared=True)
    for name, a, b in zip(("log-probs", "entropies", "gradients"), plain, shared):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n} differ\n{m}")
    assert plain[2].abs().max() > 0
    valid = labels[:, -C:] != -100
    assert (plain[0][~valid] == 0).all() and (shared[0][~valid] == 0).all()  # padding scores 0, as TRL's
    # the prompts' common start [5, 6] once, the rest of 3 distinct prompts of 9 columns (8 prefilled),
    # then 9 rows of C tokens: against 9 rows of 9 + C
    assert sum(embedded) == 2 + 3 * (8 - 2) + 9 * C < plain_tokens == 9 * (9 + C)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_a_completion_never_sees_a_sibling(arch):
    """Changing one completion of a group changes none of its siblings' log-probs or entropies."""
    model, tok = scoring_model(arch, "sdpa")
    ids, mask, labels = ragged_batch(tok.pad_token_id)
    first, inverse = prompt_groups(ids[:, :-C], mask[:, :-C])
    row = 0
    siblings = (inverse == inverse[row]).nonzero().flatten().tolist()
    siblings.remove(row)
    changed = ids.clone()
    changed[row, -C:] = torch.where(mask[row, -C:].bool(), (ids[row, -C:] + 7) % 50 + 3, ids[row, -C:])
    changed_labels = changed.masked_fill(mask == 0, -100)
    changed_labels[:, :-C] = -100
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, shared_prefix=C)
        b = model(input_ids=changed, attention_mask=mask, labels=changed_labels, fused_lm_head=True, shared_prefix=C)
    assert not torch.equal(a.log_probs[row], b.log_probs[row])  # the changed row itself did change
    for s in siblings:
        assert torch.equal(a.log_probs[s], b.log_probs[s]) and torch.equal(a.entropy[s], b.entropy[s])


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
def test_generation_equals_plain_generate(arch, sample):
    tok = tiny_tokenizer()
    model = ARCHS[arch](tok).eval()
    ids, mask, _ = ragged_batch(tok.pad_token_id)
    prompt_ids, prompt_mask = ids[:, :-C], mask[:, :-C]
    embedded = count_embedded_tokens(model)
    kwargs = dict(max_new_tokens=8, do_sample=sample, pad_token_id=tok.pad_token_id)
    torch.manual_seed(3)
    plain = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **kwargs)
    plain_tokens = sum(embedded)
    embedded.clear()
    torch.manual_seed(3)
    shared = generate_shared_prefix(model, prompt_ids, prompt_mask, **kwargs)
    assert torch.equal(shared, plain)
    assert sum(embedded) < plain_tokens


def test_generation_shares_a_common_prefix_of_distinct_prompts():
    """Distinct prompts that start alike (a chat template, a worked example): the common start is
    prefilled once, and greedy outputs are those of plain generate."""
    tok = tiny_tokenizer()
    model = tiny_model(tok).eval()
    texts = ["Solve: 12 + 5 = ?", "Solve: 3 * 4 = ? Think.", "Solve: 100 - 1?"]
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, width - len(row):], mask[r, width - len(row):] = torch.tensor(row), 1
    embedded = count_embedded_tokens(model)
    plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                           pad_token_id=tok.pad_token_id)
    plain_tokens = sum(embedded)
    embedded.clear()
    shared = generate_shared_prefix(model, ids, mask, pad_token_id=tok.pad_token_id, max_new_tokens=6, do_sample=False)
    assert torch.equal(shared, plain)
    assert sum(embedded) < plain_tokens


def test_unsupported_settings_have_a_reason():
    tok = tiny_tokenizer()
    model = tiny_model(tok)
    assert unsupported_reason(model) is None
    assert "gradient checkpointing" in unsupported_reason(model, gradient_checkpointing=True)
    model.config._attn_implementation = "flex_attention"
    assert "flex_attention" in unsupported_reason(model)


# ------------------------------------------------------------------------------------------------
# in the trainer


def count_shared_generations(monkeypatch) -> list[int]:
    """A list that grows by one for each `generate_shared_prefix` call (rows generated)."""
    import tepo.shared_prefix as module

    calls: list[int] = []
    inner = module.generate_shared_prefix

    def counted(model, input_ids, *args, **kwargs):
        calls.append(input_ids.size(0))
        return inner(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(module, "generate_shared_prefix", counted)
    return calls


def test_generate_takes_the_shared_path_with_a_generation_config(monkeypatch):
    """`model.generate(..., generation_config=...)` as TRL calls it goes through the shared prefill
    (transformers 5 leaves unset settings such as num_beams None: they are not a reason to fall back)."""
    from transformers import GenerationConfig

    from tepo.shared_prefix import add_shared_prefix_generate

    tok = tiny_tokenizer()
    model = tiny_model(tok).eval()
    ids, mask, _ = ragged_batch(tok.pad_token_id)
    config = GenerationConfig(max_new_tokens=5, do_sample=True, temperature=0.7, pad_token_id=tok.pad_token_id)
    assert config.num_beams is None  # the case that fell back before
    torch.manual_seed(0)
    plain = model.generate(input_ids=ids[:, :-C], attention_mask=mask[:, :-C], generation_config=config)
    calls = count_shared_generations(monkeypatch)
    add_shared_prefix_generate(model)
    torch.manual_seed(0)
    shared = model.generate(input_ids=ids[:, :-C], attention_mask=mask[:, :-C], generation_config=config)
    assert calls == [ids.size(0)]
    assert torch.equal(shared, plain)
    # a cache implementation asked for (generate builds that cache itself): the plain path
    config.cache_implementation = "static"
    model.generate(input_ids=ids[:, :-C], attention_mask=mask[:, :-C], generation_config=config)
    assert calls == [ids.size(0)]
    config.cache_implementation, config.use_cache = None, False  # no cache at all: the plain path too
    model.generate(input_ids=ids[:, :-C], attention_mask=mask[:, :-C], generation_config=config)
    assert calls == [ids.size(0)]


def train(tmp_path, name, **overrides):
    from tepo.training import TEPOTrainer

    tok = tiny_tokenizer()
    model = tiny_model(tok)
    # 4 prompts x 4 completions per rollout, micro-batches of 4 shuffled rows (groups split across
    # micro-batches), 2 accumulated per optimiser step, 2 optimiser steps per rollout (the second off-policy).
    # SGD: Adam would turn float32 rounding in near-zero gradients into full-size steps.
    config = small_config(
        tmp_path / name, objective="tepo", tepo_kl_coef=0.5, clip_low=0.2, clip_high=0.2,
        per_device_train_batch_size=4, gradient_accumulation_steps=2, steps_per_generation=4, num_generations=4,
        max_steps=4, stability_monitor=False, optim="sgd", learning_rate=0.5, max_grad_norm=0.0, **overrides,
    )
    trainer = TEPOTrainer(model=model, reward_funcs=parity_reward, args=config, train_dataset=prompt_dataset(),
                          processing_class=tok)
    embedded = count_embedded_tokens(trainer.model)
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    entropy = [row["entropy_mean"] for row in trainer.state.log_history if "entropy_mean" in row]
    weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    return trainer, losses, entropy, weights, sum(embedded)


@pytest.mark.slow
def test_training_with_shared_prefix_equals_the_plain_path(tmp_path, monkeypatch):
    generations = count_shared_generations(monkeypatch)
    on, losses_on, entropy_on, weights_on, tokens_on = train(tmp_path, "on", shared_prefix=True)
    assert generations == [16, 16]  # each rollout's generation took the shared path
    off, losses_off, entropy_off, weights_off, tokens_off = train(tmp_path, "off", shared_prefix=False)
    assert generations == [16, 16]
    assert on.shared_prefix and not off.shared_prefix
    assert len(losses_on) == 4
    torch.testing.assert_close(torch.tensor(losses_on), torch.tensor(losses_off), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.tensor(entropy_on), torch.tensor(entropy_off), rtol=1e-4, atol=1e-6)
    initial = torch.cat([p.detach().flatten() for p in tiny_model(tiny_tokenizer()).parameters()])
    assert (weights_off - initial).abs().max() > 1e-3
    torch.testing.assert_close(weights_on, weights_off, rtol=1e-4, atol=1e-6)
    assert tokens_on < tokens_off  # generation prefill, pi_old pass and training passes all computed less


@pytest.mark.slow
def test_where_it_cannot_apply_one_line_says_why_and_the_plain_path_runs(tmp_path, caplog):
    from tepo.training import TEPOTrainer

    tok = tiny_tokenizer()
    config = small_config(tmp_path / "gc", gradient_checkpointing=True, max_steps=1)
    with caplog.at_level(logging.WARNING, logger="tepo.training.trainer"):
        trainer = TEPOTrainer(model=tiny_model(tok), reward_funcs=parity_reward, args=config,
                              train_dataset=prompt_dataset(), processing_class=tok)
    lines = [r.getMessage() for r in caplog.records if "shared_prefix" in r.getMessage()]
    assert len(lines) == 1 and "gradient checkpointing" in lines[0]
    assert trainer.shared_prefix is False
    assert not getattr(trainer.model.forward, "_tepo_shared_prefix", False)


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_evaluation_backend_gives_the_plain_samples(temperature):
    """HFBackend (held-out evaluation) with the shared-prefix prefill: the same samples as without."""
    from tepo.evaluation.generation import HFBackend

    tok = tiny_tokenizer()
    model = tiny_model(tok).eval()
    messages = [[{"role": "system", "content": "Answer in a box."}, {"role": "user", "content": f"What is {i} + {2 * i}?"}]
                for i in range(1, 12)]
    n = 1 if temperature == 0 else 2
    # a second end-of-sequence token: a character the random model writes early in some answers, so
    # that rows end at different steps (and leave the shared-prefix decoding's batch early)
    first = HFBackend(model, tok, batch_size=6, shared_prefix=False).generate(messages, n=n, temperature=temperature,
                                                                             max_new_tokens=6, seed=5)
    early = [c for row in first for sample in row for c in sample.text[1:3]]
    stop = max(set(early), key=early.count)
    model.generation_config.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids(stop)]
    embedded = count_embedded_tokens(model)
    plain = HFBackend(model, tok, batch_size=6, shared_prefix=False).generate(messages, n=n, temperature=temperature,
                                                                             max_new_tokens=6, seed=5)
    plain_tokens = sum(embedded)
    embedded.clear()
    backend = HFBackend(model, tok, batch_size=6)
    assert backend.shared_prefix
    shared = backend.generate(messages, n=n, temperature=temperature, max_new_tokens=6, seed=5)
    assert shared == plain
    if temperature > 0:  # (the random tiny model's greedy answer is one string for every prompt)
        assert len({s.num_tokens for row in shared for s in row}) > 1  # rows ended at different steps
    assert sum(embedded) < plain_tokens


def test_the_common_prefix_is_shared_only_where_positions_are_relative():
    """Sharing the prompts' common prefix moves each prompt's tokens to positions counted from its own
    start: the same computation only for rotary embeddings whose frequencies do not depend on the
    longest position seen."""
    from tepo.shared_prefix import _relative_positions

    model = tiny_model(tiny_tokenizer())
    assert _relative_positions(model)
    model.config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    assert not _relative_positions(model)
    model.config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    assert _relative_positions(model)
