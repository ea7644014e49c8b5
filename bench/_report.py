"""Write one benchmark's section of docs/benchmarks.md, leaving the other sections as they are.

Each bench script owns the text between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n\nEvery figure here is written by a script in `bench/`; rerun it to check. Each section names the machine.\n"


def machine() -> str:
    """A one-line description of where the numbers were measured."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    import os

    return f"{os.cpu_count()}-core CPU, {platform.processor() or platform.machine()} (torch {torch.__version__}, {torch.get_num_threads()} threads)"


def write_section(name: str, markdown: str, doc: Path = DOC) -> None:
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = doc.read_text() if doc.exists() else HEADER
    block = f"{begin}\n{markdown.strip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
