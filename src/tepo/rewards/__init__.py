"""Answer extraction and verification, safe with untrusted model output.

Completions arrive by the million and some are hostile (by accident or not), so:

* :func:`extract_answer` (:mod:`.extraction`) does bounded work on any text; the answer stated
  last is the final answer, and a final run of several boxes is kept as its parts.
* :func:`verify_answer` (:mod:`.verify`) decides plain numbers exactly with
  :class:`fractions.Fraction` in this process (:mod:`.numbers`, which also holds the rule for
  digit grouping and commas between digits). Everything else is rewritten the same way on both
  sides (:mod:`.forms`: Euler's ``e``, intervals and inequalities), pre-screened
  (:mod:`.prescreen`: answers whose evaluation could explode are refused) and sent to math-verify,
  which reads each side as a whole or not at all (:mod:`.parsing`), in a worker process under a
  budget of :data:`VERIFY_CPU_S` seconds of the CPU time the verification uses, with a wall-clock
  backstop :data:`WALL_BACKSTOP_FACTOR` times longer (:mod:`.worker`): load never changes a verdict.
* Gold answers are trusted: each is parsed once, with a budget independent of load
  (:mod:`.gold`); :func:`prepare_golds` does it when the data is loaded and reports a gold that
  cannot be parsed, before any model is loaded.
* :func:`math_reward` / :func:`math_reward_func` (:mod:`.reward`) score completions; a gold with
  several parts is judged against all the final boxes together. :func:`canonical_answer`
  (:mod:`.voting`) normalises answers for majority voting.
* Nothing here evaluates completion text as code or reads files it names.
"""

from tepo.rewards.extraction import MAX_ANSWER_CHARS, MAX_BOXES_TRIED, FinalAnswer, extract_answer, final_answer
from tepo.rewards.gold import GOLD_PARSE_TIMEOUT_S, GoldError, prepare_golds
from tepo.rewards.prescreen import refusal_reason
from tepo.rewards.reward import Judgement, judge, math_reward, math_reward_func
from tepo.rewards.stats import verifier_stats
from tepo.rewards.verify import verify_answer
from tepo.rewards.voting import canonical_answer
from tepo.rewards.worker import (
    VERIFY_CPU_S, VERIFY_TIMEOUT_S, VERIFY_WALL_S, WALL_BACKSTOP_FACTOR, WORKER_MEMORY_BYTES, WORKER_START_TIMEOUT_S,
)

__all__ = [
    "GOLD_PARSE_TIMEOUT_S", "MAX_ANSWER_CHARS", "MAX_BOXES_TRIED", "VERIFY_CPU_S", "VERIFY_TIMEOUT_S", "VERIFY_WALL_S",
    "WALL_BACKSTOP_FACTOR", "WORKER_MEMORY_BYTES", "WORKER_START_TIMEOUT_S", "FinalAnswer", "GoldError", "Judgement",
    "canonical_answer", "extract_answer", "final_answer", "judge", "math_reward", "math_reward_func", "prepare_golds",
    "refusal_reason", "verifier_stats", "verify_answer",
]
