"""tepo's verifier against math-verify used plainly, and both against the verdict written by hand.

    .venv/bin/python bench/verifier_agreement.py [--corpus tests/data/grader_corpus.jsonl] [--show all|wrong|none]

Each row of the corpus is a completion, a gold answer, the verdict a careful grader gives
(``expected``) and a class (several boxes, precedence, intervals, digit grouping, Euler's number,
ordinary answers). tepo's verdict is ``tepo.rewards.math_reward(completion, gold)``; math-verify's
is ``verify(parse(gold), parse(completion))`` with its default settings, the gold wrapped in
``$...$`` as its documentation shows, as a user of math-verify would call it. Printed: per class,
how often each grader agrees with the written verdict, its false positives (scored right, is
wrong) and false negatives, how often the two graders agree; then the rows where either grader
differs from the written verdict, and how often tepo's verifier overran its budgets (CPU time,
wall-clock backstop).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = ROOT / "tests" / "data" / "grader_corpus.jsonl"


def load_corpus(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = {"id", "class", "gold", "completion", "expected"} - set(row)
        if missing or not isinstance(row["expected"], bool):
            raise ValueError(f"{path}, line {number}: needs id, class, gold, completion and a boolean expected ({sorted(missing)} missing)")
        rows.append(row)
    return rows


def math_verify_plain(completion: str, gold: str) -> bool:
    """math-verify as its README shows it: parse the gold and the completion, then verify."""
    from math_verify import parse, verify

    gold_latex = gold if "$" in gold else f"${gold}$"
    try:
        return bool(verify(parse(gold_latex), parse(completion)))
    except Exception:  # noqa: BLE001 - an exception counts as "not equal", as a caller would treat it
        return False


def tepo_verdict(completion: str, gold: str) -> bool:
    from tepo.rewards import math_reward

    return math_reward(completion, gold) == 1.0


def tally(rows: list[dict]) -> dict[str, dict[str, int]]:
    """Per class (and "all"): rows, agreement with the written verdict, false positives and false
    negatives of each grader, and how often the two graders agree."""
    out: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in rows:
        for cls in (r["class"], "all"):
            t = out[cls]
            t["rows"] += 1
            t["both_agree"] += r["tepo"] == r["math_verify"]
            for grader in ("tepo", "math_verify"):
                got = r[grader]
                t[f"{grader}_right"] += got == r["expected"]
                t[f"{grader}_fp"] += got and not r["expected"]
                t[f"{grader}_fn"] += r["expected"] and not got
    return out


def markdown(rows: list[dict], show: str) -> str:
    counts = tally(rows)
    classes = sorted(c for c in counts if c != "all") + ["all"]
    lines = [
        "| class | rows | tepo = written | tepo FP | tepo FN | math-verify = written | math-verify FP | math-verify FN | tepo = math-verify |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in classes:
        t = counts[c]
        lines.append(f"| {c} | {t['rows']} | {t['tepo_right']} | {t['tepo_fp']} | {t['tepo_fn']} | {t['math_verify_right']} | "
                     f"{t['math_verify_fp']} | {t['math_verify_fn']} | {t['both_agree']} |")
    if show != "none":
        picked = [r for r in rows if show == "all" or r["tepo"] != r["expected"] or r["math_verify"] != r["expected"]]
        lines += ["", "| id | gold | completion | written | tepo | math-verify |", "|---|---|---|---|---|---|"]
        for r in picked:
            cell = r["completion"].replace("\n", " ").replace("|", "\\|")
            lines.append(f"| {r['id']} | `{r['gold']}` | `{cell}` | {r['expected']} | {r['tepo']} | {r['math_verify']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--show", choices=("all", "wrong", "none"), default="wrong",
                        help="rows listed after the table: all, those where a grader differs from the written verdict, none")
    parser.add_argument("--json", type=Path, default=None, help="also write every row with both verdicts here")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)  # math-verify logs each timeout and failed parse
    rows = load_corpus(args.corpus)
    for r in rows:
        r["tepo"] = tepo_verdict(r["completion"], r["gold"])
        r["math_verify"] = math_verify_plain(r["completion"], r["gold"])
    print(markdown(rows, args.show))
    from tepo.rewards import verifier_stats

    stats = verifier_stats()  # a limit that fired would make a verdict depend on the machine's speed
    print(f"tepo: {stats.get('math_verify', 0)} math-verify verdicts; budgets overrun: CPU time {stats.get('timeout_cpu', 0)}, "
          f"wall-clock backstop {stats.get('timeout_wall', 0)}")
    if args.json:
        args.json.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
