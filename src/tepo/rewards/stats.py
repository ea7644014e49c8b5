"""What the verifier did, for monitoring, and warnings given once per kind."""

from __future__ import annotations

import logging
from collections import Counter

logger = logging.getLogger("tepo.rewards")

stats: Counter = Counter()
_warned: set[str] = set()


def verifier_stats() -> dict[str, int]:
    """Counts of what the verifier did in this process (repeated pairs are answered from a cache
    and not counted): ``plain`` (decided as numbers), ``math_verify`` (worker calls), ``refused``
    (pre-screen), ``ambiguous`` (digits spaced in no grouping: no number can be read),
    ``timeout_cpu`` (a verification used more than its CPU-time budget), ``timeout_wall`` (the
    wall-clock backstop fired: a worker that was not scheduled), ``timeout`` (the two together),
    ``worker_error`` (math-verify raised), ``worker_restart`` (a worker killed and replaced),
    ``in_process`` (no worker could start), ``gold_parsed`` (gold answers parsed),
    ``several_boxes`` (answers judged on several final boxes), ``verify_error``/``reward_error`` (a
    bug of ours, scored 0)."""
    return dict(stats)


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)
