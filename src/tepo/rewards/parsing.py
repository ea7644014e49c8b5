"""math-verify's parse of one LaTeX span, read as a whole or not at all.

Both sides reach math-verify as one ``$...$`` span (:func:`tepo.rewards.forms.math_verify_form`):
the answer is already extracted. math-verify's own ``parse`` is made for a whole completion and
searches it: when its first reading of the span fails it goes on to other matches inside it, down
to a bare number, and when a chain ``a = b = c`` cannot be read it reads the part after the last
``=``. On an extracted answer that judges a part of the answer in place of the whole:
``-[0, 1)`` reads as 1, ``2007 + \\frac\\pi 2`` as 2, ``\\hbar \\omega(v+1 / 2) - ...`` as 2 and
``[0 = x = 5`` as 5, each then equal to a gold of that number: false positives.

:func:`parse_whole` takes the first reading only (``extraction_mode="first_match"``, LaTeX
extraction only) and refuses a reading of the last equation when the whole does not parse. What
math-verify cannot read as a whole is kept as its text (a string), which equals only the same text.
"""

from __future__ import annotations

_LATEX_ONLY = None  # (LatexExtractionConfig(),), made on first use (importing math-verify is slow)


def _config() -> tuple:
    global _LATEX_ONLY
    if _LATEX_ONLY is None:
        from math_verify import LatexExtractionConfig

        _LATEX_ONLY = (LatexExtractionConfig(),)
    return _LATEX_ONLY


def parse_whole(latex: str, timeout: int | None) -> list:
    """math-verify's parse of ``latex`` (one ``$...$`` span) as a whole: ``[expression, text]``,
    ``[text]`` when it cannot be read as a whole, ``[]`` when nothing matches. ``timeout``:
    math-verify's own (wall-clock, main thread only) parsing timeout, None for none."""
    from math_verify import parse

    parsed = parse(latex, extraction_config=_config(), extraction_mode="first_match", parsing_timeout=timeout)
    if len(parsed) == 2 and isinstance(parsed[1], str) and not _reads_whole(parsed[1]):
        return [parsed[1]]  # math-verify read the last equation only: keep the text
    return parsed


def _reads_whole(normalized: str) -> bool:
    """False when math-verify's reading of ``normalized`` (its normalised LaTeX) can only have come
    from its fallback to the last equation of a chain, the whole being unreadable."""
    from math_verify.parser import get_last_eq

    if get_last_eq(normalized) == normalized:
        return True  # no fallback possible: the reading is of the whole
    return _latex_parses(normalized)


def _latex_parses(normalized: str) -> bool:
    # The first attempt of math-verify's parse_latex_cached, exactly.
    from latex2sympy2_extended.latex2sympy2 import latex2sympy
    from math_verify.grader import should_treat_as_complex

    try:
        latex2sympy(normalized, is_real=not should_treat_as_complex(normalized), convert_degrees=False,
                    normalization_config=None)
    except Exception:  # noqa: BLE001 - any failure: not readable as a whole
        return False
    return True
