"""Shared test set-up."""

from __future__ import annotations

import os

# No test reuses another's (or an earlier session's) evaluation of an untrained model, which would
# skip the evaluation it checks: tepo.training.baseline_eval_cache is off unless a test turns it on
# (tests/test_baseline_eval_cache.py). An environment variable, so `tepo train` in a subprocess sees it.
os.environ["TEPO_BASELINE_EVALS"] = "off"
