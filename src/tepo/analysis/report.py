"""The renderer: `Table`, the CSS and the plots (public helpers every report uses), and `tepo report DIR`:
plots and tables of a comparison folder, as DIR/report/index.html + summary.md.

The HTML is self-contained (inline CSS, no JavaScript); plots are PNG files beside it, referenced
by relative paths, so the report folder can be copied or served as is.
"""

from __future__ import annotations

import datetime as _dt
import html
import math
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.ticker import MaxNLocator

from tepo.analysis.runs import (
    RunData,
    RunSet,
    accuracy_table,
    aggregate_over_seeds,
    final_accuracy,
    heldout_series,
    load_comparison,
    moving_average,
    steps_to_target,
)
from tepo.analysis.stats import mean_std_ci
from tepo.analysis.entropy_law import EntropyLawFit, fit_entropy_law

# (metric key, panel title, smooth it?, log y?)
CURVES: dict[str, list[tuple[str, str, bool, bool]]] = {
    "reward": [("reward_mean", "training reward (mean over the batch)", True, False),
               ("zero_var_frac", "fraction of groups with zero reward variance", True, False)],
    "entropy": [("entropy_mean", "mean token entropy (nats)", True, False)],
    "clip": [("clip_frac", "clip fraction", True, False), ("clip_frac_low", "clipped low (A<0)", True, False),
             ("clip_frac_high", "clipped high (A>0)", True, False)],
    "length": [("completion_len_mean", "mean completion length (tokens)", True, False),
               ("truncated_frac", "fraction of completions truncated", True, False)],
    "kl": [("approx_kl", "approx KL(pi_old || pi_theta)", True, True),
           ("ratio_max", "max importance ratio", True, True)],
    "optim": [("grad_norm", "gradient norm", True, True), ("step_time_s", "seconds per step", False, False)],
    # the controllers' coefficients, as each step used them (docs/controls.md; only runs that logged them)
    "controls": [("tepo_kl_coef", "TEPO KL-mask coefficient (adaptive TEPO)", False, False),
                 ("adaptive_tepo_target", "adaptive TEPO entropy target H* (nats)", False, False),
                 ("entropy_coef", "entropy bonus coefficient (adaptive entropy)", False, False)],
}


@dataclass
class Table:
    """A table rendered both to HTML and to Markdown, so the two never disagree."""

    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""
    align_left: int = 1  # how many leading columns are text (left-aligned)
    text_last: bool = False  # the last column is text too

    def _is_num(self, i: int) -> bool:
        return i >= self.align_left and not (self.text_last and i == len(self.headers) - 1)

    def markdown(self) -> str:
        lines = [f"### {self.title}", ""]
        lines.append("| " + " | ".join(self.headers) + " |")
        lines.append("|" + "|".join("---:" if self._is_num(i) else ":---" for i in range(len(self.headers))) + "|")
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in self.rows]
        if self.note:
            lines += ["", self.note]
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        esc = html.escape
        head = "".join(f"<th>{esc(h)}</th>" for h in self.headers)
        body = "".join(
            "<tr>" + "".join(f"<td{' class=num' if self._is_num(i) else ''}>{esc(c)}</td>" for i, c in enumerate(row)) + "</tr>"
            for row in self.rows
        )
        note = f"<p class=note>{esc(self.note)}</p>" if self.note else ""
        return f"<h3>{esc(self.title)}</h3><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{note}"


@dataclass
class Report:
    tables: dict[str, Table] = field(default_factory=dict)
    figures: list[tuple[str, str, str, str]] = field(default_factory=list)  # (section, file, title, caption)
    fits: dict[str, Any] = field(default_factory=dict)
    target: dict[str, Any] = field(default_factory=dict)
    accuracy: list[dict] = field(default_factory=list)


def _pct(x: float, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f}" if x is not None and math.isfinite(x) else "–"


def _num(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}g}" if x is not None and math.isfinite(x) else "–"


def _ci(stats: dict, scale: float = 100.0, digits: int = 1) -> str:
    lo, hi = stats["ci_low"], stats["ci_high"]
    return f"[{scale * lo:.{digits}f}, {scale * hi:.{digits}f}]" if math.isfinite(lo) and math.isfinite(hi) else "–"


def group_colors(groups: Sequence[str]) -> dict[str, Any]:
    """One colour per group (objective or study arm), in order: the same in every plot of a report."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {g: cmap(i % 10) for i, g in enumerate(groups)}


# ---- figures ---------------------------------------------------------------------------------
def save_figure(fig, path: Path) -> bool:
    """Lay out, write (PNG, 100 dpi) and close a figure; True, for the plot functions to return."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _scale_y(ax, values: np.ndarray, logy: bool) -> None:
    """Log scale when asked and the data span more than a decade; no offset tick labels; a flat
    line gets a visible range instead of float-rounding noise."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return
    lo, hi = float(values.min()), float(values.max())
    if logy and lo > 0 and hi / lo > 10:
        ax.set_yscale("log")
        return
    ax.ticklabel_format(axis="y", useOffset=False)
    if hi - lo <= 1e-9 * max(1.0, abs(hi)):
        pad = 0.1 * abs(hi) if hi else 1.0
        ax.set_ylim(lo - pad, hi + pad)


def plot_curves(comp: RunSet, panels, path: Path, smooth: int, colors) -> bool:
    """One figure, one panel per metric that some run logged; line = mean over seeds, band = min-max."""
    import matplotlib.pyplot as plt

    present = [p for p in panels if any(r.series(p[0])[0].size for r in comp.runs)]
    if not present:
        return False
    ncols = min(2, len(present))  # at most two panels a row, so the text stays readable on a page
    nrows = math.ceil(len(present) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.6 * ncols + 0.4, 4.0 * nrows), squeeze=False)
    for ax in axes.flat[len(present):]:
        ax.set_visible(False)
    for ax, (key, title, smoothed, logy) in zip(axes.flat, present):
        for objective, runs in comp.by_objective().items():
            per_seed = []
            for r in runs:
                s, v = r.series(key)
                per_seed.append((s, moving_average(v, smooth) if smoothed else v))
            band = aggregate_over_seeds(per_seed)
            if band is None:
                continue
            ax.plot(band.steps, band.mean, color=colors[objective], lw=1.8, label=f"{objective} (n={len(runs)})")
            if len(runs) > 1:
                ax.fill_between(band.steps, band.low, band.high, color=colors[objective], alpha=0.18, lw=0)
        _scale_y(ax, np.concatenate([r.series(key)[1] for r in comp.runs]), logy)
        ax.set_title(title + (f"\n(trailing mean over {smooth} steps)" if smoothed and smooth > 1 else ""), fontsize=10)
        ax.set_xlabel("optimiser step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="best")
    return save_figure(fig, path)


def plot_heldout(comp: RunSet, path: Path, colors) -> bool:
    import matplotlib.pyplot as plt

    if not any(heldout_series(r)[0].size for r in comp.runs):
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for objective, runs in comp.by_objective().items():
        band = aggregate_over_seeds([heldout_series(r) for r in runs])
        if band is None:
            continue
        ax.plot(band.steps, 100 * band.mean, "o-", color=colors[objective], lw=1.8, ms=4, label=f"{objective} (n={len(runs)})")
        if len(runs) > 1:
            ax.fill_between(band.steps, 100 * band.low, 100 * band.high, color=colors[objective], alpha=0.18, lw=0)
    _scale_y(ax, 100 * np.concatenate([heldout_series(r)[1] for r in comp.runs]), False)
    ax.set_ylim(bottom=max(0.0, ax.get_ylim()[0]))
    ax.set_xlabel("optimiser step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("held-out accuracy (step 0 = before training)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def entropy_law_points(run: RunData, performance: str, smooth: int) -> tuple[np.ndarray, np.ndarray]:
    """(entropy, performance) pairs of one run. Held-out accuracy is joined to the entropy logged at
    the same step; the training reward is paired step by step, both as trailing means over `smooth`."""
    es, ev = run.series("entropy_mean")
    if performance == "heldout_accuracy":
        ps, pv = run.series("heldout_accuracy")
        by_step = dict(zip(es.tolist(), ev.tolist()))
        pairs = [(by_step[s], p) for s, p in zip(ps.tolist(), pv.tolist()) if s in by_step]
        return np.asarray([h for h, _ in pairs]), np.asarray([p for _, p in pairs])
    rs, rv = run.series("reward_mean")
    common, ei, ri = np.intersect1d(es, rs, return_indices=True)
    return moving_average(ev[ei], smooth), moving_average(rv[ri], smooth)


def fit_entropy_laws(comp: RunSet, smooth: int) -> dict[str, Any]:
    """Fit R = -a exp(H) + b per objective (seeds pooled). R is held-out accuracy when every
    objective has >= 3 held-out points with entropy, else the smoothed training reward."""
    by_obj = comp.by_objective()

    def points(metric):
        out = {}
        for objective, runs in by_obj.items():
            pairs = [entropy_law_points(r, metric, smooth) for r in runs]
            out[objective] = (np.concatenate([h for h, _ in pairs]) if pairs else np.array([]),
                              np.concatenate([p for _, p in pairs]) if pairs else np.array([]))
        return out

    metric = "heldout_accuracy"
    data = points(metric)
    if not all(h.size >= 3 for h, _ in data.values()):
        metric = "reward_mean"
        data = points(metric)
    fits: dict[str, EntropyLawFit | str] = {}
    for objective, (h, r) in data.items():
        try:
            fits[objective] = fit_entropy_law(h, r)
        except ValueError as err:
            fits[objective] = str(err).split(": ", 1)[-1]
    return {"metric": metric, "fits": fits, "points": data}


def _plot_entropy_law(law: dict[str, Any], path: Path, colors) -> bool:
    import matplotlib.pyplot as plt

    if not any(h.size for h, _ in law["points"].values()):
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for objective, (h, r) in law["points"].items():
        if not h.size:
            continue
        ax.scatter(h, r, s=16, alpha=0.6, color=colors[objective], edgecolors="white", linewidths=0.4, zorder=3)
        fit = law["fits"].get(objective)
        if isinstance(fit, EntropyLawFit):
            grid = np.linspace(0.0, float(np.max(h)) * 1.05, 100)
            ax.plot(grid, fit.predict(grid), color=colors[objective], lw=1.8,
                    label=f"{objective}: a={fit.a:.3g}, b={fit.b:.3g}, ceiling={fit.ceiling:.3g}")
        else:
            ax.plot([], [], color=colors[objective], label=f"{objective}: no fit")
    ax.set_xlabel("mean token entropy H (nats)")
    ax.set_ylabel("held-out accuracy" if law["metric"] == "heldout_accuracy" else "training reward")
    ax.set_title("entropy-performance law R = -a exp(H) + b (lines extend to H = 0)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def _plot_pass_curves(comp: RunSet, benches: list[str], path: Path, colors) -> bool:
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    def curve(run, bench):
        c = (run.results or {}).get("benchmarks", {}).get(bench, {}).get("pass_curve")
        if not isinstance(c, dict) or not c:
            return None
        ks = np.asarray(sorted(int(k) for k in c), dtype=float)
        return ks, np.asarray([float(c[str(int(k))] if str(int(k)) in c else c[int(k)]) for k in ks])

    shown = [b for b in benches if any(curve(r, b) is not None for r in comp.runs)][:8]
    if not shown:
        return False
    ncols = min(3, len(shown))
    nrows = math.ceil(len(shown) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.8 * ncols + 0.4, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[len(shown):]:
        ax.set_visible(False)
    for ax, bench in zip(axes.flat, shown):
        for objective, runs in comp.by_objective().items():
            band = aggregate_over_seeds([c for r in runs if (c := curve(r, bench)) is not None])
            if band is None:
                continue
            ax.plot(band.steps, 100 * band.mean, "o-", ms=3, color=colors[objective], label=objective)
        ax.set_xscale("log", base=2)
        ks = sorted({int(k) for r in comp.runs if (c := curve(r, bench)) is not None for k in c[0]})
        ax.set_xticks([k for k in ks if k & (k - 1) == 0])  # powers of two
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"{bench}: pass@k", fontsize=10)
        ax.set_xlabel("k")
        ax.set_ylabel("%")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return save_figure(fig, path)


# ---- tables ----------------------------------------------------------------------------------
def _accuracy_table(rows: list[dict], confidence: float) -> Table:
    out = []
    for row in rows:
        a, g = row["after"], row["gain"]
        per_seed = ", ".join(f"s{s}: {_pct(v)}" for s, v in row["per_seed"].items())
        out.append([row["objective"], str(a["n"]), _pct(row["before"]),
                    f"{_pct(a['mean'])} ± {_pct(a['std'])}" if a["n"] > 1 else _pct(a["mean"]),
                    _ci(a), f"{'+' if g['mean'] >= 0 else ''}{_pct(g['mean'])}" if g["n"] else "–", per_seed])
    sources = sorted({s for row in rows for s in row["sources"]})
    problems = sorted({p for row in rows for p in row["num_problems"]})
    note = (f"Accuracy in %. Mean ± sample std over seeds; {int(100 * confidence)}% CI = Student-t interval of the mean "
            f"over seeds (needs >= 2 seeds). Final accuracy from {', '.join(sources) or 'nowhere'}"
            + (f"; {', '.join(map(str, problems))} held-out problems." if problems else "."))
    return Table("Final held-out accuracy", ["objective", "seeds", "before", "after (mean ± std)",
                                             f"{int(100 * confidence)}% CI", "gain", "per seed"], out, note, text_last=True)


def _target_table(target: dict[str, Any]) -> Table:
    rows = []
    for objective, info in target["per_objective"].items():
        st = info["steps"]
        steps = f"{st['mean']:.1f} ± {st['std']:.1f}" if st["n"] > 1 else (f"{st['mean']:.0f}" if st["n"] else "–")
        if target["problem"]:
            steps = "–"
        per_seed = ", ".join(f"s{s}: {'–' if not math.isfinite(v) else int(v)}{'' if info['reached_per_seed'][s] else '+'}"
                             for s, v in info["per_seed"].items())
        rows.append([objective, f"{info['reached']}/{info['runs']}", steps, per_seed])
    scale = 100 if target["metric"] == "held-out accuracy" else 1
    fmt = (lambda x: f"{_pct(x)}%") if scale == 100 else (lambda x: _num(x, 3))
    how = ("given with --target" if target["target_given"]
           else f"midpoint between the start ({fmt(target['start'])}) and the best objective's final mean ({fmt(target['best_final'])})")
    note = (f"Target: {target['metric']} >= {fmt(target['target'])}, {how}. Steps: mean ± std over the seeds; a run "
            "that never reached it counts as its last evaluated step plus one evaluation interval (marked +): a lower "
            "bound. Resolution is the held-out evaluation interval when held-out accuracy is used.")
    if target["problem"]:
        note = f"Target ({target['metric']}): {target['problem']}."
    return Table("Steps to reach the target", ["objective", "reached", "steps (mean ± std)", "per seed"], rows, note, text_last=True)


def _fit_table(law: dict[str, Any]) -> Table:
    rows, notes = [], []
    for objective, fit in law["fits"].items():
        if isinstance(fit, EntropyLawFit):
            rows.append([objective, str(fit.n), f"{fit.a:.4f}", f"{fit.b:.4f}", f"{fit.ceiling:.4f}",
                         f"{fit.r2:.3f}" if math.isfinite(fit.r2) else "–", f"{fit.rmse:.2g}"])
        else:
            rows.append([objective, "0", "–", "–", "–", "–", "–"])
            notes.append(f"{objective}: no fit ({fit})")
    what = ("held-out accuracy" if law["metric"] == "heldout_accuracy"
            else "training reward (trailing means of reward and entropy)")
    note = (f"R = {what}, H = mean token entropy, seeds pooled. Ceiling = b - a, the law's prediction at H = 0 "
            "(Cui et al. 2025, Eq. 6). a > 0 means performance rises as entropy is spent." + "".join(f" {n}." for n in notes))
    return Table("Entropy-performance law fit, R = -a exp(H) + b", ["objective", "points", "a", "b", "ceiling (b-a)", "R²", "RMSE"], rows, note)


def _ci_pair(ci: Any, key: str) -> tuple[float, float] | None:
    value = ci.get(key) if isinstance(ci, dict) else None
    if isinstance(value, (list, tuple)) and len(value) == 2:
        lo, hi = value
    elif isinstance(value, dict):
        lo, hi = value.get("low", value.get("lo")), value.get("high", value.get("hi"))
    else:
        return None
    try:
        return float(lo), float(hi)
    except (TypeError, ValueError):
        return None


def _is_estimate(key: str, value: Any) -> bool:
    return isinstance(value, (int, float)) and (key == "greedy" or (key.split("@")[0] in ("avg", "pass", "maj") and "@" in key))


def _estimate_order(key: str) -> tuple:
    head, _, k = key.partition("@")
    return ({"greedy": 0, "avg": 1, "pass": 2, "maj": 3}.get(head, 9), int(k) if k.isdigit() else 0)


def _results_tables(comp: RunSet, confidence: float) -> tuple[list[Table], list[str]]:
    benches = list(dict.fromkeys(b for r in comp.runs if r.results for b in r.results["benchmarks"]))
    tables = []
    for bench in benches:
        keys = sorted({k for r in comp.runs if r.results for k, v in r.results["benchmarks"].get(bench, {}).items() if _is_estimate(k, v)},
                      key=_estimate_order)
        rows = []
        for objective, runs in comp.by_objective().items():
            have = [r for r in runs if r.results and bench in r.results["benchmarks"]]
            if not have:
                continue
            cells = [objective, str(len(have))]
            for key in keys:
                values = [float(r.results["benchmarks"][bench][key]) for r in have if key in r.results["benchmarks"][bench]]
                stats = mean_std_ci(values, confidence)
                if stats["n"] >= 2:
                    cells.append(f"{_pct(stats['mean'])} {_ci(stats)}")
                elif stats["n"] == 1:
                    pair = _ci_pair(have[0].results["benchmarks"][bench].get("ci"), key)
                    cells.append(f"{_pct(stats['mean'])} [{_pct(pair[0])}, {_pct(pair[1])}]" if pair else _pct(stats["mean"]))
                else:
                    cells.append("–")
            rows.append(cells)
        problems = sorted({str(r.results["benchmarks"][bench].get("num_problems", "?")) for r in comp.runs if r.results and bench in r.results["benchmarks"]})
        note = (f"% over {'/'.join(problems)} problems. With >= 2 seeds: mean over seeds [{int(100 * confidence)}% t-interval over seeds]; "
                "with 1 seed: the run's own bootstrap CI over problems from its results.json.")
        tables.append(Table(f"{bench}: greedy / avg@n / pass@k / maj@k (%)", ["objective", "seeds", *keys], rows, note))
    return tables, benches


def _monitor_table(comp: RunSet) -> Table:
    rows = []
    for run in sorted(comp.runs, key=lambda r: (comp.objectives.index(r.objective), r.seed)):
        m = run.monitor or {}
        verdicts = m.get("verdicts", [])
        text = "; ".join(
            f"{v['kind']} ({v['severity']}) from step {v['first_step']}"
            + (f" to {v['last_step']}" if v.get("last_step", -1) not in (-1, v["first_step"]) else "")
            + f": {v.get('message', '')}"
            for v in verdicts
        ) or ("healthy" if m else "no metrics")
        stop = f" Stopped early at step {m['stopped_early_at']}." if m.get("stopped_early_at") is not None else ""
        rows.append([run.name, run.monitor_source or "–", text + stop])
    note = "Verdicts of tepo.stability.StabilityMonitor (written by the run, or replayed here with default thresholds)."
    return Table("Monitor verdicts per run", ["run", "source", "verdicts"], rows, note, align_left=3)


def _runs_table(comp: RunSet, smooth: int) -> Table:
    rows = []
    for run in sorted(comp.runs, key=lambda r: (comp.objectives.index(r.objective), r.seed)):
        _, reward = run.series("reward_mean")
        _, entropy = run.series("entropy_mean")
        _, step_time = run.series("step_time_s")
        rows.append([
            run.name, run.status or "–", str(len(run.rows)),
            _num(float(np.mean(reward[:smooth])), 3) + " → " + _num(float(np.mean(reward[-smooth:])), 3) if reward.size else "–",
            _num(float(np.mean(entropy[:smooth])), 3) + " → " + _num(float(np.mean(entropy[-smooth:])), 3) if entropy.size else "–",
            _pct(float(run.eval_before["accuracy"])) if run.eval_before else "–",
            _pct(final_accuracy(run)[0]),
            _num(float(np.mean(step_time)), 3) if step_time.size else "–",
            "; ".join(run.warnings) or "",
        ])
    note = f"Reward and entropy: mean of the first {smooth} → last {smooth} logged steps. Accuracy in %."
    return Table("Per-run summary", ["run", "status", "steps logged", "reward", "entropy", "acc. before", "acc. after", "s/step", "notes"],
                 rows, note, align_left=2, text_last=True)


# ---- the report ------------------------------------------------------------------------------
CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}h3{margin-bottom:.4em}
table{border-collapse:collapse;margin:.5em 0;font-size:.92em}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.note{color:#555;font-size:.88em;margin-top:.2em;max-width:1000px}figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{color:#555;font-size:.88em}code{background:#f5f5f5;padding:0 .2em}.meta{color:#555}
"""


def html_page(title: str, body: str) -> str:
    """A self-contained page, CSS inline and no JavaScript; `title` and `body` are HTML (escaped by the caller)."""
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width, initial-scale=1">\n<title>{title}</title><style>{CSS}</style></head>\n'
            f"<body>\n{body}</body></html>\n")


def build_report(root: str | os.PathLike, out_dir: str | os.PathLike | None = None, *, target: float | None = None,
                 smooth: int = 5, confidence: float = 0.95) -> Path:
    """Write `out_dir` (default ROOT/report)/index.html, summary.md and the PNG plots; return index.html's path."""
    import matplotlib

    matplotlib.use("Agg")
    if smooth < 1:
        raise ValueError(f"smooth must be >= 1, got {smooth}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    comp = load_comparison(root)
    out = Path(out_dir) if out_dir is not None else Path(root) / "report"
    out.mkdir(parents=True, exist_ok=True)
    colors = group_colors(comp.objectives)
    report = Report()

    report.accuracy = accuracy_table(comp, confidence)
    report.tables["accuracy"] = _accuracy_table(report.accuracy, confidence)
    report.target = steps_to_target(comp, target, smooth)
    report.tables["target"] = _target_table(report.target)
    law = fit_entropy_laws(comp, smooth)
    report.fits = law
    report.tables["fit"] = _fit_table(law)
    result_tables, benches = _results_tables(comp, confidence)
    report.tables["monitor"] = _monitor_table(comp)
    report.tables["runs"] = _runs_table(comp, smooth)

    band_note = "Line: mean over seeds; band: min–max over seeds."
    if plot_heldout(comp, out / "heldout_accuracy.png", colors):
        report.figures.append(("curves", "heldout_accuracy.png", "Held-out accuracy", band_note))
    captions = {"reward": "Training reward", "entropy": "Policy entropy", "clip": "Clip fractions",
                "length": "Completion length", "kl": "Policy movement per update", "optim": "Optimisation",
                "controls": "Entropy controllers"}
    for name, panels in CURVES.items():
        if plot_curves(comp, panels, out / f"{name}.png", smooth, colors):
            report.figures.append(("curves", f"{name}.png", captions[name], band_note))
    if _plot_entropy_law(law, out / "entropy_law.png", colors):
        report.figures.append(("law", "entropy_law.png", "Entropy-performance law", "Points: one per run and step; lines: the fit per objective."))
    if _plot_pass_curves(comp, benches, out / "pass_at_k.png", colors):
        report.figures.append(("bench", "pass_at_k.png", "pass@k curves", "Mean over seeds of each run's unbiased pass@k."))

    (out / "summary.md").write_text(_markdown(comp, report, result_tables))
    index = out / "index.html"
    index.write_text(_html(comp, report, result_tables))
    return index


def _setup_lines(comp: RunSet) -> list[str]:
    state = comp.state
    seeds = sorted({r.seed for r in comp.runs})
    lines = [f"Objectives: {', '.join(comp.objectives)}; seeds: {', '.join(map(str, seeds))}; runs found: {len(comp.runs)}"
             + (f" of {len(state['runs'])} planned" if state.get("runs") else "")]
    if state.get("train_args") is not None:
        lines.append(f"Training arguments shared by every run: {shlex.join(state['train_args']) or '(none)'}")
    unfinished = [f"{r.name} ({r.status}, {len(r.rows)} steps logged)" for r in comp.runs if r.unfinished]
    if unfinished:
        lines.append("Unfinished, drawn in the curves but left out of the accuracy and steps-to-target tables: "
                     + ", ".join(unfinished))
    return lines


def _markdown(comp: RunSet, report: Report, result_tables: list[Table]) -> str:
    parts = [f"## Comparison: {comp.root.resolve().name}", "", *[f"{line}  " for line in _setup_lines(comp)], ""]
    parts += [report.tables[k].markdown() for k in ("accuracy", "target", "fit")]
    if result_tables:
        parts.append("### Benchmarks (pass@k etc.)\n")
        parts += [t.markdown() for t in result_tables]
    return "\n".join(parts)


def _html(comp: RunSet, report: Report, result_tables: list[Table]) -> str:
    esc = html.escape
    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    def figures(section: str) -> str:
        return "".join(
            f'<figure><img src="{esc(f)}" alt="{esc(title)}"><figcaption><b>{esc(title)}.</b> {esc(caption)}</figcaption></figure>'
            for sec, f, title, caption in report.figures if sec == section
        )

    meta = "".join(f"<p class=meta>{esc(line)}</p>" for line in _setup_lines(comp))
    bench = ("<h2>Benchmarks</h2>" + "".join(t.html() for t in result_tables) + figures("bench")) if result_tables else ""
    return html_page(f"tepo comparison: {esc(comp.root.resolve().name)}", f"""<h1>tepo comparison: {esc(comp.root.resolve().name)}</h1>
<p class=meta>Generated {esc(now)} by <code>tepo report</code> from <code>{esc(str(comp.root.resolve()))}</code>.</p>
{meta}
<h2>Summary</h2>
{report.tables['accuracy'].html()}
{report.tables['target'].html()}
<h2>Curves</h2>
{figures("curves") or "<p>No run logged any metrics yet.</p>"}
<h2>Entropy-performance law</h2>
{report.tables['fit'].html()}
{figures("law")}
{bench}
<h2>Stability</h2>
{report.tables['monitor'].html()}
<h2>Runs</h2>
{report.tables['runs'].html()}
""")
