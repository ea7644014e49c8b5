"""Several processes and gradient accumulation give the same optimiser step as one big batch.

1. The math of `tepo.training.distributed` on `policy_loss` itself: a global batch cut into W ranks x
   k micro-batches, each loss scaled as the trainer does (1/k, DDP's 1/W mean), equals the loss and
   gradient of the whole batch: token-mean with `token_mean_rescale`, seq-mean modes without.
2. TEPOTrainer end to end, with scripted rollouts (completions fixed per prompt, of uneven
   lengths), SGD and no gradient clipping, so that the gradient of each optimiser step can be
   compared: one process with k = 2 accumulated micro-batches, and two processes launched by
   `accelerate launch` (recipes/accelerate/cpu_ddp_2proc.yaml, and the DeepSpeed ZeRO-2/3 recipes
   on the CPU), against one process with the whole batch; and the non-finite guard with a NaN loss
   on one process only.
3. `accelerate launch ... --no_python tepo train` trains a tiny model with two processes (DDP,
   ZeRO-2, ZeRO-3); an FSDP launch without GPUs is refused; the accelerate recipes parse and
   accelerate accepts them.

Run as a script, this file is the worker of the two-process test (see `worker_main`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _tiny_llm, also when run as a script

import tepo.training.cli as _cli_module  # noqa: E402
from tepo.objectives import policy_loss  # noqa: E402
from tepo.training.batch import loss_mask, optimizer_step_window, step_micro_batches  # noqa: E402
from tepo.training.distributed import (  # noqa: E402
    end_process_group_run,
    process_group_size,
    shutdown_distributed,
    sum_across_processes,
    token_mean_rescale,
    token_mean_scale,
)

REPO = Path(__file__).resolve().parent.parent
ACCELERATE_RECIPES = REPO / "recipes" / "accelerate"
CPU_DDP = ACCELERATE_RECIPES / "cpu_ddp_2proc.yaml"


# ----------------------------------------------------------------------------------------------
# 1. the rescaling function


def test_token_mean_rescale_values():
    assert token_mean_rescale(10, 40, world_size=2, micro_batches=2) == pytest.approx(1.0)
    assert token_mean_rescale(5, 40, world_size=2, micro_batches=2) == pytest.approx(0.5)
    assert token_mean_rescale(torch.tensor(30), torch.tensor(40.0), 2) == pytest.approx(1.5)
    assert token_mean_rescale(0, 0, 4, 3) == 0.0  # nothing valid anywhere: every loss is 0


@pytest.mark.parametrize(
    "args, message",
    [
        ((5, 4, 1, 1), "local_tokens=5 > global_tokens=4"),
        ((-1, 4, 1, 1), "token counts must be >= 0"),
        ((1, float("nan"), 1, 1), "token counts must be >= 0"),
        ((1, 4, 0, 1), "world_size=0 must be an integer >= 1"),
        ((1, 4, 2, 0), "micro_batches=0 must be an integer >= 1"),
        ((1, 4, 1.5, 1), "world_size=1.5"),
    ],
)
def test_token_mean_rescale_refuses_bad_counts(args, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        token_mean_rescale(*args)


def test_optimizer_step_window():
    # one optimiser step per rollout: the whole buffer
    assert list(optimizer_step_window(0, 2, 2)) == [0, 1] == list(optimizer_step_window(3, 2, 2))
    # two optimiser steps per rollout of 4 micro-batches
    assert [list(optimizer_step_window(s, 2, 4)) for s in range(6)] == [[0, 1], [0, 1], [2, 3], [2, 3], [0, 1], [0, 1]]
    assert list(optimizer_step_window(5, 1, 3)) == [2]
    assert optimizer_step_window(0, 2, 3) is None  # a step would straddle two rollouts
    with pytest.raises(ValueError, match="grad_accum=0"):
        optimizer_step_window(0, 0, 2)
    with pytest.raises(ValueError, match="micro_step=-1"):
        optimizer_step_window(-1, 1, 2)


def test_loss_mask_includes_tool_mask():
    cm = torch.tensor([[1, 1, 1, 0]])
    assert torch.equal(loss_mask({"completion_mask": cm}), cm)
    tm = torch.tensor([[1, 0, 1, 1]])
    assert torch.equal(loss_mask({"completion_mask": cm, "tool_mask": tm}), torch.tensor([[1, 0, 1, 0]]))


def test_sum_across_processes_single_process():
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    total = sum_across_processes(acc, torch.tensor(7.0))
    assert total.dtype == torch.int64 and int(total) == 7
    assert int(sum_across_processes(acc, 3)) == 3


@pytest.mark.parametrize("applied", [False, True])
def test_nonfinite_guard_under_deepspeed_takes_its_verdict(applied):
    """Under DeepSpeed the step has happened inside backward(): a step DeepSpeed skipped counts as
    skipped; one it applied from a non-finite loss cannot be undone and raises."""
    from collections import defaultdict
    from types import SimpleNamespace

    from accelerate import Accelerator
    from transformers import TrainerControl, TrainerState

    from tepo.training.callbacks import NonFiniteGuard

    trainer = SimpleNamespace(accelerator=Accelerator(cpu=True), is_deepspeed_enabled=True,
                              deepspeed=SimpleNamespace(was_step_applied=lambda: applied),
                              metrics={"train": defaultdict(list)})
    trainer.record_metric = lambda name, value: trainer.metrics["train"][name].append(float(value))
    guard = NonFiniteGuard(trainer, max_consecutive=3)
    state, control = TrainerState(), TrainerControl()
    guard.on_step_begin(None, state, control)
    guard.observe_loss(torch.tensor(float("nan")))
    if applied:
        with pytest.raises(RuntimeError, match="step 1: a process had a non-finite loss and DeepSpeed applied"):
            guard.on_pre_optimizer_step(None, state, control)
    else:
        guard.on_pre_optimizer_step(None, state, control)
        assert (guard.skipped, guard.consecutive) == (1, 1)
        assert trainer.metrics["train"]["nonfinite_skipped"] == [1.0]


@pytest.mark.parametrize("num, world", [(5, 2), (7, 3), (1, 2), (4, 4)])
def test_strided_heldout_results_merge_into_the_whole(num, world):
    """Process r evaluates problems[r::W]; the merge gives the result of evaluating them all."""
    from tepo.training.callbacks import merge_strided_results

    def result(ids):  # what greedy_accuracy returns, from per-problem outcomes fixed by the id
        ids = list(ids)
        verdicts = [i % 3 == 0 for i in ids]
        answers = [None if i % 4 == 1 else str(i) for i in ids]
        tokens = [10 + i for i in ids]
        return {"accuracy": sum(verdicts) / len(ids), "correct": sum(verdicts), "num_problems": len(ids),
                "ids": [str(i) for i in ids], "verdicts": verdicts, "answers": answers,
                "no_answer": answers.count(None), "truncated": sum(t > 13 for t in tokens),
                "mean_completion_tokens": sum(tokens) / len(ids), "generate_s": 1.0 + len(ids), "verify_s": 0.5}

    whole = result(range(num))
    parts = [result(range(r, num, world)) if r < num else None for r in range(world)]
    merged = merge_strided_results(parts)
    assert merged.keys() == whole.keys()
    for key in whole:
        if key == "generate_s":  # processes run side by side: the slowest one's time
            assert merged[key] == max(p[key] for p in parts if p)
        elif key == "mean_completion_tokens":
            assert merged[key] == pytest.approx(whole[key], rel=1e-12)
        else:
            assert merged[key] == whole[key], key


def test_shutdown_distributed_without_a_process_group_is_a_no_op():
    assert shutdown_distributed() is False
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())


def _end_of_train_main(monkeypatch, *, group_size: int, train):
    """What `train_main` does after the run, with a process group of `group_size` open (0: none):
    the calls it makes, and how it ends."""
    import tepo.training.distributed as distributed

    calls: list = []

    def end(code):
        calls.append(("end_process_group_run", code))
        raise SystemExit(code)

    monkeypatch.setattr(_cli_module, "_train", train)
    monkeypatch.setattr(distributed, "process_group_size", lambda: group_size)
    monkeypatch.setattr(distributed, "shutdown_distributed", lambda *, synchronise=True: calls.append(("shutdown", synchronise)))
    monkeypatch.setattr(distributed, "end_process_group_run", end)
    try:
        outcome = ("returned", _cli_module.train_main([]))
    except SystemExit as stop:
        outcome = ("exited", stop.code)
    except RuntimeError as err:
        outcome = ("raised", str(err))
    return calls, outcome


def test_train_main_ends_a_run_with_a_process_group_through_end_process_group_run(monkeypatch):
    def fails(argv):
        raise RuntimeError("broken on this rank")

    # several processes, or a colocated vLLM engine's group of one
    for size in (2, 1):
        assert _end_of_train_main(monkeypatch, group_size=size, train=lambda argv: 3) == (
            [("end_process_group_run", 3)], ("exited", 3))
    # one process, no group: the command returns as usual
    assert _end_of_train_main(monkeypatch, group_size=0, train=lambda argv: 0) == ([], ("returned", 0))
    # an error with several processes: the group closed without a barrier, and the error goes on up
    assert _end_of_train_main(monkeypatch, group_size=2, train=fails) == (
        [("shutdown", False)], ("raised", "broken on this rank"))
    # ... with vLLM's group of one: left to vLLM, which closes it in its own exit handler
    assert _end_of_train_main(monkeypatch, group_size=1, train=fails) == ([], ("raised", "broken on this rank"))


class _FakeProcessGroup:
    """torch.distributed's default group as `end_process_group_run` sees it, recording the calls."""

    def __init__(self, world_size: int, calls: list):
        self.world_size, self.open, self.calls = world_size, True, calls

    def install(self, monkeypatch):
        dist = torch.distributed
        monkeypatch.setattr(dist, "is_available", lambda: True)
        monkeypatch.setattr(dist, "is_initialized", lambda: self.open)
        monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: self.world_size)
        monkeypatch.setattr(dist, "barrier", lambda *a, **k: self.calls.append("barrier"))
        monkeypatch.setattr(dist, "destroy_process_group", self.destroy)

    def destroy(self, group=None):
        if not self.open:  # as torch does for a group that is gone
            raise ValueError("Invalid process group specified")
        self.open = False
        self.calls.append("destroy")


@pytest.mark.parametrize("world_size, handler_closes_group, expected", [
    # two processes: barrier first; then the exit handlers; then the group
    (2, False, ["barrier", "atexit handlers", "destroy", ("os._exit", 5)]),
    # a colocated vLLM engine (a group of one) closes its groups in its own exit handler: the group
    # is left to it (destroyed under it, its shutdown printed a traceback at the end of every run)
    (1, True, ["atexit handlers", "destroy", ("os._exit", 5)]),
])
def test_end_process_group_run_lets_exit_handlers_close_first_then_leaves_without_teardown(
        monkeypatch, world_size, handler_closes_group, expected):
    import atexit

    calls: list = []
    group = _FakeProcessGroup(world_size, calls)
    group.install(monkeypatch)

    def exit_handlers():
        calls.append("atexit handlers")
        if handler_closes_group:
            group.destroy()

    def hard_exit(code):
        calls.append(("os._exit", code))
        raise SystemExit(code)

    monkeypatch.setattr(atexit, "_run_exitfuncs", exit_handlers)
    monkeypatch.setattr(os, "_exit", hard_exit)
    with pytest.raises(SystemExit):
        end_process_group_run(5)
    assert calls == expected
    assert not group.open


def _fake_trainer(*, step, grad_accum, spg, buffer, training=True):
    """The attributes of TEPOTrainer that `token_mean_scale` reads; one process."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    return SimpleNamespace(
        model=SimpleNamespace(training=training), accelerator=Accelerator(cpu=True),
        current_gradient_accumulation_steps=grad_accum, args=SimpleNamespace(steps_per_generation=spg),
        step_micro_batches=lambda: step_micro_batches(buffer, step, grad_accum, spg),
    )


def test_token_mean_scale_counts_the_optimiser_step_from_the_rollout_buffer():
    counts = [3, 5, 1, 7]  # valid tokens of the 4 buffered micro-batches of one rollout
    buffer = [{"completion_mask": (torch.arange(8) < c).int()[None]} for c in counts]
    # 2 micro-batches per optimiser step: steps {0, 1} (8 tokens) and {2, 3} (8 tokens)
    for step, expect in [(0, 3 * 2 / 8), (1, 5 * 2 / 8), (2, 1 * 2 / 8), (3, 7 * 2 / 8), (5, 5 * 2 / 8)]:
        trainer = _fake_trainer(step=step, grad_accum=2, spg=4, buffer=buffer)
        assert token_mean_scale(trainer, buffer[step % 4]) == pytest.approx(expect)
    # a step straddling two rollouts: TRL's estimate, the rollout's count shared evenly
    trainer = _fake_trainer(step=0, grad_accum=2, spg=3, buffer=buffer[:3])
    inputs = {**buffer[0], "num_items_in_batch": torch.tensor(9)}
    assert token_mean_scale(trainer, inputs) == pytest.approx(3 * 2 / (9 * 2 / 3))
    # nothing to do: evaluation, or one process without accumulation
    assert token_mean_scale(_fake_trainer(step=0, grad_accum=2, spg=4, buffer=buffer, training=False), buffer[0]) == 1.0
    assert token_mean_scale(_fake_trainer(step=0, grad_accum=1, spg=4, buffer=buffer), buffer[0]) == 1.0


def _global_batch(seed: int, rows: int, T: int = 7):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T + 1, (rows,), generator=g)  # uneven, some rows empty
    mask = (torch.arange(T) < lengths[:, None]).double()
    logp = (-torch.rand(rows, T, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    old_logp = logp.detach() + 0.05 * torch.randn(rows, T, generator=g, dtype=torch.float64)
    return dict(
        logp=logp, old_logp=old_logp, mask=mask,
        advantages=torch.randn(rows, generator=g, dtype=torch.float64),
        ref_logp=logp.detach() + 0.1 * torch.randn(rows, T, generator=g, dtype=torch.float64),
        entropy=torch.rand(rows, T, generator=g, dtype=torch.float64).requires_grad_(True),
        old_entropy=torch.rand(rows, T, generator=g, dtype=torch.float64),
    )


# (objective, hyper-parameters); max_len fixed as the trainer passes it (max_completion_length).
CASES = [
    ("dapo", {}),
    ("dapo", {"beta_kl": 0.1, "entropy_coef": 0.01}),
    ("tepo", {"tepo_kl_coef": 0.5}),
    ("tepo", {"clip_low": 0.2, "clip_high": 0.2, "tepo_kl_coef": 0.3}),
    ("grpo", {}),
    ("gspo", {}),
    ("gspo_token", {"entropy_coef": 0.01}),
    ("dr_grpo", {"max_len": 7}),
]


def _simulate_step(objective, hp, batch, world, micro, rescale):
    """The optimiser step's loss as DDP + accumulation see it: sum over ranks and micro-batches of
    loss / k (trainer) / W (DDP's gradient mean), each micro-batch a contiguous block of rows."""
    rows = batch["mask"].shape[0]
    size = rows // (world * micro)
    n_step = batch["mask"].sum()
    total = 0.0
    for part in range(world * micro):
        sl = slice(part * size, (part + 1) * size)
        piece = {k: v[sl] for k, v in batch.items()}
        loss = policy_loss(objective, **piece, **hp).loss / micro
        if rescale:
            loss = loss * token_mean_rescale(loss_mask({"completion_mask": piece["mask"]}).sum(), n_step, world, micro)
        total = total + loss / world
    return total


@pytest.mark.parametrize("world, micro", [(2, 1), (1, 3), (2, 2), (3, 2)])
@pytest.mark.parametrize("objective, hp", CASES, ids=[f"{o}-{i}" for i, (o, _) in enumerate(CASES)])
def test_sharded_step_equals_whole_batch(objective, hp, world, micro):
    from tepo.objectives import default_hparams

    batch = _global_batch(seed=world * 10 + micro, rows=world * micro * 2)
    whole = policy_loss(objective, **batch, **hp).loss
    g_whole = torch.autograd.grad(whole, [batch["logp"], batch["entropy"]], allow_unused=True, materialize_grads=True)
    token_mean = {**default_hparams(objective), **hp}["agg"] == "token-mean"
    sharded = _simulate_step(objective, hp, batch, world, micro, rescale=token_mean)
    g_sharded = torch.autograd.grad(sharded, [batch["logp"], batch["entropy"]], allow_unused=True, materialize_grads=True)
    torch.testing.assert_close(sharded, whole, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_sharded, g_whole):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if token_mean:
        # without the factor, micro-batches with few tokens count for too much
        naive = _simulate_step(objective, hp, batch, world, micro, rescale=False)
        assert not torch.allclose(naive, whole, rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------------------------
# 2. TEPOTrainer end to end with scripted rollouts

MAX_COMPLETION = 8
LR = 0.1


def scripted_completion(prompt_ids, k: int, eos_id: int, vocab: range) -> list[int]:
    """The k-th completion of a prompt: 1..MAX_COMPLETION tokens, fixed by (prompt, k)."""
    seed = (sum((i + 1) * t for i, t in enumerate(prompt_ids)) * 1009 + k) % (2**31)
    g = torch.Generator().manual_seed(seed)
    length = int(torch.randint(1, MAX_COMPLETION + 1, (1,), generator=g))
    ids = torch.randint(vocab.start, vocab.stop, (length,), generator=g).tolist()
    if length < MAX_COMPLETION:
        ids[-1] = eos_id
    return ids


def equal_length_prompts(n: int = 16):
    """Prompts of one token length (no left padding, so positions agree whatever the batch)."""
    from datasets import Dataset

    return Dataset.from_list([
        {"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}], "answer": str(2 * i), "id": f"p{i}"}
        for i in range(10, 10 + n)
    ])


def make_trainer_classes():
    from transformers import TrainerCallback

    from tepo.training import TEPOTrainer

    class ScriptedTrainer(TEPOTrainer):
        """Rollouts fixed per (prompt, occurrence); records each micro-batch's returned loss."""

        def __init__(self, *args, poison_steps=(), **kwargs):
            super().__init__(*args, **kwargs)
            self.micro_losses: list[float] = []
            self.micro_tokens: list[int] = []
            self.poison_steps = set(poison_steps)  # optimiser steps where this process's loss is NaN

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
            seen: Counter = Counter()
            out = []
            vocab = range(len(self._tokenizer) - 100, len(self._tokenizer))  # printable characters
            for ids in prompt_ids:
                key = tuple(ids)
                out.append(scripted_completion(key, seen[key], self.eos_token_ids[0], vocab))
                seen[key] += 1
            return out, None

        def _compute_loss(self, model, inputs):
            loss = super()._compute_loss(model, inputs)
            if self.model.training and self.state.global_step + 1 in self.poison_steps:
                loss = loss * float("nan")  # NaN loss, NaN gradients
            if self.model.training:
                self.micro_losses.append(loss.item())
                self.micro_tokens.append(int(loss_mask(inputs).sum()))
            return loss

    class GradRecorder(TrainerCallback):
        """Each optimiser step's gradient (not under DeepSpeed), and the weights after it."""

        def __init__(self, trainer):
            self.trainer, self.grads, self.params_by_step = trainer, [], {}

        def on_step_end(self, args, state, control, **kwargs):
            self.params_by_step[state.global_step] = flat_params(self.trainer.model)

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if self.trainer.is_deepspeed_enabled:
                # DeepSpeed keeps the gradients in its own (partitioned) buffers, not in p.grad, and has
                # already stepped inside backward(); the final weights are compared instead.
                self.grads = None
                return
            self.grads.append(torch.cat([
                (p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten().clone()
                for p in self.trainer.model.parameters()
            ]))

    return ScriptedTrainer, GradRecorder


def run_scripted(output_dir, *, objective, hparams, per_device, grad_accum, steps_per_generation, max_steps,
                 poison_steps=(), max_nonfinite_steps=3, optim="sgd", save_steps=None,
                 resume=None) -> dict:
    """Train the tiny model for max_steps with scripted rollouts; per optimiser step: the gradient
    this process saw (None under DeepSpeed), its micro-batch losses and token counts, the weights
    after it; the final weights, the non-finite guard's counts and the ZeRO stage (None: no DeepSpeed).
    `poison_steps`: optimiser steps where this process's loss is NaN. `save_steps`: save a checkpoint
    every so many steps; `resume`: the checkpoint to resume from."""
    from _tiny_llm import parity_reward, tiny_model, tiny_tokenizer

    from tepo.training import TEPOConfig

    ScriptedTrainer, GradRecorder = make_trainer_classes()
    tok = tiny_tokenizer()
    args = TEPOConfig(
        output_dir=str(output_dir), objective=objective, **hparams,
        per_device_train_batch_size=per_device, gradient_accumulation_steps=grad_accum,
        steps_per_generation=steps_per_generation, num_generations=4, max_completion_length=MAX_COMPLETION,
        max_steps=max_steps, learning_rate=LR, optim=optim, max_grad_norm=0.0, lr_scheduler_type="constant",
        use_cpu=True, bf16=False, report_to=[], gradient_checkpointing=False, seed=0,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        disable_tqdm=True, stability_monitor=False, max_nonfinite_steps=max_nonfinite_steps,
    )
    trainer = ScriptedTrainer(model=tiny_model(tok), reward_funcs=parity_reward, args=args,
                  train_dataset=equal_length_prompts(), processing_class=tok, poison_steps=poison_steps)
    recorder = GradRecorder(trainer)
    trainer.add_callback(recorder)
    trainer.train(resume_from_checkpoint=resume)
    return {
        "grads": recorder.grads,
        "micro_losses": trainer.micro_losses,
        "logged_losses": [row["loss"] for row in trainer.state.log_history if "loss" in row],
        "logged_metrics": [{k: row[k] for k in LOSS_METRICS if k in row} for row in trainer.state.log_history
                           if "loss" in row],
        "micro_tokens": trainer.micro_tokens,
        "params": flat_params(trainer.model),
        "params_by_step": recorder.params_by_step,
        "nonfinite_skipped": trainer.nonfinite_guard.skipped,
        "stopped_at": trainer.nonfinite_guard.stopped_at,
        "grad_accum": grad_accum,
        "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None,
        "shared_prefix": trainer.shared_prefix,
    }


# Loss metrics logged per optimiser step: the step's extremes and token means (tepo.training.step_metrics),
# so the same with several processes and micro-batches as with one micro-batch of the whole step.
LOSS_METRICS = ("entropy_mean", "clip_frac", "clip_frac_low", "clip_frac_high", "ratio_mean", "ratio_min",
                "ratio_max", "approx_kl", "kl_mask_frac")


def flat_params(model) -> torch.Tensor:
    """All weights as one vector, whole also under DeepSpeed ZeRO-3 (each process holds a shard)."""
    from contextlib import nullcontext

    params = list(model.parameters())
    context = nullcontext()
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        context = deepspeed.zero.GatheredParameters(params)
    with context:
        return torch.cat([p.detach().flatten().clone() for p in params])


def run_initial_params() -> torch.Tensor:
    from _tiny_llm import tiny_model, tiny_tokenizer

    return flat_params(tiny_model(tiny_tokenizer()))


def step_losses(runs: list[dict]) -> list[float]:
    """Per optimiser step: sum over the micro-batches of each process, mean over processes (what
    DDP's averaged gradient is the gradient of)."""
    k = runs[0]["grad_accum"]
    per_rank = [[sum(r["micro_losses"][i:i + k]) for i in range(0, len(r["micro_losses"]), k)] for r in runs]
    return [sum(col) / len(col) for col in zip(*per_rank)]


def assert_same_steps(runs: list[dict], reference: dict):
    """Same gradient per optimiser step (where the run recorded it: not under DeepSpeed), same
    losses, same weights at the end."""
    assert len(reference["grads"]) >= 1
    assert all(g.abs().max() > 0 for g in reference["grads"]), "scripted rollouts gave a zero gradient"
    initial = run_initial_params()
    assert (reference["params"] - initial).abs().max() > 1e-3, "the reference run did not move the weights"
    grads = runs[0]["grads"]
    if grads is not None:
        assert len(grads) == len(reference["grads"])
    for step, (g, g_ref) in enumerate(zip(grads or [], reference["grads"])):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6 * float(g_ref.abs().max()),
                                   msg=lambda m, s=step: f"optimiser step {s + 1}: gradients differ\n{m}")
    torch.testing.assert_close(torch.tensor(step_losses(runs)), torch.tensor(step_losses([reference])),
                               rtol=1e-5, atol=1e-7)
    for r in runs:
        torch.testing.assert_close(r["params"], reference["params"], rtol=1e-5, atol=1e-7)
        # the logged loss is the step's objective on every process, not this process's share
        torch.testing.assert_close(torch.tensor(r["logged_losses"]), torch.tensor(reference["logged_losses"]),
                                   rtol=1e-5, atol=1e-7)
        assert [sorted(m) for m in r["logged_metrics"]] == [sorted(m) for m in reference["logged_metrics"]]
        for step, (m, m_ref) in enumerate(zip(r["logged_metrics"], reference["logged_metrics"]), start=1):
            for key in m_ref:
                assert m[key] == pytest.approx(m_ref[key], rel=1e-5, abs=1e-7), f"step {step}: {key}"


# Variants: (id, objective, hparams). grpo aggregates per sequence (exact already); tepo with its KL
# mask on is token-mean (exact through the trainer's token_mean_scale).
VARIANTS = [
    ("grpo", "grpo", {}),
    ("tepo", "tepo", {"tepo_kl_coef": 0.5, "clip_low": 0.2, "clip_high": 0.2}),
]
VARIANT_PARAMS = [pytest.param(vid, objective, hp, id=vid) for vid, objective, hp in VARIANTS]


_reference_cache: dict = {}


def reference_run(tmp_root: Path, objective, hp, steps_per_generation, max_steps) -> dict:
    key = (objective, tuple(sorted(hp.items())), steps_per_generation, max_steps)
    if key not in _reference_cache:
        _reference_cache[key] = run_scripted(
            tmp_root / f"ref-{len(_reference_cache)}", objective=objective, hparams=hp, per_device=8, grad_accum=1,
            steps_per_generation=steps_per_generation, max_steps=max_steps,
        )
    return _reference_cache[key]


@pytest.mark.slow
@pytest.mark.parametrize("vid, objective, hp", VARIANT_PARAMS)
def test_grad_accumulation_matches_one_batch(tmp_path, monkeypatch, vid, objective, hp):
    """k = 2 micro-batches of 4 == one micro-batch of 8, over two optimiser steps served by one
    rollout of 16 (the second step off-policy: TRL's old log-probs and TEPO's old entropy in play)."""
    import trl.trainer.grpo_trainer as grpo_module

    # Rows in rollout order, so that both runs put the same rows in the same optimiser step.
    monkeypatch.setattr(grpo_module, "shuffle_sequence_dict", lambda d: d)
    ref = run_scripted(tmp_path / "ref", objective=objective, hparams=hp, per_device=8, grad_accum=1,
                       steps_per_generation=2, max_steps=2)
    acc = run_scripted(tmp_path / "acc", objective=objective, hparams=hp, per_device=4, grad_accum=2,
                       steps_per_generation=4, max_steps=2)
    tokens = acc["micro_tokens"]
    assert tokens[0] != tokens[1] or tokens[2] != tokens[3], "micro-batches hold equal token counts"
    assert_same_steps([acc], ref)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_cmd(config: Path, *rest: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
            "--main_process_port", str(_free_port()), *rest]


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


# The engines two processes train with on this CPU: plain DDP over gloo, and the DeepSpeed ZeRO
# recipes themselves (recipes/accelerate/deepspeed_zero{2,3}.yaml) with 2 processes and fp32, so
# that the result can be compared exactly; DeepSpeed picks its CPU accelerator and gloo.
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (pip install 'tepo[deepspeed]')")
ENGINES = [pytest.param("ddp", id="ddp"),
           pytest.param("zero2", id="zero2", marks=needs_deepspeed),
           pytest.param("zero3", id="zero3", marks=needs_deepspeed)]
ZERO_STAGE = {"ddp": None, "zero2": 2, "zero3": 3}


def launch_config(engine: str, tmp: Path) -> Path:
    """The accelerate config for two processes on this CPU with the given engine (or "fsdp")."""
    if engine == "ddp":
        return CPU_DDP
    import yaml

    recipe = "fsdp.yaml" if engine == "fsdp" else f"deepspeed_{engine}.yaml"
    config = yaml.safe_load((ACCELERATE_RECIPES / recipe).read_text())
    config.update(num_processes=2, mixed_precision="no")
    path = tmp / f"{engine}-2proc.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def launch_worker(engine: str, out: Path, *flags: str, timeout: int = 900) -> None:
    """`accelerate launch` this file as the worker (see `worker_main`) on two processes with `engine`;
    the test fails if the launch does."""
    cmd = accelerate_cmd(launch_config(engine, out), str(Path(__file__).resolve()), "--out", str(out), *flags)
    proc = subprocess.run(cmd, cwd=REPO, env=_clean_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"accelerate launch failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


@pytest.fixture(scope="module", params=ENGINES)
def two_process_runs(request, tmp_path_factory):
    """One `accelerate launch` of this file as the worker, per engine: every variant, two processes,
    two optimiser steps of 2 processes x 2 micro-batches x 2 completions (one rollout per step)."""
    engine = request.param
    out = tmp_path_factory.mktemp(engine)
    launch_worker(engine, out)
    return engine, out


@pytest.mark.slow
@pytest.mark.parametrize("vid, objective, hp", VARIANT_PARAMS)
def test_two_processes_match_one_process(two_process_runs, tmp_path_factory, vid, objective, hp):
    engine, out = two_process_runs
    runs = [torch.load(out / f"{vid}-rank{r}.pt") for r in range(2)]
    assert [r["zero_stage"] for r in runs] == [ZERO_STAGE[engine]] * 2, "the launch did not run the engine asked for"
    if engine == "ddp":
        torch.testing.assert_close(runs[0]["grads"][0], runs[1]["grads"][0])  # DDP: one gradient on every rank
    else:
        assert runs[0]["grads"] is None  # DeepSpeed's gradients are not in p.grad; the weights are compared
    tokens = [sum(r["micro_tokens"][:2]) for r in runs]
    assert tokens[0] != tokens[1], "both processes hold equal token counts: the test would prove little"
    ref = reference_run(tmp_path_factory.mktemp("ref"), objective, hp, steps_per_generation=1, max_steps=2)
    assert_same_steps(runs, ref)


@pytest.mark.slow
def test_two_processes_with_shared_prefix_match_the_plain_path(two_process_runs, tmp_path_factory):
    """The two-process runs above train with shared_prefix on (the default; DDP runs it, DeepSpeed
    falls back to the plain path): the same steps as one process on the plain path."""
    engine, out = two_process_runs
    vid, objective, hp = VARIANTS[1]
    runs = [torch.load(out / f"{vid}-rank{r}.pt") for r in range(2)]
    assert all(r["shared_prefix"] == (engine == "ddp") for r in runs)
    plain = reference_run(tmp_path_factory.mktemp("plain"), objective, {**hp, "shared_prefix": False},
                          steps_per_generation=1, max_steps=2)
    assert plain["shared_prefix"] is False
    assert_same_steps(runs, plain)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_nonfinite_loss_on_one_process_is_skipped_by_all(tmp_path, engine):
    """Process 0 alone gets a NaN loss at optimiser steps 2 and 3 (max_nonfinite_steps=2): every
    process skips both updates, counts them and stops after step 3. A process that counted alone
    would stop alone and leave the others waiting forever (DeepSpeed keeps the gradients out of
    p.grad, so there the guard takes DeepSpeed's own verdict)."""
    launch_worker(engine, tmp_path, "--nonfinite", timeout=600)
    initial = run_initial_params()
    for rank in (0, 1):
        run = torch.load(tmp_path / f"nonfinite-rank{rank}.pt")
        assert (run["nonfinite_skipped"], run["stopped_at"]) == (2, 3), f"process {rank}"
        after = run["params_by_step"]
        assert sorted(after) == [1, 2, 3]
        assert (after[1] - initial).abs().max() > 1e-3, "step 1 did not train"
        assert torch.equal(after[1], after[2]) and torch.equal(after[2], after[3]), f"process {rank}: a NaN step moved the weights"
        assert torch.isfinite(after[3]).all()


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_resume_continues_as_if_never_stopped(tmp_path, engine):
    """Two processes, AdamW: 2 steps, a checkpoint, a new trainer resuming from it for 2 more steps
    end on the weights of 4 steps in one go (DeepSpeed saves and loads its own sharded optimiser
    state; its checkpoint goes through TEPOTrainer's staged, renamed save as well)."""
    launch_worker(engine, tmp_path, "--resume", timeout=600)
    for rank in (0, 1):
        runs = torch.load(tmp_path / f"resume-rank{rank}.pt")
        straight, resumed = runs["straight"], runs["resumed"]
        assert sorted(resumed["params_by_step"]) == [3, 4], "the resumed trainer did not start at step 3"
        assert (straight["params_by_step"][4] - straight["params_by_step"][2]).abs().max() > 1e-3
        torch.testing.assert_close(resumed["params"], straight["params"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(resumed["micro_losses"], straight["micro_losses"][-len(resumed["micro_losses"]):])


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the FSDP recipe does set up FSDP")
def test_fsdp_config_without_gpus_is_refused(tmp_path):
    """On a CPU accelerate sets up no distributed training for an FSDP config (with use_cpu false):
    the two processes would each train alone into one output_dir. tepo train refuses, before
    writing anything."""
    from _tiny_llm import save_tiny, tiny_train_argv

    model = save_tiny(tmp_path / "tiny")
    out = tmp_path / "run"
    cmd = accelerate_cmd(launch_config("fsdp", tmp_path), "--no_python", str(Path(sys.executable).parent / "tepo"), "train",
                         *tiny_train_argv(model, out, use_cpu="false", bf16="false"))
    proc = subprocess.run(cmd, cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "launched as 2 processes (WORLD_SIZE=2), but accelerate set up no distributed training" in proc.stderr
    assert not out.exists()


def worker_main(argv: list[str] | None = None) -> int:
    """Worker of `two_process_runs` (each process trains every variant, then writes its record), or
    with --nonfinite of `test_nonfinite_loss_on_one_process_is_skipped_by_all`."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--nonfinite", action="store_true", help="the non-finite guard's scenario instead")
    parser.add_argument("--resume", action="store_true", help="the resume scenario instead")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    out = Path(args.out)
    if args.resume:
        common = dict(objective="tepo", hparams=VARIANTS[1][2], per_device=2, grad_accum=2, steps_per_generation=2,
                      optim="adamw_torch", max_steps=4)
        straight = run_scripted(out / "straight", **common)
        run_scripted(out / "interrupted", **{**common, "max_steps": 2}, save_steps=2)
        resumed = run_scripted(out / "interrupted", **common, resume=str(out / "interrupted" / "checkpoint-2"))
        torch.save({"straight": straight, "resumed": resumed}, out / f"resume-rank{rank}.pt")
    elif args.nonfinite:
        run = run_scripted(out / "run-nonfinite", objective="tepo", hparams=VARIANTS[1][2], per_device=2, grad_accum=2,
                           steps_per_generation=2, max_steps=4, poison_steps={2, 3} if rank == 0 else (),
                           max_nonfinite_steps=2)
        torch.save(run, out / f"nonfinite-rank{rank}.pt")
    else:
        for vid, objective, hp in VARIANTS:
            run = run_scripted(out / f"run-{vid}", objective=objective, hparams=hp, per_device=2, grad_accum=2,
                               steps_per_generation=2, max_steps=2)
            torch.save(run, out / f"{vid}-rank{rank}.pt")
    return 0


# ----------------------------------------------------------------------------------------------
# 3. the command line and the recipes


def _accelerate_recipes():
    return sorted(ACCELERATE_RECIPES.glob("*.yaml"))


def test_accelerate_recipes_exist():
    names = {p.name for p in _accelerate_recipes()}
    for expected in ("cpu_ddp_2proc.yaml", "multi_gpu.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml", "fsdp.yaml"):
        assert expected in names


@pytest.mark.parametrize("path", _accelerate_recipes(), ids=lambda p: p.name)
def test_accelerate_recipe_is_accepted(path):
    """accelerate's own loader reads it, and its launcher's validation accepts it (no launch)."""
    import yaml
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    raw = yaml.safe_load(path.read_text())
    config = load_config_from_file(str(path))
    assert config.num_processes == raw["num_processes"] and config.distributed_type.value == raw["distributed_type"]
    args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    validated, defaults, _ = _validate_launch_command(args)
    assert validated.num_processes == raw["num_processes"]
    if raw["distributed_type"] == "DEEPSPEED":
        assert validated.use_deepspeed and validated.zero_stage == raw["deepspeed_config"]["zero_stage"]
    if raw["distributed_type"] == "FSDP":
        assert validated.use_fsdp
    if raw["distributed_type"] == "MULTI_GPU":
        assert validated.multi_gpu


@pytest.mark.parametrize("name", ["vllm-colocate.yaml", "vllm-server.yaml"])
def test_vllm_recipes_parse_into_tepo_config(name, tmp_path):
    """The recipe's every key is a TEPOConfig / tepo train field, and the config validates (vLLM
    itself is not installed here, so nothing is generated)."""
    from tepo.training.cli import parse

    script, config = parse(["--config", str(REPO / "recipes" / name), "--output_dir", str(tmp_path)])
    assert config.use_vllm is True
    assert config.vllm_mode == name.removeprefix("vllm-").removesuffix(".yaml")
    assert script.task is not None or script.data is not None


def heldout_problems_of(out: Path) -> list[dict]:
    """The held-out problems of the `tepo train` run in `out`, loaded as it loaded them."""
    script = _cli_module.TrainScriptArguments(**json.loads((out / "run.json").read_text())["script"])
    return _cli_module.load_problems(script)[1]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_tepo_train_two_processes_cli(tmp_path, engine):
    """`accelerate launch --config_file recipes/accelerate/<config> --no_python tepo train`, held-out
    evaluation before, during and after training included (under ZeRO-3 every process holds only a
    shard of each weight, from loading on); process 0 alone writes the files and the summary."""
    from safetensors.torch import load_file

    from _tiny_llm import save_tiny

    model = save_tiny(tmp_path / "tiny")
    tepo_bin = Path(sys.executable).parent / "tepo"
    if not tepo_bin.exists():
        pytest.skip(f"no tepo console script next to {sys.executable} (install the package)")
    out = tmp_path / "run"
    cmd = accelerate_cmd(launch_config(engine, tmp_path), "--no_python", str(tepo_bin), "train", "--model", str(model),
                         "--task", "arithmetic", "--num_problems", "32", "--heldout_num_problems", "4",
                         "--heldout_eval_steps", "1", "--heldout_max_new_tokens", "4",
                         "--objective", "tepo", "--per_device_train_batch_size", "4", "--num_generations", "4",
                         "--max_completion_length", "8", "--max_steps", "2", "--output_dir", str(out),
                         "--save_strategy", "no", "--report_to", "none", "--bf16", "false")
    proc = subprocess.run(cmd, cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["heldout_accuracy"] is not None for r in rows)
    before = json.loads((out / "eval_before.json").read_text())
    assert before["num_problems"] == 4 and len(before["verdicts"]) == 4  # each process did 2, merged
    assert before["ids"] == [p["id"] for p in heldout_problems_of(out)]
    assert json.loads((out / "eval_after.json").read_text())["step"] == 2
    assert proc.stdout.count("tepo train: done") == 1, proc.stdout
    assert proc.stderr.count("held-out greedy accuracy before training") == 1
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["per_device_train_batch_size"] == 4
    saved, initial = load_file(out / "model.safetensors"), load_file(model / "model.safetensors")
    # whole weights, not one process's shards (ZeRO-2 also writes the tied lm_head.weight out)
    assert {k: saved[k].shape for k in initial} == {k: v.shape for k, v in initial.items()}


if __name__ == "__main__":
    # ended as `tepo train` ends a run with a process group: closed by hand and then left to the
    # interpreter's teardown, a gloo worker aborted in CI after its records were written
    # ("terminate called without an active exception", exit -6) and the launch failed
    code = worker_main()
    if process_group_size():
        end_process_group_run(code)
    sys.exit(code)
