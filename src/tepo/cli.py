"""`tepo train | eval | compare | report | study`: parse the sub-command, then hand over to the library.

Each sub-command's own arguments are parsed where its work is done, so this module stays a thin
dispatcher and imports nothing heavy until a command is chosen.
"""

from __future__ import annotations

import sys

COMMANDS = {
    "train": ("tepo.training.cli", "train_main", "RL fine-tuning with any objective"),
    "eval": ("tepo.evaluation.cli", "eval_main", "pass@k / avg@n / maj@k on math benchmarks"),
    "compare": ("tepo.analysis.cli", "compare_main", "objectives side by side over seeds"),
    "report": ("tepo.analysis.cli", "report_main", "HTML report of a comparison directory or of one run"),
    "study": ("tepo.analysis.cli", "study_main", "run / report a study: tuned arms, seeds, paired test"),
}


def _usage() -> str:
    lines = ["usage: tepo <command> [options]   (tepo <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<8} {desc}" for name, (_, _, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from tepo import __version__

        print(__version__)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"tepo: unknown command {command!r}; known: {', '.join(COMMANDS)}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name, _ = COMMANDS[command]
    import importlib

    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
