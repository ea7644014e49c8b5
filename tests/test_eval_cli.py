"""`tepo eval`: argument checks before any model is loaded, and a full run on a tiny saved model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tepo.cli import main as tepo_main
from tepo.evaluation.cli import eval_main

PROBLEMS = [
    {"id": "p1", "problem": "What is 3 + 4?", "answer": "7"},
    {"id": "p2", "problem": "What is 5 + 5?", "answer": "10"},
    {"id": "p3", "problem": "What is 2 + 3?", "answer": "5"},
]


@pytest.fixture()
def data_dir(tmp_path) -> Path:
    root = tmp_path / "data"
    (root / "gsm8k").mkdir(parents=True)
    (root / "gsm8k" / "test.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    return root


@pytest.fixture()
def no_model_load(monkeypatch):
    """Fail the test if anything tries to resolve or load a model."""
    import tepo.evaluation.runner as runner
    import tepo.models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded although the arguments are invalid")

    monkeypatch.setattr(tepo.models, "resolve_model", refuse)
    monkeypatch.setattr(runner, "load_backend", refuse)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--n", "4", "--k", "1,8"], "--k: each k must be between 1 and --n 4; got [8]"),
        (["--benchmarks", "gsm8k,aime2099"], "--benchmarks: unknown 'aime2099'; known: gsm8k, math500"),
        (["--n", "4", "--temperature", "0"], "--temperature must be > 0"),
        (["--n", "0"], "--n must be >= 1 (or 0 together with --greedy)"),
        (["--top_p", "1.5"], "--top_p must be in (0, 1]"),
        (["--limit", "0"], "--limit must be >= 1"),
        (["--max_new_tokens", "0"], "--max_new_tokens must be >= 1"),
        (["--benchmarks", "gsm8k,gsm8k"], "named twice"),
    ],
)
def test_bad_arguments_are_refused_before_loading_a_model(extra, message, data_dir, tmp_path, capsys, no_model_load):
    argv = ["--data_dir", str(data_dir), "--output_dir", str(tmp_path / "out"), *extra]
    assert eval_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert not (tmp_path / "out").exists()


def test_missing_data_file_is_named(tmp_path, capsys, no_model_load):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert eval_main(["--benchmarks", "gsm8k,math500", "--data_dir", str(empty), "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{empty}/gsm8k/test.jsonl not found" in err and f"{empty}/math500/test.jsonl not found" in err


def test_all_benchmarks_are_checked_for_data_files(tmp_path, capsys, no_model_load):
    assert eval_main(["--benchmarks", "all", "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    for name in ("gsm8k", "math500", "aime24", "aime25", "amc23", "minerva_math", "olympiadbench"):
        assert f"{tmp_path}/{name}/test.jsonl not found" in err


def test_a_k_list_that_is_not_numbers(tmp_path, capsys, no_model_load):
    with pytest.raises(SystemExit) as exit_info:
        eval_main(["--k", "1,four", "--output_dir", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert "expected comma-separated integers" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tepo.models import resolve_model

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(None))
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"SmolLM2 tokenizer unavailable: {err}")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    path = tmp_path_factory.mktemp("tiny-model")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_full_run_resume_and_mismatch_through_the_tepo_command(tiny_model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [
        "eval", "--model", str(tiny_model_dir), "--benchmarks", "gsm8k", "--data_dir", str(data_dir), "--n", "2",
        "--k", "1,2", "--greedy", "--max_new_tokens", "4", "--output_dir", str(out), "--backend", "hf", "--batch_size", "4",
        "--no_progress",
    ]
    assert tepo_main(argv) == 0
    printed = capsys.readouterr().out
    assert "| gsm8k | 3 |" in printed and "gsm8k: 9 new samples, 0 reused" in printed
    results = json.loads((out / "results.json").read_text())
    g = results["benchmarks"]["gsm8k"]
    assert g["num_problems"] == 3 and g["mean_completion_tokens"] == 4 and set(g["ci"]) == {"avg@2", "pass@1", "pass@2", "maj@1", "maj@2", "greedy"}
    assert results["config"]["model"] == str(tiny_model_dir)
    assert len((out / "samples.jsonl").read_text().splitlines()) == 9
    assert (out / "results.md").is_file()

    assert tepo_main(argv) == 0  # resumed: nothing left to generate
    assert "gsm8k: 0 new samples, 9 reused" in capsys.readouterr().out

    assert tepo_main([*argv, "--temperature", "0.9"]) == 2
    assert "temperature: was 0.6, now 0.9" in capsys.readouterr().err
