"""GSM8K and MATH answer extraction and equivalence (text-only benchmarks; one profile each).

GSM8K: openai/grade-school-math ``grade_school_math/dataset.py`` (``extract_answer``) for the gold answer; a
prediction is read with lm-evaluation-harness's ``gsm8k`` filters (strict ``####``, else flexible-extract).
MATH: hendrycks/math ``modeling/dataset/util.py`` (``last_boxed_only_string``), ``eval_math_gpt.py``
(``remove_boxed``) and ``math_equivalence.py`` (``is_equiv`` with ``_strip_string``).
"""

from __future__ import annotations

import re

GSM8K_INVALID = "[invalid]"
_GSM_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_GSM_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def gsm8k_extract(text: str) -> str:
    """The official gold-answer extraction: the number after ``#### ``, commas removed; ``"[invalid]"`` if none."""
    match = _GSM_STRICT.search(text)
    return match.group(1).strip().replace(",", "") if match else GSM8K_INVALID


def _gsm_clean(text: str) -> str:
    """lm-eval's ``regexes_to_ignore`` for gsm8k: commas, dollar signs and one trailing period go."""
    text = text.replace(",", "").replace("$", "")
    return text[:-1] if text.endswith(".") else text


def gsm8k_answer(prediction: str) -> str:
    """The answer a model's GSM8K output gives, by lm-eval's rules.

    If the output has ``#### <number>``, that number (strict-match); otherwise the last match of the
    flexible-extract regex ``(-?[$0-9.,]{2,})|(-?[0-9]+)``. Commas, ``$`` and a trailing ``.`` are removed
    (lm-eval's ``regexes_to_ignore``). ``"[invalid]"`` when there is no number. Only ASCII digits count.
    """
    strict = _GSM_STRICT.search(prediction)
    if strict:
        return _gsm_clean(strict.group(1).strip())
    found = _GSM_FLEXIBLE.findall(prediction)
    if not found:
        return GSM8K_INVALID
    return _gsm_clean(next(g for g in found[-1] if g).strip())


def gsm8k_correct(prediction: str, solution: str) -> bool:
    """Does the prediction's answer (``gsm8k_answer``) equal the gold answer (``gsm8k_extract(solution)``)?

    Both are compared as strings after the same cleaning, so ``"18.00"`` is not ``"18"``, as in the official
    exact match. A solution without ``####`` scores False.
    """
    gold = gsm8k_extract(solution)
    return gold != GSM8K_INVALID and gsm8k_answer(prediction) == _gsm_clean(gold)


def last_boxed(text: str) -> str | None:
    """The last ``\\boxed{...}`` (or, without any ``\\boxed``, the last ``\\fbox{...}``) with its braces matched.

    As MATH's ``last_boxed_only_string``: the braces are counted from the command on and ``None`` comes back
    when they never close. Also reads lm-eval's ``\\boxed 5`` form: the text after ``\\boxed `` up to a ``$``.
    """
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
        if start < 0:
            return None
    if text.startswith("\\boxed ", start):
        return "\\boxed " + text[start + len("\\boxed ") :].split("$")[0]
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start : i + 1]
    return None


def strip_boxed(boxed: str | None) -> str | None:
    """``remove_boxed``: the content of ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed x``); ``None`` otherwise."""
    if boxed is None:
        return None
    if boxed.startswith("\\boxed "):
        return boxed[len("\\boxed ") :]
    for left in ("\\boxed{", "\\fbox{"):
        if boxed.startswith(left) and boxed.endswith("}"):
            return boxed[len(left) : -1]
    return None


class _Unnormalisable(Exception):
    """Where MATH's ``_strip_string`` raises; ``is_equiv`` then compares the raw strings."""


def _fix_sqrt(text: str) -> str:
    head, *parts = text.split("\\sqrt")
    for part in parts:
        if not part:
            raise _Unnormalisable
        head += "\\sqrt" + (part if part[0] == "{" else "{" + part[0] + "}" + part[1:])
    return head


def _fix_fracs(text: str) -> str:
    head, *parts = text.split("\\frac")
    for part in parts:
        if not part:
            raise _Unnormalisable
        if part[0] == "{":
            head += "\\frac" + part
        elif len(part) < 2:
            return text  # the original gives up on the whole string here
        elif part[1] == "{":
            head += "\\frac{" + part[0] + "}" + part[1:]
        else:
            head += "\\frac{" + part[0] + "}{" + part[1] + "}" + part[2:]
    return head


def _fix_a_slash_b(text: str) -> str:
    parts = text.split("/")
    if len(parts) != 2:
        return text
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        return text
    return f"\\frac{{{a}}}{{{b}}}" if text == f"{a}/{b}" else text


def _strip_string(text: str) -> str:
    """MATH's ``_strip_string`` normalisation of a LaTeX answer."""
    for old, new in (
        ("\n", ""),
        ("\\!", ""),
        ("\\\\", "\\"),
        ("tfrac", "frac"),
        ("dfrac", "frac"),
        ("\\left", ""),
        ("\\right", ""),
        ("^{\\circ}", ""),
        ("^\\circ", ""),
        ("\\$", ""),
    ):
        text = text.replace(old, new)
    if "\\text{ " in text:  # units on the right ("\text{ " is only ever used for them)
        parts = text.split("\\text{ ")
        if len(parts) != 2:
            raise _Unnormalisable
        text = parts[0]
    # Both of the original's percent replacements remove "\%" ("\%" in a Python literal is backslash-percent).
    text = text.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not text:
        return text
    if text[0] == ".":
        text = "0" + text
    sides = text.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # "k = 5" -> "5"
        text = sides[1]
    text = _fix_fracs(_fix_sqrt(text).replace(" ", ""))
    if text == "0.5":
        text = "\\frac{1}{2}"
    return _fix_a_slash_b(text)


def math_is_equiv(a: str | None, b: str | None) -> bool:
    """MATH's ``is_equiv``: equal after ``_strip_string`` (raw equality where that normalisation fails).

    Two ``None`` are equivalent, one ``None`` is not.
    """
    if a is None or b is None:
        return a is None and b is None
    try:
        return _strip_string(a) == _strip_string(b)
    except _Unnormalisable:
        return a == b


def math_correct(prediction: str, solution: str) -> bool:
    """Is the last boxed answer of ``prediction`` equivalent to the last boxed answer of ``solution``?

    As ``eval_math_gpt.py``: ``strip_boxed(last_boxed(...))`` on both, then ``math_is_equiv``. A solution without
    a boxed answer scores False (the original would call two missing answers equivalent).
    """
    gold = strip_boxed(last_boxed(solution))
    return gold is not None and math_is_equiv(strip_boxed(last_boxed(prediction)), gold)
