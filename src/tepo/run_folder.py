"""The run folder's format: what `tepo train` leaves in its output_dir, and what the runner adds.

One module owns it, torch-free (it imports no torch, transformers or numpy), so that the trainer
writes and the analysis reads the same names by the same rules:

    run.json          the run's settings (written by `tepo train`)
    metrics.jsonl     one JSON object per optimiser step: `step`, METRIC_KEYS (null where not
                      measured), and any of EXTRA_KEYS that were logged
    eval_before.json  greedy held-out accuracy before training ({"accuracy", "num_problems", ...})
    eval_after.json   the same after training (a study's validation split)
    eval_test.json    a study's test split at the end, with per-problem "ids" and "verdicts"
    monitor.json      the stability monitor's verdicts (tepo.stability)
    train.log         the trainer's stdout and stderr (written by the runner)
    DONE.json         written by the runner, last, when the run ended well: the folder is complete
    FAILED.json       written by the runner when the trainer failed (exit status, last log lines)

Older comparison folders marked a finished run with a file `DONE`; `is_finished` still reads it.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
EVAL_BEFORE_FILE = "eval_before.json"
EVAL_AFTER_FILE = "eval_after.json"
EVAL_TEST_FILE = "eval_test.json"
MONITOR_FILE = "monitor.json"
LOG_FILE = "train.log"
DONE_FILE = "DONE.json"
LEGACY_DONE_FILE = "DONE"  # `tepo compare` folders made before DONE.json
FAILED_FILE = "FAILED.json"
# what a run's results folder keeps (checkpoints and weights stay in the work folder)
SMALL_FILES = (RUN_FILE, METRICS_FILE, EVAL_BEFORE_FILE, EVAL_AFTER_FILE, EVAL_TEST_FILE, MONITOR_FILE)

# The columns of metrics.jsonl, in order; every row has all of them (null where not measured:
# kl_mask_frac only for tepo, cov_selected only for clip_cov / kl_cov).
METRIC_KEYS = (
    "reward_mean",
    "reward_std",
    "accuracy",
    "zero_var_frac",
    "entropy_mean",
    "clip_frac",
    "clip_frac_low",
    "clip_frac_high",
    "ratio_mean",
    "ratio_min",
    "ratio_max",
    "approx_kl",
    "kl_mask_frac",
    "cov_selected",
    "completion_len_mean",
    "completion_len_max",
    "truncated_frac",
    "grad_norm",
    "loss",
    "learning_rate",
    "step_time_s",
    "tokens_per_s",
)
# The rollout-correction metrics of vLLM rollouts (docs/rollout-correction.md;
# tepo.training.rollout_correction.METRIC_NAMES is this tuple).
ROLLOUT_CORRECTION_KEYS = (
    "rollout_logp_gap",
    "rollout_logp_gap_max",
    "rollout_is_ratio_mean",
    "rollout_is_ratio_min",
    "rollout_is_ratio_max",
    "rollout_is_masked_frac",
    "rollout_is_truncated_frac",
)
# Written when present.
EXTRA_KEYS = (
    "heldout_accuracy",
    *ROLLOUT_CORRECTION_KEYS,
    "vllm_prefix_cache_hit_rate",  # share of a rollout's prompt tokens the colocated engine's prefix cache served
    "nonfinite_skipped",
    "rollout",
    "dynamic_sampling/rounds",
    "dynamic_sampling/kept_frac",
    "dynamic_sampling/short",
    "monitor_warnings",
    # objective-independent controls (tepo.training.controls, docs/controls.md)
    "entropy_coef",
    "tepo_kl_coef",
    "adaptive_tepo_target",
    "adaptive_tepo_entropy",
    "entropy_select_frac",
    "entropy_select_threshold",
    "off_policy_mask_frac",
)


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file's content; ValueError naming the file when it is not valid JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def write_json(path: str | os.PathLike, data: Any, *, indent: int = 2, default: Callable[[Any], Any] | None = None) -> Path:
    """Write JSON atomically (a reader never sees half a file); NaN and infinities are refused.
    `default`: how to write what JSON has no type for (e.g. `str` for paths in a run's settings)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=indent, allow_nan=False, default=default) + "\n")
    os.replace(tmp, path)
    return path


def json_value(value: Any) -> Any:
    """A metric as metrics.jsonl stores it: JSON has no NaN/inf, so they become null (a non-finite
    step is also counted in nonfinite_skipped); numpy/torch scalars become Python numbers."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(path: str | os.PathLike, warnings: list[str] | None = None) -> list[dict]:
    """Rows of a metrics.jsonl. The one rule: a torn last line (a run still writing, or a crash
    mid-write) is dropped, with a warning appended to `warnings` (logged when None); a bad line
    elsewhere, or a row that is not an object with an integer `step`, is an error naming file:line."""
    path = Path(path)
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                message = f"{path}:{number}: the last line is incomplete, dropped"
                if warnings is None:
                    logger.warning(message)
                else:
                    warnings.append(message)
                break
            raise ValueError(f"{path}:{number}: not a JSON object: {line[:80]!r}") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int) or isinstance(row.get("step"), bool):
            raise ValueError(f"{path}:{number}: a row must be a JSON object with an integer 'step'")
        rows.append(row)
    return rows


def write_metrics(path: str | os.PathLike, rows: list[dict]) -> None:
    """Rewrite a metrics.jsonl with `rows` (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(tmp, path)


def append_metrics(path: str | os.PathLike, row: dict) -> None:
    """Append one step's row to a metrics.jsonl."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def metrics_row(step: int, logs: dict) -> dict:
    """The metrics.jsonl row of one optimiser step's logs: `step`, every METRIC_KEYS column, and the
    EXTRA_KEYS that were logged."""
    row = {"step": int(step)}
    for key in METRIC_KEYS:
        row[key] = json_value(logs.get(key))
    for key in EXTRA_KEYS:
        if key in logs:
            row[key] = json_value(logs[key])
    return row


def is_finished(folder: str | os.PathLike) -> bool:
    """The run ended well: the runner's DONE.json (or an older folder's DONE), or, for a folder
    made without the runner, the trainer's eval_after.json."""
    folder = Path(folder)
    return any((folder / name).exists() for name in (DONE_FILE, LEGACY_DONE_FILE, EVAL_AFTER_FILE))


def find_results(folder: str | os.PathLike) -> Path | None:
    """The newest evaluation results.json (`tepo eval`) under a run folder, checkpoints included."""
    found = [p for p in Path(folder).rglob("results.json") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def read_accuracy(path: str | os.PathLike) -> dict:
    """An eval_*.json: an object with a numeric 'accuracy' (ValueError naming the file otherwise)."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("accuracy"), (int, float)):
        raise ValueError(f"{path}: expected an object with a numeric 'accuracy'")
    return data
