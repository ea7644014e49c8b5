"""Experiments and their reports: studies (`study`: the description; `runner`: training the runs;
`study_report`), `tepo compare` (a study built in memory), one reader of a run folder (`runs`), one
statistics module (`stats`), the renderer (`report`: tables, plots, `tepo report`), and the
entropy-performance law fit."""

from tepo.analysis.entropy_law import EntropyLawFit, fit_entropy_law

__all__ = ["EntropyLawFit", "fit_entropy_law"]
