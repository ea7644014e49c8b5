"""Training: `TEPOConfig`, `TEPOTrainer` (a thin TRL GRPOTrainer subclass), callbacks, `tepo train`.

Names are imported lazily, so `import tepo.training` does not pay for importing TRL.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "TEPOConfig": "tepo.training.config",
    "TEPOTrainer": "tepo.training.trainer",
    "last_complete_checkpoint": "tepo.training.trainer",
    "MetricsJsonlWriter": "tepo.training.callbacks",
    "NonFiniteGuard": "tepo.training.callbacks",
    "HeldoutEvalCallback": "tepo.training.callbacks",
    "StabilityMonitorCallback": "tepo.training.monitor",
    "read_metrics": "tepo.run_folder",  # the run folder's format, torch-free
    "METRIC_KEYS": "tepo.run_folder",
    "stock_trl_config": "tepo.training.stock",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tepo.training' has no attribute {name!r}")
