"""`tepo report RUN_DIR` on one `tepo train` run: RUN_DIR/report/index.html.

Held-out accuracy, training reward, token entropy, clip fractions and the KL-mask fraction over
the optimiser steps, with the stability monitor's verdicts marked where they started, and a
summary table. Reads only the run's small files (run.json, metrics.jsonl, eval_*.json, monitor.json).
"""

from __future__ import annotations

import datetime as _dt
import html
import math
import os
from pathlib import Path

from tepo.analysis.runs import RunData, heldout_series, load_run, moving_average
from tepo.run_folder import EVAL_TEST_FILE, METRICS_FILE, RUN_FILE, read_json

# (panel title, [(metric key, line label)], as a percentage?)
PANELS = [
    ("held-out accuracy (%)", [("heldout", "greedy, held-out problems")], True),
    ("training reward (batch mean)", [("reward_mean", "reward")], False),
    ("token entropy (nats)", [("entropy_mean", "entropy")], False),
    ("clip fractions", [("clip_frac", "all"), ("clip_frac_low", "low (A<0)"), ("clip_frac_high", "high (A>0)")], False),
    # the mask selects tokens whatever the coefficient; they carry weight only where tepo_kl_coef > 0
    ("KL-mask fraction (acts where tepo_kl_coef > 0)", [("kl_mask_frac", "tokens the mask selects")], False),
]
SEVERITY_COLORS = {"critical": "tab:red", "warning": "tab:orange"}


def _verdicts(run: RunData) -> list[dict]:
    return list((run.monitor or {}).get("verdicts") or [])


def _plot(run: RunData, path: Path, smooth: int) -> bool:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from tepo.analysis.report import save_figure

    panels = []
    for title, lines, pct in PANELS:
        series = []
        for key, label in lines:
            steps, values = heldout_series(run) if key == "heldout" else run.series(key)
            if steps.size:
                smoothed = values if key == "heldout" or smooth <= 1 else moving_average(values, smooth)
                series.append((label, steps, 100 * values if pct else values, 100 * smoothed if pct else smoothed, key))
        if series:
            panels.append((title, series))
    if not panels:
        return False
    ncols = 2
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(11.6, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    verdicts = _verdicts(run)
    for ax, (title, series) in zip(axes.flat, panels):
        for i, (label, steps, raw, smoothed, key) in enumerate(series):
            color = f"C{i}"
            if key == "heldout":
                ax.plot(steps, raw, "o-", color=color, lw=1.8, ms=4, label=label)
            else:
                ax.plot(steps, raw, color=color, lw=0.8, alpha=0.35)
                ax.plot(steps, smoothed, color=color, lw=1.8, label=label + (f" (mean of {smooth})" if smooth > 1 else ""))
        for v in verdicts:
            ax.axvline(v.get("first_step", 0), color=SEVERITY_COLORS.get(v.get("severity"), "grey"), ls="--", lw=1)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimiser step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    if verdicts:
        marks = "; ".join(f"{v.get('kind')} at step {v.get('first_step')}" for v in verdicts)
        fig.suptitle(f"dashed: stability monitor verdicts ({marks})", fontsize=9)
    return save_figure(fig, path)


def _first_last(run: RunData, key: str, n: int = 5) -> tuple[float, float]:
    _, values = run.series(key)
    if not values.size:
        return math.nan, math.nan
    return float(values[:n].mean()), float(values[-n:].mean())


def _fmt(x: float, pct: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{100 * x:.1f}%" if pct else f"{x:.3g}"


def build_run_report(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *, smooth: int = 5) -> Path:
    """Write out_dir (default RUN_DIR/report)/index.html and run.png; return index.html's path."""
    import matplotlib

    matplotlib.use("Agg")
    from tepo.analysis.report import Table, html_page

    run_dir = Path(run_dir)
    if not (run_dir / METRICS_FILE).is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl (is it a `tepo train` output_dir?)")
    if smooth < 1:
        raise ValueError(f"smooth must be >= 1, got {smooth}")
    info = read_json(run_dir / RUN_FILE) if (run_dir / RUN_FILE).is_file() else {}
    config = info.get("config") or {}
    objective = str(config.get("objective") or "?")
    run = load_run(run_dir, objective, int(config.get("seed") or 0))
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    plotted = _plot(run, out / "run.png", smooth)

    rows = [["objective", objective], ["model", str(info.get("model", "?"))], ["optimiser steps", str(int(run.last_step or 0))]]
    if run.eval_before is not None and run.eval_after is not None:
        split = (info.get("script") or {}).get("heldout_split", "test")
        rows.append([f"held-out accuracy ({split} split, greedy, {run.eval_after.get('num_problems')} problems)",
                     f"{_fmt(run.eval_before['accuracy'], True)} -> {_fmt(run.eval_after['accuracy'], True)}"])
    if run.eval_test is not None:
        test = run.eval_test
        rows.append([f"test accuracy (greedy, {test.get('num_problems')} problems)", _fmt(test.get("accuracy"), True)])
    for key, label in (("reward_mean", "training reward"), ("entropy_mean", "token entropy"), ("clip_frac", "clip fraction"),
                       ("kl_mask_frac", "KL-mask fraction")):
        first, last = _first_last(run, key)
        if math.isfinite(first):
            rows.append([f"{label} (mean of the first 5 steps -> last 5)", f"{_fmt(first)} -> {_fmt(last)}"])
    summary = Table("Run", ["", "value"], rows, align_left=2)
    verdicts = _verdicts(run)
    monitor = Table("Stability monitor", ["verdict", "severity", "first step", "last step", "message"],
                    [[str(v.get("kind")), str(v.get("severity")), str(v.get("first_step")), str(v.get("last_step")),
                      str(v.get("message"))] for v in verdicts] or [["none", "", "", "", "no verdict"]],
                    align_left=2, text_last=True,
                    note=f"From {run.monitor_source or 'no monitor data'}; dashed lines in the plots mark where each verdict started.")
    esc = html.escape
    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    figure = ('<figure><img src="run.png" alt="curves"><figcaption>Thin: per step; thick: trailing mean. '
              'Held-out accuracy at step 0 is before training.</figcaption></figure>') if plotted else "<p>No metrics logged yet.</p>"
    command = esc(str(info.get("command", "")))
    index = out / "index.html"
    index.write_text(html_page(f"tepo run: {esc(run_dir.resolve().name)}", f"""<h1>tepo run: {esc(run_dir.resolve().name)}</h1>
<p class=meta>Generated {esc(now)} by <code>tepo report</code> from <code>{esc(str(run_dir.resolve()))}</code>.</p>
<p class=meta><code>{command}</code></p>
{summary.html()}
{figure}
{monitor.html()}
"""))
    return index

