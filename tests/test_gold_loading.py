"""Gold answers are prepared when the data is loaded: `tepo train` and `tepo eval` report a gold
answer that cannot be judged, with its source, row and problem id, before any model is loaded."""

from __future__ import annotations

import json

import pytest

from tepo.evaluation.cli import eval_main
from tepo.evaluation.runner import evaluate
from tepo.rewards import GoldError
from tepo.training.cli import train_main

ROWS = [{"id": "ok-1", "problem": "1+1?", "answer": "2"},
        {"id": "ok-2", "problem": "Solve.", "answer": "x \\in [-2,7]"},
        {"id": "broken-gold", "problem": "2+2?", "answer": "\\"}]


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_train_reports_a_bad_gold_before_any_model_load(tmp_path, capsys):
    data = _write(tmp_path / "train.jsonl", ROWS)
    argv = ["--output_dir", str(tmp_path / "run"), "--data", str(data), "--heldout_eval", "false",
            "--model", str(tmp_path / "no-such-model")]
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert f"{data}, row 3 (id 'broken-gold')" in err and "cannot parse the gold answer" in err, err
    assert not (tmp_path / "run" / "run.json").exists()


def test_eval_reports_a_bad_gold_before_the_model_loads(tmp_path, capsys):
    _write(tmp_path / "data" / "amc23" / "test.jsonl", ROWS)
    with pytest.raises(GoldError, match=r"benchmark amc23, row 3 \(id 'broken-gold'\)"):
        evaluate(str(tmp_path / "no-such-model"), benchmarks=["amc23"], n=1, data_dir=tmp_path / "data",
                 output_dir=tmp_path / "out")
    argv = ["--model", str(tmp_path / "no-such-model"), "--benchmarks", "amc23", "--data_dir", str(tmp_path / "data"),
            "--output_dir", str(tmp_path / "out"), "--n", "1"]
    assert eval_main(argv) == 2
    assert "row 3 (id 'broken-gold')" in capsys.readouterr().err
    assert not (tmp_path / "out" / "config.json").exists()
