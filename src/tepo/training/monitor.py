"""`StabilityMonitorCallback`: the stability monitor (`tepo.stability`, pure and torch-free) in a
transformers/TRL training loop. The monitor's names are re-exported here for older imports."""

from __future__ import annotations

import logging
import os
from typing import Any, Iterable

from transformers import TrainerCallback

from tepo.stability import (  # noqa: F401  (re-exported)
    ALIASES,
    CRITICAL,
    KINDS,
    SEVERITY,
    WARNING,
    StabilityMonitor,
    Verdict,
    lookup,
    replay_metrics,
    write_monitor_file,
)

logger = logging.getLogger(__name__)


class StabilityMonitorCallback(TrainerCallback):
    """Runs a `StabilityMonitor` on every training log of a transformers/TRL trainer.

    On each `on_log` it adds `monitor/<kind>` (1.0/0.0) to the logs dict, and `monitor_warnings`
    (list of messages) when a warning starts; callbacks registered after this one (such as a
    metrics.jsonl writer) see those keys. With `early_stop=True` it sets
    `control.should_training_stop` when a kind in `stop_on` fires (default: non_finite and
    reward_crash). It writes `<output_dir>/monitor.json` when a verdict starts and at train end.
    """

    DEFAULT_STOP_ON = ("non_finite", "reward_crash")

    def __init__(
        self,
        monitor: StabilityMonitor | None = None,
        *,
        output_dir: str | os.PathLike | None = None,
        early_stop: bool = False,
        stop_on: Iterable[str] | None = None,
        **thresholds: Any,
    ) -> None:
        if monitor is not None and thresholds:
            raise ValueError("StabilityMonitorCallback: pass either a monitor or thresholds, not both")
        self.monitor = monitor if monitor is not None else StabilityMonitor(**thresholds)
        self.output_dir = output_dir
        self.early_stop = bool(early_stop)
        self.stop_on = tuple(stop_on) if stop_on is not None else self.DEFAULT_STOP_ON
        unknown = sorted(set(self.stop_on) - set(KINDS))
        if unknown:
            raise ValueError(f"StabilityMonitorCallback: unknown stop_on kinds {unknown}; known: {list(KINDS)}")
        self.stopped_at: int | None = None
        self.stop_reason: str | None = None

    def _run_dir(self, args: Any) -> str | None:
        return str(self.output_dir) if self.output_dir is not None else getattr(args, "output_dir", None)

    def _write(self, args: Any, state: Any) -> None:
        run_dir = self._run_dir(args)
        if run_dir and getattr(state, "is_world_process_zero", True):
            write_monitor_file(self.monitor, run_dir, stopped_early_at=self.stopped_at, stop_reason=self.stop_reason)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return control
        # Only training-step logs: skip eval logs and the end-of-training summary.
        if any(isinstance(k, str) and k.startswith("eval_") for k in logs) or "train_runtime" in logs:
            return control
        if not any(lookup(logs, name) is not None for name in ALIASES):
            return control
        step = int(getattr(state, "global_step", self.monitor.steps_seen + 1))
        started = self.monitor.update(step, logs)
        logs.update(self.monitor.last_flags)
        if started:
            logs["monitor_warnings"] = [f"{v.kind}: {v.message}" for v in started]
            for v in started:
                log = logger.error if v.severity == CRITICAL else logger.warning
                log("stability monitor, step %d: %s (%s): %s", step, v.kind, v.severity, v.message)
            if self.early_stop and self.stopped_at is None:
                stopping = [v for v in started if v.kind in self.stop_on]
                if stopping:
                    control.should_training_stop = True
                    self.stopped_at = step
                    self.stop_reason = ", ".join(v.kind for v in stopping)
                    logger.error("stability monitor: stopping training at step %d (%s)", step, self.stop_reason)
            self._write(args, state)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self._write(args, state)
        return control
