"""`tepo study report FILE`: tables and plots of a study from its results folder alone.

Reads only what `tepo study run` stored under results/<study>/ (DONE.json, eval_after.json on the
validation split, eval_test.json with per-problem test verdicts, metrics.jsonl, monitor.json) and
writes results/<study>/report/: index.html, summary.md (the same tables), summary.json (every
number, for scripts and tests) and PNG plots. No model is loaded; it takes seconds.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tepo.run_folder import EVAL_BEFORE_FILE, EVAL_TEST_FILE, read_json
from tepo.analysis.stats import (
    DEFAULT_REPLICATES,
    BootstrapResult,
    paired_bootstrap,
    seed_bootstrap,
    seed_matched_bootstrap,
    seed_matched_t,
)
from tepo.analysis.runs import RunData, RunSet, heldout_series, load_run, steps_to_reach
from tepo.analysis.study import (
    Study,
    StudyError,
    StudyRun,
    all_runs,
    run_status,
    select_settings,
    tuning_runs,
)

ENTROPY_LAST_STEPS = 5  # end-of-run entropy: mean of entropy_mean over the last 5 logged steps


@dataclass
class FinalData:
    run: StudyRun
    data: RunData
    test_ids: list[str]
    verdicts: np.ndarray  # (problems,) 0/1


def load_test_verdicts(path: Path) -> tuple[list[str], np.ndarray]:
    """(problem ids, 0/1 verdicts) of an eval_test.json; its stored accuracy must equal their mean."""
    data = read_json(path)
    ids, verdicts = data.get("ids"), data.get("verdicts")
    if not isinstance(ids, list) or not isinstance(verdicts, list) or len(ids) != len(verdicts) or not ids:
        raise StudyError(f"{path}: expected equal, non-empty 'ids' and 'verdicts' lists")
    values = np.asarray([1.0 if v else 0.0 for v in verdicts])
    if not math.isclose(float(values.mean()), float(data.get("accuracy", math.nan)), abs_tol=1e-12):
        raise StudyError(f"{path}: 'accuracy' {data.get('accuracy')} is not the mean of its verdicts ({values.mean()})")
    return [str(i) for i in ids], values


def end_entropy(data: RunData) -> float:
    _, values = data.series("entropy_mean")
    return float(values[-ENTROPY_LAST_STEPS:].mean()) if values.size else math.nan


def monitor_kinds(data: RunData) -> list[str]:
    verdicts = (data.monitor or {}).get("verdicts") or []
    return [str(v.get("kind")) for v in verdicts]


def tuning_before(study: Study) -> float | None:
    """Validation accuracy before training, the mean over the finished tuning runs (one model: one value)."""
    values = []
    for run in tuning_runs(study):
        path = run.results(study) / EVAL_BEFORE_FILE
        if run_status(study, run) == "done" and path.is_file():
            values.append(float(read_json(path)["accuracy"]))
    return _mean(values)


def load_finals(study: Study) -> dict[str, list[FinalData]]:
    """arm -> its finished final runs, by seed; every run must be tested on the same problems."""
    out: dict[str, list[FinalData]] = {}
    reference: list[str] | None = None
    for run in all_runs(study):
        if run.stage != "final" or run_status(study, run) != "done":
            continue
        folder = run.results(study)
        ids, verdicts = load_test_verdicts(folder / EVAL_TEST_FILE)
        if reference is None:
            reference = ids
        elif ids != reference:
            raise StudyError(f"{folder}/eval_test.json: other test problems than the other runs; the comparison is paired "
                             "by problem, so every run must be tested on the same problems in the same order")
        out.setdefault(run.arm, []).append(FinalData(run, load_run(folder, run.arm, run.seed, "done"), ids, verdicts))
    return out


def compute(study: Study, *, confidence: float = 0.95, replicates: int = DEFAULT_REPLICATES, seed: int = 0) -> dict[str, Any]:
    """Every number of the report, as plain data (summary.json)."""
    if not study.results_dir.is_dir():
        raise StudyError(f"{study.results_dir}: no results yet (run `tepo study run {study.path}` first)")
    selection = select_settings(study)
    finals = load_finals(study)
    arms = [a for a in study.arms if a in finals]
    result: dict[str, Any] = {"study": study.name, "target": study.target, "confidence": confidence,
                              "replicates": replicates, "bootstrap_seed": seed, "arms": {}, "tuning": {}}
    for arm, sel in selection.items():
        result["tuning"][arm] = {
            "selected": sel["selected"],
            "settings": [{"setting": r["setting"], "options": r["options"], "mean": None if math.isnan(r["mean"]) else r["mean"],
                          "scores": {str(k): v for k, v in r["scores"].items()}, "statuses": r["statuses"]}
                         for r in sel["settings"]],
        }
    if arms:
        accuracy = paired_bootstrap({a: np.stack([f.verdicts for f in finals[a]]) for a in arms},
                                    confidence=confidence, replicates=replicates, seed=seed)
        stt = {a: [steps_to_reach(*heldout_series(f.data), study.target) for f in finals[a]] for a in arms}  # the one rule
        steps = seed_bootstrap({a: np.asarray([s for s, _ in stt[a]]) for a in arms},
                               confidence=confidence, replicates=replicates, seed=seed)
        entropy = seed_bootstrap({a: np.asarray([end_entropy(f.data) for f in finals[a]]) for a in arms},
                                 confidence=confidence, replicates=replicates, seed=seed)
        for a in arms:
            fs = finals[a]
            result["arms"][a] = {
                "setting": fs[0].run.setting, "options": fs[0].run.options, "seeds": [f.run.seed for f in fs],
                "test_problems": len(fs[0].test_ids),
                "test_accuracy": accuracy.arms[a].to_dict(),
                "test_accuracy_per_seed": {str(f.run.seed): float(f.verdicts.mean()) for f in fs},
                "validation_before": _mean([(f.data.eval_before or {}).get("accuracy") for f in fs]),
                "validation_after": _mean([(f.data.eval_after or {}).get("accuracy") for f in fs]),
                "steps_to_target": steps.arms[a].to_dict() if a in steps.arms else None,
                "steps_to_target_per_seed": {str(f.run.seed): {"step": s, "reached": r} for f, (s, r) in zip(fs, stt[a])},
                "reached": sum(r for _, r in stt[a]),
                "end_entropy": entropy.arms[a].to_dict() if a in entropy.arms else None,
                "monitor": {str(f.run.seed): monitor_kinds(f.data) for f in fs},
                "monitor_flagged": sum(bool(monitor_kinds(f.data)) for f in fs),
            }
        matched = seed_matched_bootstrap({a: {f.run.seed: f.verdicts for f in finals[a]} for a in arms},
                                         confidence=confidence, replicates=replicates, seed=seed)
        seeds_of = {a: {f.run.seed for f in finals[a]} for a in arms}
        t_pairs = seed_matched_t({a: {f.run.seed: f.verdicts for f in finals[a]} for a in arms}, confidence=confidence)
        result["pairs"] = {"test_accuracy": _pairs(accuracy), "steps_to_target": _pairs(steps), "end_entropy": _pairs(entropy),
                           "test_accuracy_t": [{"a": a, "b": b, **i.to_dict(), "seeds": sorted(seeds_of[a] & seeds_of[b])}
                                               for (a, b), i in t_pairs.items()],
                           "test_accuracy_seed_matched": [{"a": a, "b": b, **i.to_dict(), "seeds": sorted(seeds_of[a] & seeds_of[b])}
                                                          for (a, b), i in matched.items()]}
    result["tuning_before"] = tuning_before(study)
    result["runs"] = [{"key": r.key, "status": run_status(study, r)} for r in all_runs(study)]
    planned_final = len(study.arms) * len(study.final_seeds)
    result["progress"] = {"final_done": sum(len(v) for v in finals.values()), "final_planned": planned_final,
                          "tuning_done": sum(1 for r in all_runs(study) if r.stage == "tuning" and run_status(study, r) == "done"),
                          "tuning_planned": sum(1 for r in all_runs(study) if r.stage == "tuning")}
    return result


def _mean(values) -> float | None:
    xs = [float(v) for v in values if isinstance(v, (int, float))]
    return sum(xs) / len(xs) if xs else None


def _pairs(boot: BootstrapResult) -> list[dict]:
    return [{"a": a, "b": b, **i.to_dict()} for (a, b), i in boot.pairs.items()]


# ---- rendering -------------------------------------------------------------------------------
def _options_text(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items()) or "(defaults)"


def _pct(x: float | None) -> str:
    return f"{100 * x:.1f}" if isinstance(x, (int, float)) and math.isfinite(x) else "–"


def _interval(d: dict | None, scale: float = 100.0, digits: int = 1) -> str:
    if not d or not all(isinstance(d.get(k), (int, float)) and math.isfinite(d[k]) for k in ("low", "high")):
        return "–"
    return f"[{scale * d['low']:.{digits}f}, {scale * d['high']:.{digits}f}]"


def excludes_zero(pair: dict) -> str:
    """Whether a difference's interval excludes 0: "yes" / "no", or "–" when an arm has one seed
    (its interval leaves out the seed-to-seed spread, which one run cannot show)."""
    if pair.get("n", 0) < 2:
        return "–"
    return "yes" if pair["low"] > 0 or pair["high"] < 0 else "no"


def _signed(x: float, scale: float = 100.0, digits: int = 1) -> str:
    return f"{scale * x:+.{digits}f}" if math.isfinite(x) else "–"


def tables(study: Study, result: dict[str, Any]):
    from tepo.analysis.report import Table

    conf = f"{100 * result['confidence']:g}%"
    progress = result["progress"]
    failed = {stage: [r["key"] for r in result["runs"] if r["status"] == "failed" and r["key"].startswith(stage + "/")]
              for stage in ("tuning", "final")}
    rows = [[stage, str(progress[f"{stage}_done"]), str(len(failed[stage])),
             str(progress[f"{stage}_planned"] - progress[f"{stage}_done"] - len(failed[stage])), str(progress[f"{stage}_planned"])]
            for stage in ("tuning", "final")]
    out = [("progress", Table("Runs done", ["stage", "done", "failed", "to run", "planned"], rows,
                              note=f"Failed: {', '.join(failed['tuning'] + failed['final'])}." if any(failed.values()) else ""))]
    rows = []
    for arm, tuning in result["tuning"].items():
        for s in tuning["settings"]:
            scores = ", ".join(f"s{k}: {_pct(v)}" for k, v in s["scores"].items())
            rows.append([arm, f"g{s['setting']}", _options_text(s["options"]), scores or "–", _pct(s["mean"]),
                         "selected" if tuning["selected"] == s["setting"] else ""])
    if rows:
        out.append(("tuning", Table("Tuning: validation accuracy at the last step (%), per setting",
                                    ["arm", "setting", "options", "per seed", "mean", ""], rows, align_left=4, text_last=True,
                                    note=(f"Before training: {_pct(result.get('tuning_before'))}%. " if result.get("tuning_before") is not None else "")
                                         + "Rule: the highest mean over the tuning seeds; "
                                         + (f"settings within {100 * study.tie_tolerance:g} points of the best are tied and the one "
                                            "listed first (the simpler) wins." if study.tie_tolerance > 0 else
                                            "an exact tie goes to the setting listed first (the simpler).")
                                         + " Unfinished or failed settings show –.")))
    arms = result["arms"]
    rows = []
    for arm, a in arms.items():
        per_seed = ", ".join(f"s{k}: {_pct(v)}" for k, v in a["test_accuracy_per_seed"].items())
        rows.append([arm, _options_text({k: v for k, v in a["options"].items() if k != "objective"}) if a["setting"] is not None else "(no tuning)",
                     str(len(a["seeds"])), _pct(a["test_accuracy"]["estimate"]), _interval(a["test_accuracy"]),
                     f"{_pct(a['validation_before'])} -> {_pct(a['validation_after'])}", per_seed])
    if rows:
        n_problems = sorted({a["test_problems"] for a in arms.values()})
        out.append(("accuracy", Table(f"Test accuracy (%), greedy, {', '.join(map(str, n_problems))} test problems",
                                      ["arm", "selected setting", "seeds", "test accuracy", f"{conf} interval",
                                       "validation before -> after", "per seed"], rows, align_left=2, text_last=True,
                                      note=f"Interval: bootstrap over seeds (within each arm) and problems "
                                           f"({result['replicates']} replicates, percentile).")))
    pairs = result.get("pairs", {})
    if pairs.get("test_accuracy"):
        t_of = {(p["a"], p["b"]): p for p in pairs.get("test_accuracy_t", [])}
        rows = [[f"{p['a']} - {p['b']}", _signed(p["estimate"]), _interval(t_of.get((p["a"], p["b"]))),
                 excludes_zero(t_of.get((p["a"], p["b"]), {})), _interval(p), excludes_zero(p)]
                for p in pairs["test_accuracy"]]
        out.append(("pairs", Table("Test accuracy differences (points), paired by problem",
                                   ["pair", "difference", f"{conf} t-interval over seeds (primary)", "t excludes 0",
                                    f"{conf} bootstrap interval", "bootstrap excludes 0"], rows, text_last=True,
                                   note="Primary: the t-interval over seeds, from the per-seed differences on the same "
                                        "problems (the seeds both arms have), Student-t with df = seeds - 1. Beside it "
                                        "the paired bootstrap: problems resampled jointly for both arms, seeds within each "
                                        "arm; with few seeds a percentile bootstrap understates the spread between seeds. "
                                        "Where the arms share one seed there is no t-interval, and the bootstrap interval "
                                        "holds problem noise only, so it is not read as excluding 0 (–).")))
    if pairs.get("test_accuracy_seed_matched"):
        rows = [[f"{p['a']} - {p['b']}", ", ".join(map(str, p["seeds"])), _signed(p["estimate"]), _interval(p), excludes_zero(p)]
                for p in pairs["test_accuracy_seed_matched"]]
        out.append(("matched_pairs", Table("Secondary: test accuracy differences (points) on the seeds both arms have, "
                                           "seed-matched and paired by problem",
                                           ["pair", "seeds", "difference", f"{conf} interval", "interval excludes 0"], rows,
                                           text_last=True,
                                           note="The seed sets the order of the training problems, the same for every arm, "
                                                "so here a replicate draws the seeds both arms have jointly for both, as it "
                                                "draws the problems; the estimate is over those seeds only. The primary "
                                                "interval is the t-interval over seeds of the table above.")))
    if arms:
        rows = []
        for arm, a in arms.items():
            per_seed = ", ".join(f"s{k}: {int(v['step']) if math.isfinite(v['step']) else '–'}{'' if v['reached'] else '+'}"
                                 for k, v in a["steps_to_target_per_seed"].items())
            st = a["steps_to_target"] or {}
            rows.append([arm, f"{a['reached']}/{len(a['seeds'])}", f"{st.get('estimate', math.nan):.1f}" if st else "–",
                         _interval(st, 1.0), per_seed])
        out.append(("target", Table(f"Steps to {100 * study.target:g}% validation accuracy",
                                    ["arm", "reached", "mean steps", f"{conf} interval", "per seed"], rows, text_last=True,
                                    note="A run that never reached the target counts as its last evaluated step plus one "
                                         "evaluation interval (marked +): a lower bound. Interval: bootstrap over seeds (– with one seed).")))
        if pairs.get("steps_to_target"):
            rows = [[f"{p['a']} - {p['b']}", f"{p['estimate']:+.1f}", _interval(p, 1.0)] for p in pairs["steps_to_target"]]
            out.append(("target_pairs", Table("Steps-to-target differences", ["pair", "difference (steps)", f"{conf} interval"], rows)))
        rows = []
        for arm, a in arms.items():
            e = a["end_entropy"] or {}
            rows.append([arm, f"{e.get('estimate', math.nan):.3f}" if e else "–", _interval(e, 1.0, 3)])
        out.append(("entropy", Table(f"End-of-run token entropy (mean of the last {ENTROPY_LAST_STEPS} steps, nats)",
                                     ["arm", "mean over seeds", f"{conf} interval"], rows,
                                     note="Interval: bootstrap over seeds (– with one seed).")))
        if pairs.get("end_entropy"):
            rows = [[f"{p['a']} - {p['b']}", f"{p['estimate']:+.3f}", _interval(p, 1.0, 3)] for p in pairs["end_entropy"]]
            out.append(("entropy_pairs", Table("End-of-run entropy differences", ["pair", "difference (nats)", f"{conf} interval"], rows)))
        rows = []
        for arm, a in arms.items():
            kinds = sorted({k for ks in a["monitor"].values() for k in ks})
            rows.append([arm, f"{a['monitor_flagged']}/{len(a['seeds'])}", ", ".join(kinds) or "none"])
        out.append(("monitor", Table("Stability monitor: final runs with any verdict", ["arm", "runs flagged", "verdict kinds"],
                                     rows, text_last=True)))
    return out


# the report's tables by key, and what each shows (for a README block whose table has no runs yet)
TABLE_KEYS = {"progress": "runs done", "tuning": "tuning", "accuracy": "test accuracy per arm",
              "pairs": "test accuracy differences", "matched_pairs": "seed-matched test accuracy differences",
              "target": "steps to the target",
              "target_pairs": "steps-to-target differences", "entropy": "end-of-run entropy",
              "entropy_pairs": "end-of-run entropy differences", "monitor": "stability monitor flags"}


def _readme_block(key: str, table, regen: str) -> str:
    """A table as a README shows it: a bold title (not a heading: the README keeps its own outline) and the command."""
    if table is None:
        return f"_{TABLE_KEYS[key].capitalize()}: no finished runs for it yet._"
    body = table.markdown().split("\n", 2)[2].rstrip()
    return f"**{table.title}**\n\n{body}\n\nRegenerate: `{regen}`"


def readme_blocks(text: str, study_name: str, where: str) -> dict[str, tuple[int, int]]:
    """The study's marked blocks in a Markdown text: table key -> (start, end) of the text between its markers.

    A block is `<!-- study:NAME:KEY -->` ... `<!-- /study:NAME:KEY -->`, KEY one of TABLE_KEYS."""
    import re

    out: dict[str, tuple[int, int]] = {}
    for m in re.finditer(r"<!-- study:([^:\s]+):(\S+) -->", text):
        name, key = m.group(1), m.group(2)
        if name != study_name:
            continue
        if key not in TABLE_KEYS:
            raise StudyError(f"{where}: marker {m.group(0)} names no table of the study report "
                             f"(tables: {', '.join(TABLE_KEYS)})")
        end = text.find(f"<!-- /study:{name}:{key} -->", m.end())
        if end < 0:
            raise StudyError(f"{where}: marker {m.group(0)} is never closed (add <!-- /study:{name}:{key} -->)")
        if key in out:
            raise StudyError(f"{where}: table {key} of study {name} is marked twice")
        out[key] = (m.end(), end)
    return out


def check_readme_marks(path: Path, study: Study) -> dict[str, tuple[int, int]]:
    """The study's marked blocks of a Markdown file; StudyError if it is missing, has none or one is malformed."""
    if not path.is_file():
        raise StudyError(f"--doc {path}: no such file")
    blocks = readme_blocks(path.read_text(), study.name, str(path))
    if not blocks:
        raise StudyError(f"{path}: no <!-- study:{study.name}:TABLE --> markers (tables: {', '.join(TABLE_KEYS)})")
    return blocks


def sync_readme(path: Path, study: Study, tabs, regen: str, *, check: bool = False) -> list[str]:
    """Rewrite the study's marked tables in a Markdown file (README.md) from the report's tables.

    Returns the keys whose block changed (with check=True: would change; nothing is written)."""
    blocks = check_readme_marks(path, study)
    text = path.read_text()
    by_key = dict(tabs)
    changed, pieces, last = [], [], 0
    for key, (start, end) in sorted(blocks.items(), key=lambda kv: kv[1][0]):
        block = "\n" + _readme_block(key, by_key.get(key), regen) + "\n"
        if text[start:end] != block:
            changed.append(key)
        pieces += [text[last:start], block]
        last = end
    pieces.append(text[last:])
    if changed and not check:
        path.write_text("".join(pieces))
    return changed


def _plot_differences(result: dict[str, Any], path: Path) -> bool:
    import matplotlib.pyplot as plt

    from tepo.analysis.report import save_figure

    pairs = [p for p in result.get("pairs", {}).get("test_accuracy_t") or [] if p["low"] is not None]
    if not pairs:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(pairs) + 1.4))
    for i, p in enumerate(pairs):
        ax.errorbar(100 * p["estimate"], i, xerr=[[100 * (p["estimate"] - p["low"])], [100 * (p["high"] - p["estimate"])]],
                    fmt="o", color="tab:blue", capsize=3)
    ax.axvline(0.0, color="grey", lw=1)
    ax.set_yticks(range(len(pairs)), [f"{p['a']} - {p['b']}" for p in pairs], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"test accuracy difference (points), {100 * result['confidence']:g}% t-interval over seeds")
    ax.grid(alpha=0.3, axis="x")
    return save_figure(fig, path)


def _setting_label(k: int, options: dict) -> str:
    """g<k> and its options, one per line, a clip pair as `clip low/high` (tick labels stay narrow)."""
    opts = dict(options)
    lines = [f"g{k}"]
    if "clip_low" in opts and "clip_high" in opts:
        lines.append(f"clip {opts.pop('clip_low'):g}/{opts.pop('clip_high'):g}")
    lines += [f"{key} {value:g}" if isinstance(value, float) else f"{key} {value}" for key, value in opts.items()]
    return "\n".join(lines)


def _plot_tuning(result: dict[str, Any], path: Path) -> bool:
    import matplotlib.pyplot as plt

    from tepo.analysis.report import save_figure

    arms = [(a, t) for a, t in result["tuning"].items() if any(s["mean"] is not None for s in t["settings"])]
    if not arms:
        return False
    widths = [max(len(t["settings"]), 2) for _, t in arms]
    # one y scale for every arm, so the levels compare across panels as well as within one
    fig, axes = plt.subplots(1, len(arms), figsize=(1.25 * sum(widths) + 1.2, 3.8), squeeze=False, sharey=True,
                             gridspec_kw={"width_ratios": widths})
    before = result.get("tuning_before")
    for ax, (arm, t) in zip(axes[0], arms):
        for s in t["settings"]:
            xs = [s["setting"]] * len(s["scores"])
            ax.plot(xs, [100 * v if v is not None else math.nan for v in s["scores"].values()], "o", color="grey", ms=4)
            if s["mean"] is not None:
                ax.plot([s["setting"]], [100 * s["mean"]], "D", ms=7,
                        color="tab:red" if t["selected"] == s["setting"] else "tab:blue")
        if before is not None:
            ax.axhline(100 * before, color="grey", lw=1, ls="--")
        ax.set_xticks([s["setting"] for s in t["settings"]],
                      [_setting_label(s["setting"], s["options"]) for s in t["settings"]], fontsize=7)
        ax.set_xlim(-0.5, len(t["settings"]) - 0.5)
        ax.set_title(arm, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation accuracy (%)")
    title = "tuning: dots = seeds, diamond = mean (red: selected)"
    if before is not None:
        title += f"; dashed: before training ({100 * before:.1f}%)"
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def build_study_report(study: Study, out_dir: str | None = None, *, confidence: float = 0.95,
                       replicates: int = DEFAULT_REPLICATES, seed: int = 0, smooth: int = 5) -> Path:
    """Write the report folder (default results/<study>/report); return index.html's path."""
    return write_study_report(study, out_dir, confidence=confidence, replicates=replicates, seed=seed, smooth=smooth)[0]


def _shown(path: Path) -> str:
    """A path as a command line shows it: relative to the working directory where it lies below it."""
    path = Path(path).absolute()
    return os.path.relpath(path) if path.is_relative_to(Path.cwd()) else str(path)


def study_regen_command(study: Study) -> str:
    return f"tepo study report {_shown(study.path)}"


def readme_regen_command(study: Study, readme: Path) -> str:
    return f"{study_regen_command(study)} --doc {_shown(readme)}"


def write_study_report(study: Study, out_dir: str | None = None, *, confidence: float = 0.95,
                       replicates: int = DEFAULT_REPLICATES, seed: int = 0, smooth: int = 5):
    """build_study_report, returning (index.html's path, the tables)."""
    import matplotlib

    matplotlib.use("Agg")
    from tepo.analysis.report import CURVES, group_colors, html_page, plot_curves, plot_heldout

    result = compute(study, confidence=confidence, replicates=replicates, seed=seed)
    out = Path(out_dir) if out_dir else study.results_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(result, indent=1) + "\n")
    tabs = tables(study, result)
    finals = load_finals(study)
    comp = RunSet(root=study.results_dir, runs=[f.data for fs in finals.values() for f in fs], order=list(study.arms))
    figures = []
    colors = group_colors(list(study.arms))
    if comp.runs and plot_heldout(comp, out / "validation_accuracy.png", colors):
        figures.append(("validation_accuracy.png", "Validation accuracy of the final runs (step 0 = before training)"))
    for name in ("reward", "entropy", "clip"):
        if comp.runs and plot_curves(comp, CURVES[name], out / f"{name}.png", smooth, colors):
            figures.append((f"{name}.png", f"{name} of the final runs (line: mean over seeds; band: min-max)"))
    if comp.runs and plot_curves(comp, [("kl_mask_frac", "KL-mask fraction (tokens the mask selects)", True, False)],
                                  out / "kl_mask.png", smooth, colors):
        # the mask selects tokens whatever the coefficient; with tepo_kl_coef = 0 (plain tepo) they carry no weight
        figures.append(("kl_mask.png", "KL-mask fraction of the final runs: tokens the mask selects (A > 0, entropy "
                                       "falling). It changes the loss only where tepo_kl_coef > 0 (tepo-kl; tepo-adaptive "
                                       "while its controller is on); for plain tepo it is what the mask would select."))
    if _plot_differences(result, out / "differences.png"):
        figures.insert(0, ("differences.png", "Pairwise test accuracy differences"))
    if _plot_tuning(result, out / "tuning.png"):
        figures.insert(0, ("tuning.png", "Tuning on the validation split"))
    progress = result["progress"]
    status = (f"Tuning runs done: {progress['tuning_done']}/{progress['tuning_planned']}; final runs done: "
              f"{progress['final_done']}/{progress['final_planned']}.")
    failed = [r["key"] for r in result["runs"] if r["status"] == "failed"]
    if failed:
        status += f" Failed: {', '.join(failed)}."
    regen = study_regen_command(study)
    # a relative path where there is one: a committed page should not name one machine's folders
    shown_results = _shown(study.results_dir)
    md = [f"## Study: {study.name}", "", study.description.strip(), "", f"Regenerate: `{regen}`", ""]
    md += [t.markdown() for _, t in tabs]
    (out / "summary.md").write_text("\n".join(md))
    esc = html.escape
    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    figs = "".join(f'<figure><img src="{esc(f)}" alt="{esc(c)}"><figcaption>{esc(c)}</figcaption></figure>' for f, c in figures)
    body = "".join(t.html() for _, t in tabs) or "<p>No finished runs yet.</p>"
    index = out / "index.html"
    index.write_text(html_page(f"tepo study: {esc(study.name)}", f"""<h1>tepo study: {esc(study.name)}</h1>
<p class=meta>{esc(study.description.strip())}</p>
<p class=meta>{esc(status)} Generated {esc(now)} from <code>{esc(shown_results)}</code>; regenerate with <code>{esc(regen)}</code>.</p>
<h2>Results</h2>
{body}
<h2>Plots</h2>
{figs or "<p>No plots yet.</p>"}
"""))
    return index, tabs
