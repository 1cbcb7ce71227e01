"""MathVista (testmini) scoring.

Official: lupantech/MathVista ``evaluation/extract_answer.py`` (the rule-based shortcuts before the GPT call)
and ``evaluation/calculate_score.py`` (``normalize_extracted_answer``, ``safe_equal``). The GPT extraction
step is the ``extractor`` argument; without one a rule-based stand-in is used (documented below).
nvlm: Megatron NVLM-1.0 ``evaluate_mathvista.py`` (MMMU's choice parser; VQA normalisation,
``extra_processing`` and ``extract_answer`` for free-form answers).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

from ._util import check_profile, levenshtein
from .mmmu import mmmu_parse_choice
from .vqa import normalize_vqa

_QUICK = re.compile(r'The answer is "(.*)"\.')
_STATED = re.compile(r"(?i:answer)(?:\s+is|:)\s*(.+)")
_LETTER = re.compile(r"\(?([A-Za-z])(?:\)|[.:]|$)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _rule_extract(response: str, question_type: str, answer_type: str) -> str:
    """Our stand-in for the GPT extractor: MathVista's quick-extract regex (``The answer is "X".``), else the
    text after the last "answer is"/"answer:", else the whole response; a leading option letter is kept alone
    for multiple choice, and a number-typed answer that is not a number falls back to the last number."""
    quick = _QUICK.search(response)
    if quick:
        return quick.group(1)
    stated = list(_STATED.finditer(response))
    text = (stated[-1].group(1) if stated else response).strip().rstrip(".").strip()
    if question_type == "multi_choice":
        letter = _LETTER.match(text)
        return letter.group(1) if letter else text
    if answer_type in ("integer", "float") and not _is_number(text):
        numbers = _NUMBER.findall(text) or _NUMBER.findall(response)
        return numbers[-1].replace(",", "") if numbers else text
    return text


def _extract(
    response: str,
    question_type: str,
    answer_type: str,
    choices: list[str] | None,
    extractor: Callable[[str], object] | None,
) -> str:
    """``extract_answer``'s shortcuts, then the extractor (the official GPT call) or the rule-based stand-in."""
    if response == "":
        return ""
    if question_type == "multi_choice" and choices and response in choices:
        return response
    if answer_type == "integer":
        try:
            return str(int(response))
        except ValueError:
            pass
    if answer_type == "float":
        try:
            return str(float(response))
        except ValueError:
            pass
    if extractor is not None:  # the GPT call; a failed one may give None, which MathVista turns into str(x)
        extracted = extractor(response)
        return extracted if isinstance(extracted, str) else str(extracted)
    return _rule_extract(response, question_type, answer_type)


def _normalize(
    extraction: str, choices: list[str] | None, question_type: str, answer_type: str, precision: int | None
) -> str | None:
    """``normalize_extracted_answer``: a letter (or "(X)") becomes its choice, other text the most similar choice
    by edit distance; integers ``str(int(float(x)))``; floats ``str(round(float(x), precision))``."""
    if question_type == "multi_choice":
        extraction = extraction.strip()
        letters = re.findall(r"\(([a-zA-Z])\)", extraction)
        if letters:
            extraction = letters[0].upper()
        choices = choices or []
        options = [chr(ord("A") + i) for i in range(len(choices))]
        if extraction in options:
            return choices[options.index(extraction)]
        if not choices:
            return None
        distances = [levenshtein(extraction, c) for c in choices]
        return choices[distances.index(min(distances))]
    try:
        if answer_type == "integer":
            return str(int(float(extraction)))
        if answer_type == "float":
            value = float(extraction)
            return str(round(value, int(precision)) if precision is not None else value)
    except (ValueError, OverflowError):
        return None
    return extraction


def _extra_processing(text: str) -> str:
    """Megatron's ``extra_processing``: a plain decimal is cut (not rounded) to 2 places and all-zero decimals
    dropped; then every ``%`` and one trailing ``.`` go. Empty text raises ``IndexError`` there (``text[-1]``)."""
    if re.fullmatch(r"\d+\.\d+", text):
        whole, decimals = text.split(".")
        text = whole if all(int(d) == 0 for d in decimals) else text[: len(whole) + 3]
    text = text.replace("%", "")
    return text[:-1] if text[-1] == "." else text


def _extract_answer(text: str) -> str:
    """Megatron's ``extract_answer``: if the text has letters (and no "e+"), the number after "answer is"."""
    if re.search(r"[a-zA-Z]", text) and "e+" not in text:
        template = re.findall(r"answer is -*\d+\.*\d*", text)
        if template:
            numbers = re.findall(r"-*\d+\.*\d*", template[0])
            return numbers[0] if numbers else template[0]
    return text


def _megatron(
    prediction: str, question_type: str, answer: str, choices: list[str] | None, rng: random.Random | None
) -> bool:
    if question_type == "multi_choice":
        choices = choices or []
        letters = [chr(ord("A") + i) for i in range(len(choices))]
        if answer not in choices:
            return False
        parsed = mmmu_parse_choice(prediction, letters, dict(zip(letters, choices, strict=True)), rng=rng)
        return parsed == letters[choices.index(answer)]
    try:
        return _extract_answer(_extra_processing(normalize_vqa(prediction))) == _extra_processing(normalize_vqa(answer))
    except IndexError:  # Megatron crashes on an answer that normalises to "" (or to "%"); we score it wrong
        return False


def mathvista_correct(
    prediction: str,
    *,
    question_type: str,
    answer_type: str,
    answer: str,
    choices: list[str] | None,
    precision: int | None,
    extractor: Callable[[str], object] | None = None,
    rng: random.Random | None = None,
    profile: str = "official",
) -> bool:
    """Is a MathVista response correct? ``answer`` is the dataset's answer (the choice text for multi_choice).

    ``official``: extraction as ``extract_answer.py`` does it, its shortcuts first (an empty response stays
    empty; a multiple-choice response equal to a choice is taken as is; an integer/float answer type takes a
    response that parses as one), then ``extractor(response)`` where MathVista calls GPT (a result that is not a
    string, such as ``None`` from a failed call, becomes ``str(result)`` as there), or, with no extractor,
    a rule-based stand-in (the quick-extract regex ``The answer is "X".``, the text after "answer is", the last
    number for number types). Then ``normalize_extracted_answer`` (letter -> choice, else the nearest choice by
    Levenshtein; ``str(int(float(x)))``; ``str(round(float(x), precision))``, unrounded when ``precision`` is
    None) and string equality with ``answer``.
    ``nvlm`` (Megatron, no LLM): multi_choice answers go through MMMU's choice parser (random fallback from
    ``rng``) and must give the gold choice's letter; free-form ones are VQA-normalised, cut to 2 decimals and
    stripped of ``%`` by ``extra_processing`` and pass ``extract_answer``, the gold is normalised the same way
    (without ``extract_answer``), then string equality: "3.50" != "3.5", "3.149" == "3.14", minus signs are
    lost. A prediction that normalises to nothing (``""``, ``"the"``, ``"%"``) raised ``IndexError`` in Megatron;
    here it scores wrong.
    """
    if check_profile(profile) == "nvlm":
        return _megatron(prediction, question_type, answer, choices, rng)
    extraction = _extract(prediction, question_type, answer_type, choices, extractor)
    return _normalize(extraction, choices, question_type, answer_type, precision) == answer
