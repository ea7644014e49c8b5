"""The untrained model's held-out evaluation, reused across runs (tepo.training.baseline_eval_cache)."""

from __future__ import annotations

import json

import pytest

from tepo.training import baseline_eval_cache as cache
from tepo.training.cli import train_main

from _tiny_llm import save_tiny, tiny_train_argv

PROBLEMS = [{"id": "a", "problem": "1+1?", "answer": "2"}, {"id": "b", "problem": "2+3?", "answer": "5"}]
SETTINGS = dict(max_new_tokens=8, batch_size=4, dtype="torch.float32", bf16=False, device="cpu")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """On (tests/conftest.py turns it off for the others), in this test's own folder."""
    monkeypatch.setenv("TEPO_BASELINE_EVALS", str(tmp_path / "baseline-evals"))


def test_the_key_changes_with_everything_the_result_depends_on(tmp_path, monkeypatch):
    model = save_tiny(tmp_path / "tiny")
    key = cache.baseline_eval_key(str(model), PROBLEMS, **SETTINGS)
    assert key and key == cache.baseline_eval_key(str(model), [dict(p) for p in PROBLEMS], **SETTINGS)
    assert cache.baseline_eval_key(str(model), PROBLEMS, **SETTINGS, model_config={"_name_or_path": "x"}) == key
    copy = save_tiny(tmp_path / "same-content-elsewhere")
    assert cache.baseline_eval_key(str(copy), PROBLEMS, **SETTINGS) == key, "the content, not the path"

    changed = {
        "max_new_tokens": dict(SETTINGS, max_new_tokens=9),
        "batch_size": dict(SETTINGS, batch_size=3),
        "dtype": dict(SETTINGS, dtype="torch.bfloat16"),
        "bf16": dict(SETTINGS, bf16=True),
        "model_config": dict(SETTINGS, model_config={"_attn_implementation": "eager"}),
    }
    for what, settings in changed.items():
        assert cache.baseline_eval_key(str(model), PROBLEMS, **settings) != key, what
    other_gold = [PROBLEMS[0], dict(PROBLEMS[1], answer="6")]
    assert cache.baseline_eval_key(str(model), other_gold, **SETTINGS) != key, "problems"
    assert cache.baseline_eval_key(str(model), PROBLEMS[:1], **SETTINGS) != key, "problems"

    other_weights = save_tiny(tmp_path / "other-weights", seed=1)
    assert cache.baseline_eval_key(str(other_weights), PROBLEMS, **SETTINGS) != key, "weights"
    config = model / "config.json"
    config.write_text(config.read_text() + "\n")
    assert cache.baseline_eval_key(str(model), PROBLEMS, **SETTINGS) != key, "any file of the model folder"

    real_digest = cache.tepo_source_digest()
    monkeypatch.setattr(cache, "tepo_source_digest", lambda: real_digest + "x")
    assert cache.baseline_eval_key(str(copy), PROBLEMS, **SETTINGS) != key, "tepo's code"


def test_no_key_without_a_model_folder_or_plain_json_problems(tmp_path):
    assert cache.baseline_eval_key("HuggingFaceTB/SmolLM2-135M-Instruct", PROBLEMS, **SETTINGS) is None
    model = save_tiny(tmp_path / "tiny")
    assert cache.baseline_eval_key(str(model), [dict(PROBLEMS[0], extra=object())], **SETTINGS) is None


def test_a_stored_result_reads_back_and_an_unreadable_one_is_ignored():
    assert cache.load_baseline_eval("k1") is None
    result = {"accuracy": 0.5, "ids": ["a", "b"], "verdicts": [True, False], "answers": ["2", "4"]}
    cache.store_baseline_eval("k1", result)
    assert cache.load_baseline_eval("k1") == result
    (cache.cache_dir() / "k2.json").write_text('{"accuracy": 0.5, "ids"')  # torn
    (cache.cache_dir() / "k3.json").write_text('["not", "a", "result"]')
    assert cache.load_baseline_eval("k2") is None and cache.load_baseline_eval("k3") is None


def test_off_stores_and_reads_nothing(monkeypatch):
    cache.store_baseline_eval("k1", {"verdicts": [True]})
    monkeypatch.setenv("TEPO_BASELINE_EVALS", "off")
    assert cache.cache_dir() is None and cache.load_baseline_eval("k1") is None
    cache.store_baseline_eval("k4", {"verdicts": [True]})  # no error, nothing written


@pytest.mark.slow
def test_a_second_run_reuses_the_untrained_models_evaluation(tmp_path, monkeypatch, capsys):
    """The second run of the same model on the same held-out problems does not decode them before
    training again: its eval_before.json is the first run's (marked cached_from). With the cache
    off, the evaluation runs and gives the same verdicts (what makes reusing it exact)."""
    import tepo.evaluation.runner as runner

    calls = []
    real = runner.greedy_accuracy

    def recording(model_and_tok, problems, **kwargs):
        calls.append(len(problems))
        return real(model_and_tok, problems, **kwargs)

    monkeypatch.setattr(runner, "greedy_accuracy", recording)
    model = save_tiny(tmp_path / "tiny")
    common = dict(objective="grpo", heldout_num_problems=5, save_strategy="no")

    assert train_main(tiny_train_argv(model, tmp_path / "first", **common)) == 0
    assert calls == [5, 5], "before and after"
    first = json.loads((tmp_path / "first" / "eval_before.json").read_text())
    assert "cached_from" not in first and list(cache.cache_dir().glob("*.json"))
    capsys.readouterr()

    calls.clear()
    assert train_main(tiny_train_argv(model, tmp_path / "second", objective="dapo", heldout_num_problems=5,
                                      save_strategy="no")) == 0
    assert calls == [5], "after only: the untrained model's evaluation was reused"
    second = json.loads((tmp_path / "second" / "eval_before.json").read_text())
    assert second.pop("cached_from") and second == first
    assert "(reused: same model, problems, settings and code" in capsys.readouterr().err

    calls.clear()
    assert train_main(tiny_train_argv(model, tmp_path / "third", heldout_eval_cache="false", **common)) == 0
    assert calls == [5, 5], "--heldout_eval_cache false: evaluated"
    third = json.loads((tmp_path / "third" / "eval_before.json").read_text())
    assert "cached_from" not in third
    for field in ("ids", "verdicts", "answers", "accuracy", "truncated", "mean_completion_tokens"):
        assert third[field] == first[field], field

    calls.clear()
    assert train_main(tiny_train_argv(model, tmp_path / "fourth", heldout_num_problems=4, objective="grpo",
                                      save_strategy="no")) == 0
    assert calls == [4, 4], "other problems: evaluated"
