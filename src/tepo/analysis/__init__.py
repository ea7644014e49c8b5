"""Comparing runs: `tepo compare` (objectives side by side over seeds), the entropy-performance
law fit, and `tepo report` (plots, tables, HTML)."""

from tepo.analysis.entropy_law import EntropyLawFit, fit_entropy_law

__all__ = ["EntropyLawFit", "fit_entropy_law"]
