"""Local JSONL problem files (tepo.tasks.data.load_jsonl)."""

from __future__ import annotations

import json

import pytest

from tepo.tasks.data import DataError, load_jsonl


def write(tmp_path, lines, name="probs.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    return path


def test_good_file(tmp_path):
    path = write(tmp_path, [
        {"id": "a", "problem": "1+1?", "answer": "2", "solution": "1+1=2"},
        "",  # blank lines are skipped
        {"problem": "2+2?", "answer": 4},
        {"id": 7, "problem": "half?", "answer": 0.5},
        {"problem": "27?", "answer": 27.0},
    ])
    rows = load_jsonl(path)
    assert [r["id"] for r in rows] == ["a", "probs-3", "7", "probs-5"]
    assert [r["answer"] for r in rows] == ["2", "4", "0.5", "27"]
    assert rows[0]["solution"] == "1+1=2"  # other fields are kept
    assert rows.skipped == 0 and rows.errors == []


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "line 2: not valid JSON"),
        ("[1, 2]", "line 2: a row must be a JSON object"),
        (json.dumps({"answer": "1"}), "line 2: missing field 'problem'"),
        (json.dumps({"problem": "p"}), "line 2: missing field 'answer'"),
        (json.dumps({"problem": "", "answer": "1"}), "line 2: 'problem' is empty"),
        (json.dumps({"problem": "p", "answer": "  "}), "line 2: 'answer' is empty"),
        (json.dumps({"problem": 5, "answer": "1"}), "line 2: 'problem' must be a string, got int"),
        (json.dumps({"problem": "p", "answer": None}), "line 2: 'answer' must be a string \\(or a number\\), got NoneType"),
        (json.dumps({"problem": "p", "answer": True}), "'answer' must be a string"),
        (json.dumps({"problem": "p", "answer": ["1"]}), "'answer' must be a string"),
        (json.dumps({"problem": "p", "answer": float("nan")}), "'answer' must be finite"),
        (json.dumps({"id": ["x"], "problem": "p", "answer": "1"}), "'id' must be a string or an integer"),
        (json.dumps({"id": "a", "problem": "p", "answer": "1"}), "line 2: duplicate id 'a' \\(first on line 1\\)"),
    ],
)
def test_bad_row_names_file_and_line(tmp_path, line, message):
    path = write(tmp_path, [{"id": "a", "problem": "first", "answer": "1"}, line, {"problem": "third", "answer": "3"}])
    with pytest.raises(DataError, match=message) as info:
        load_jsonl(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)
    rows = load_jsonl(path, on_error="skip")
    assert [r["problem"] for r in rows] == ["first", "third"]
    assert rows.skipped == 1 and "line 2" in rows.errors[0]


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"problem": "p", "answer": "1"}\n{"problem": "caf\xe9", "answer": "1"}\n')
    with pytest.raises(DataError, match="line 2: not UTF-8"):
        load_jsonl(path)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_jsonl(tmp_path / "nope.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty.jsonl: no usable problems: the file has no rows"):
        load_jsonl(empty)


def test_all_rows_bad_even_when_skipping(tmp_path):
    path = write(tmp_path, ["{oops", {"problem": "p"}])
    with pytest.raises(DataError, match="all 2 rows are bad"):
        load_jsonl(path, on_error="skip")


def test_on_error_value(tmp_path):
    path = write(tmp_path, [{"problem": "p", "answer": "1"}])
    with pytest.raises(ValueError, match="on_error must be one of"):
        load_jsonl(path, on_error="ignore")
