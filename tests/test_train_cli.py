"""`tepo train`: argument errors before any model load, recipes parse, and a tiny end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tepo.training.cli import parse, train_main
from tepo.training.callbacks import METRIC_KEYS, read_metrics

from _tiny_llm import save_tiny, tiny_train_argv

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max_steps", "1"], "--output_dir is required"),
        (["--output_dir", "{out}"], "exactly one of --task arithmetic or --data PATH"),
        (["--output_dir", "{out}", "--task", "arithmetic", "--data", "x.jsonl"], "exactly one of"),
        (["--output_dir", "{out}", "--task", "sudoku"], "unknown task 'sudoku'"),
        (["--output_dir", "{out}", "--task", "arithmetic", "--levels", "one"], "--levels: expected comma-separated integers"),
        (["--output_dir", "{out}", "--task", "arithmetic", "--objective", "ppo"], "objective='ppo' is not known"),
        (["--output_dir", "{out}", "--task", "arithmetic", "--epsilon", "0.3"], "set --clip_low"),
        (["--output_dir", "{out}", "--data", "{bad}", "--heldout_eval", "false"], "bad.jsonl, line 2: missing field"),
        (["--output_dir", "{out}", "--data", "{good}"], "--heldout_data PATH, or --heldout_eval false"),
        (["--output_dir", "{out}", "--task", "arithmetic", "--resume_from_checkpoint", "{out}/checkpoint-9"],
         "not a complete checkpoint"),
        (["--config", "{out}/missing.yaml", "--output_dir", "{out}"], "missing.yaml: no such file"),
    ],
)
def test_bad_arguments_fail_before_any_model_load(tmp_path, capsys, argv, message):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"id": "a", "problem": "1+1?", "answer": "2"}) + "\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "problem": "1+1?", "answer": "2"}) + "\n" + '{"id": "b", "problem": "2+2?"}\n')
    argv = [a.format(out=tmp_path / "run", bad=bad, good=good) for a in argv]
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "run" / "run.json").exists()


def test_unknown_option_is_refused(tmp_path, capsys):
    assert train_main(["--output_dir", str(tmp_path), "--task", "arithmetic", "--no_such_option", "1"]) == 2
    assert "--no_such_option" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", ["quickstart.yaml", "gsm8k-smollm.yaml", "paper-7b.yaml"])
def test_recipes_parse(tmp_path, recipe):
    script, config = parse(["--config", str(RECIPES / recipe), "--output_dir", str(tmp_path)])
    assert config.gradient_accumulation_steps == 1, "recipes keep each optimiser step's loss exact"
    assert config.steps_per_generation > 1, "recipes are off-policy: several optimiser steps per rollout"
    assert (script.task is None) != (script.data is None)


def test_command_line_overrides_the_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: arithmetic\nobjective: dapo\nclip_high: 0.3\nmax_steps: 7\n")
    _, config = parse(["--config", str(recipe), "--output_dir", str(tmp_path), "--objective", "grpo", "--clip_high", "0.25"])
    assert config.objective == "grpo" and config.clip_high == 0.25 and config.max_steps == 7


@pytest.mark.slow
def test_train_end_to_end_on_a_tiny_model(tmp_path, capsys):
    model = save_tiny(tmp_path / "tiny")
    out = tmp_path / "run"
    argv = tiny_train_argv(model, out, save_strategy="steps", save_steps=2, gradient_checkpointing="false")
    assert train_main(argv) == 0
    printed = capsys.readouterr().out
    assert "held-out accuracy" in printed and "sampled reward" in printed
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and set(METRIC_KEYS) <= set(rows[0])
    before = json.loads((out / "eval_before.json").read_text())
    after = json.loads((out / "eval_after.json").read_text())
    assert before["num_problems"] == after["num_problems"] == 4 and before["step"] == 0 and after["step"] == 2
    run = json.loads((out / "run.json").read_text())
    assert run["objective"]["objective"] == "tepo" and run["objective"]["clip_low"] == 0.0003
    assert (out / "model.safetensors").exists() and (out / "checkpoint-2" / "trainer_state.json").exists()

    # resuming a finished run: nothing to redo, eval_before kept, metrics still continuous
    assert train_main(argv + ["--resume_from_checkpoint", "true"]) == 0
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]
    assert json.loads((out / "eval_before.json").read_text()) == before


@pytest.mark.slow
@pytest.mark.parametrize("bf16, autocast", [("false", "none"), ("true", "bf16")])
def test_heldout_evaluations_run_in_the_precision_the_trainer_trains_in(tmp_path, monkeypatch, bf16, autocast):
    """fp32 training is evaluated in fp32, bf16 training under bf16 autocast: the held-out figures
    are those of the policy as trained (and, on a CPU without native bf16, not 2.4x slower)."""
    import tepo.evaluation.runner as runner

    calls = []
    real = runner.greedy_accuracy

    def recording(model_and_tok, problems, **kwargs):
        calls.append(kwargs.get("autocast"))
        return real(model_and_tok, problems, **kwargs)

    monkeypatch.setattr(runner, "greedy_accuracy", recording)
    model = save_tiny(tmp_path / "tiny")
    argv = tiny_train_argv(model, tmp_path / "run", objective="grpo", heldout_num_problems=3,
                           save_strategy="no", bf16=bf16)
    assert train_main(argv) == 0
    assert calls == [autocast, autocast], "before and after"


@pytest.mark.slow
def test_final_heldout_point_is_the_after_evaluation(tmp_path, monkeypatch):
    """With in-training evaluation at the last step, eval_after.json is that evaluation (the same
    weights are not decoded twice, in different batches that could flip bf16 greedy answers), and
    every held-out evaluation uses --heldout_batch_size."""
    import tepo.evaluation.runner as runner

    calls = []
    real = runner.greedy_accuracy

    def recording(model_and_tok, problems, **kwargs):
        calls.append(kwargs["batch_size"])
        return real(model_and_tok, problems, **kwargs)

    monkeypatch.setattr(runner, "greedy_accuracy", recording)
    model = save_tiny(tmp_path / "tiny")
    out = tmp_path / "run"
    argv = tiny_train_argv(model, out, objective="grpo", heldout_num_problems=5, heldout_batch_size=3,
                           heldout_eval_steps=1, save_strategy="no")
    assert train_main(argv) == 0
    assert calls == [3, 3, 3], "before, step 1, step 2 (= after): three evaluations, all at --heldout_batch_size"
    rows = read_metrics(out / "metrics.jsonl")
    after = json.loads((out / "eval_after.json").read_text())
    assert after["step"] == 2 and after["num_problems"] == 5
    assert rows[-1]["heldout_accuracy"] == after["accuracy"]
