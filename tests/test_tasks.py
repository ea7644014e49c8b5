"""Tasks: the arithmetic generator, prompts, the benchmark registry and load_task."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from tepo.tasks import DataError, build_messages, list_benchmarks, load_benchmark, load_task, make_problems, to_prompt_dataset
from tepo.tasks import benchmarks as bm
from tepo.tasks.arithmetic import TEMPLATES, split_of
from tepo.rewards import extract_answer

DATA_DIR = Path(os.environ.get("TEPO_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
needs_data = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"data folder {DATA_DIR} not found (set TEPO_DATA_DIR)")


# --------------------------------------------------------------------------------------------
# arithmetic


def _template_regex(text: str) -> re.Pattern:
    pattern = re.escape(text)
    for field in ("a", "b", "c"):
        pattern = pattern.replace(re.escape("{" + field + "}"), f"(?P<{field}>[0-9]+)", 1)
        pattern = pattern.replace(re.escape("{" + field + "}"), f"(?P={field})")
    pattern = pattern.replace(re.escape("{objs}"), "(?P<objs>[a-z ]+)", 1).replace(re.escape("{objs}"), "(?P=objs)")
    pattern = pattern.replace(re.escape("{name}"), "(?P<name>[A-Z][a-z]+)", 1).replace(re.escape("{name}"), "(?P=name)")
    return re.compile(pattern.replace(re.escape("{other}"), "[A-Z][a-z]+"))


TEMPLATE_RES = [(t, _template_regex(t.text)) for t in TEMPLATES]


def _decode(problem: str):
    """(template, operands) of a generated problem, read back from its text."""
    matches = [(t, m) for t, m in ((t, rx.fullmatch(problem)) for t, rx in TEMPLATE_RES) if m]
    assert len(matches) == 1, problem
    t, m = matches[0]
    return t, tuple(int(m.group(f)) for f in "abc" if f in m.groupdict())


def test_problems_have_the_promised_shape_levels_and_answers():
    problems = make_problems(600, levels=(1, 2, 3), seed=3)
    assert len(problems) == 600
    assert len({p["id"] for p in problems}) == 600
    assert len({p["problem"] for p in problems}) == 600
    assert [p["level"] for p in problems[:6]] == [1, 2, 3, 1, 2, 3]
    for p in problems:
        template, ops = _decode(p["problem"])
        assert template.level == p["level"]
        assert p["answer"] == str(template.answer(*ops))
        assert int(p["answer"]) >= 0
        if p["level"] == 1:
            assert all(x < 20 for x in ops) and template.id.split("-")[0] in ("add", "sub")
        elif p["level"] == 2:
            bound = 12 if template.id.startswith("mul") else 100
            assert all(x < bound for x in ops)
        else:
            assert len(ops) == 3


def test_deterministic_per_seed_and_prefix_stable():
    assert make_problems(50, seed=7) == make_problems(50, seed=7)
    assert make_problems(50, seed=7) != make_problems(50, seed=8)
    assert make_problems(80, seed=7)[:30] == make_problems(30, seed=7)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_train_and_test_never_share_a_problem(seed):
    train = make_problems(3000, levels=(1, 2, 3), split="train", seed=seed)
    test = make_problems(600, levels=(1, 2, 3), split="test", seed=seed + 100)  # other seed, other n
    train_text = {p["problem"] for p in train}
    assert not train_text & {p["problem"] for p in test}
    train_content = {_decode(p["problem"])[0].id + str(_decode(p["problem"])[1]) for p in train}
    test_content = {_decode(p["problem"])[0].id + str(_decode(p["problem"])[1]) for p in test}
    assert not train_content & test_content  # not even the same arithmetic with other names
    for p in test:
        template, ops = _decode(p["problem"])
        assert split_of(template.id, ops) == "test"


def test_split_assignment_depends_on_content_only():
    shares = [split_of(t.id, (a, b)) == "test" for t in TEMPLATES[:6] for a in range(1, 20) for b in range(1, 20)]
    assert 0.1 < sum(shares) / len(shares) < 0.3  # about TEST_FRACTION of the space


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n": -1}, "non-negative"),
        ({"n": 5, "split": "dev"}, "split must be one of"),
        ({"n": 5, "levels": (4,)}, "levels must be"),
        ({"n": 5, "levels": ()}, "levels must be"),
    ],
)
def test_make_problems_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_problems(**kwargs)


# --------------------------------------------------------------------------------------------
# prompts


def test_build_messages_has_one_worked_example():
    messages = build_messages("What is 2 + 2?")
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[-1]["content"].startswith("What is 2 + 2?")
    assert "\\boxed{}" in messages[-1]["content"] and "\\boxed{}" in messages[0]["content"]
    assert extract_answer(messages[1]["content"]) == "7"
    assert "The final answer is \\boxed{" in messages[1]["content"]
    with pytest.raises(ValueError, match="non-empty string"):
        build_messages("  ")


def test_worked_example_is_not_a_generated_problem():
    from tepo.tasks.prompts import EXAMPLE_PROBLEM

    assert build_messages("x")[0]["content"].startswith(EXAMPLE_PROBLEM)
    assert all(EXAMPLE_PROBLEM != p["problem"] for p in make_problems(500, levels=(1, 2, 3)))


@pytest.mark.slow
def test_messages_render_with_the_smollm2_chat_template():
    from tepo.models import cache_dir

    path = cache_dir() / "models" / "SmolLM2-135M-Instruct"  # no conversion here: only if it exists
    if not (path / "tokenizer_config.json").is_file():
        pytest.skip(f"offline SmolLM2 not converted yet at {path}")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    text = tok.apply_chat_template(build_messages("What is 2 + 2?"), tokenize=False, add_generation_prompt=True)
    assert text.index("Tom has 3") < text.index("\\boxed{7}") < text.index("What is 2 + 2?")
    assert text.rstrip().endswith("assistant")


# --------------------------------------------------------------------------------------------
# benchmarks


EXPECTED_ROWS = {"gsm8k": 1319, "math500": 500, "aime24": 30, "aime25": 30, "amc23": 40, "minerva_math": 272, "olympiadbench": 675}


def test_registry_names():
    assert set(list_benchmarks()) == set(EXPECTED_ROWS)
    with pytest.raises(ValueError, match="unknown benchmark 'mathh'; known: gsm8k, math500"):
        load_benchmark("mathh", data_dir=DATA_DIR)


@needs_data
@pytest.mark.parametrize("name", sorted(EXPECTED_ROWS))
def test_offline_benchmarks_load(name):
    rows = load_benchmark(name, data_dir=DATA_DIR)
    assert len(rows) == EXPECTED_ROWS[name]
    assert all(r["problem"] and r["answer"] and r["id"] for r in rows)
    assert len(load_benchmark(name, data_dir=DATA_DIR, limit=3)) == 3


@needs_data
def test_data_dir_from_environment(monkeypatch):
    monkeypatch.setenv("TEPO_DATA_DIR", str(DATA_DIR))
    assert bm.benchmark_path("aime25") == DATA_DIR / "aime25" / "test.jsonl"
    assert len(load_benchmark("aime25")) == 30


def test_missing_offline_file(tmp_path):
    with pytest.raises(DataError, match="aime24/test.jsonl"):
        load_benchmark("aime24", data_dir=tmp_path)


def test_hub_failure_suggests_data_dir(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.delenv("TEPO_DATA_DIR", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", offline)
    assert bm.benchmark_path("gsm8k") is None
    with pytest.raises(DataError, match="--data_dir"):
        load_benchmark("gsm8k")


def test_hub_rows_are_mapped(monkeypatch):
    import datasets

    fake = {
        "openai/gsm8k": [{"question": "q1", "answer": "3 + 4 = <<3+4=7>>7\n#### 1,007"}],
        "HuggingFaceH4/MATH-500": [{"problem": "p", "answer": "\\frac{1}{2}", "unique_id": "test/algebra/1.json"}],
        "HuggingFaceH4/aime_2024": [{"problem": "p", "answer": "204", "id": 60}],
        "math-ai/aime25": [{"problem": "p", "answer": "70", "id": "0"}],
        "math-ai/amc23": [{"question": "p", "answer": 27.0, "id": 0}],
        "math-ai/minervamath": [{"question": "p", "answer": "1.6"}],
        "Hothan/OlympiadBench": [{"question": "p", "final_answer": ["$2n$"], "id": 1606}],
    }
    calls = []

    def load_dataset(repo, config=None, split=None):
        calls.append((repo, config, split))
        return fake[repo]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    got = {name: load_benchmark(name, hub=True)[0] for name in list_benchmarks()}
    assert got["gsm8k"]["answer"] == "1007" and got["gsm8k"]["problem"] == "q1"
    assert got["math500"]["id"] == "test/algebra/1.json"
    assert got["amc23"]["answer"] == "27"
    assert got["olympiadbench"]["answer"] == "$2n$"
    assert ("openai/gsm8k", "main", "test") in calls
    assert ("Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train") in calls


# --------------------------------------------------------------------------------------------
# load_task and the prompt data set


def test_load_task_needs_exactly_one_source():
    with pytest.raises(ValueError, match="exactly one"):
        load_task()
    with pytest.raises(ValueError, match="exactly one"):
        load_task(task="arithmetic", data="x.jsonl")
    with pytest.raises(ValueError, match="unknown task"):
        load_task(task="chess")


def test_load_task_arithmetic():
    rows = load_task(task="arithmetic", num_problems=10, levels=(2,), split="test", seed=4)
    assert rows == make_problems(10, levels=(2,), split="test", seed=4)


def test_load_task_jsonl(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps({"problem": f"p{i}", "answer": str(i)}) for i in range(5)), encoding="utf-8")
    rows = load_task(data=path, num_problems=3)
    assert [r["id"] for r in rows] == ["mine-1", "mine-2", "mine-3"]
    with pytest.raises(DataError, match="no such file, and not a benchmark name"):
        load_task(data=tmp_path / "missing.jsonl")


@needs_data
def test_load_task_benchmark_by_name():
    rows = load_task(data="amc23", data_dir=DATA_DIR, num_problems=4)
    assert len(rows) == 4 and rows[0]["id"] == "amc23-00"


def test_load_task_hub_prefix(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: [{"problem": "p", "answer": "70", "id": 1}])
    monkeypatch.setenv("TEPO_DATA_DIR", "/nonexistent")  # hub: ignores the offline folder
    assert load_task(data="hub:aime25")[0]["answer"] == "70"
    with pytest.raises(ValueError, match="unknown benchmark 'nope'"):
        load_task(data="hub:nope")


def test_to_prompt_dataset():
    problems = make_problems(4)
    ds = to_prompt_dataset(problems)
    assert ds.column_names == ["prompt", "answer", "id"]
    assert len(ds) == 4
    assert ds[0]["prompt"] == build_messages(problems[0]["problem"])
    assert ds[0]["answer"] == problems[0]["answer"] and ds[0]["id"] == problems[0]["id"]
    with pytest.raises(DataError, match="no problems"):
        to_prompt_dataset([])
