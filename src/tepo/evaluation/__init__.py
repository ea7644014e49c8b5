"""Evaluation: estimators (here), generation backends and the eval runner (submodules).

Only the light estimators are imported eagerly; heavy submodules (generation, runner) are imported
where they are used, so ``import tepo.evaluation`` stays cheap (no transformers).
"""

from tepo.evaluation.estimators import avg_at_n, bootstrap_ci, maj_at_k, pass_at_k

__all__ = ["avg_at_n", "bootstrap_ci", "maj_at_k", "pass_at_k"]
