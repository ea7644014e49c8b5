"""tepo: RL on verifiable rewards for language models — TEPO and its baselines, exact and compared."""

__version__ = "0.1.0"
