"""MMMU answer parsing and scoring.

Official: MMMU-Benchmark/MMMU ``eval_utils.py`` (``parse_multi_choice_response``, ``parse_open_response``,
``eval_multi_choice``, ``eval_open``) and ``data_utils.py`` (subjects and domains), as run by
``main_eval_only.py``. nvlm: Megatron NVLM-1.0 ``evaluate_mmmu.py`` calls the same MMMU functions (from a
clone of the MMMU repository) on first-line-truncated answers, so both profiles score alike here; the
truncation is the runner's job (``first_line``).
"""

from __future__ import annotations

import random
import re

from ._util import check_profile

# subject -> domain, from MMMU's DOMAIN_CAT2SUB_CAT (the subject names are the HF config names).
MMMU_DOMAINS: dict[str, str] = {
    subject: domain
    for domain, subjects in {
        "Art and Design": "Art Art_Theory Design Music",
        "Business": "Accounting Economics Finance Manage Marketing",
        "Science": "Biology Chemistry Geography Math Physics",
        "Health and Medicine": "Basic_Medical_Science Clinical_Medicine Diagnostics_and_Laboratory_Medicine "
        "Pharmacy Public_Health",
        "Humanities and Social Science": "History Literature Sociology Psychology",
        "Tech and Engineering": "Agriculture Architecture_and_Engineering Computer_Science Electronics "
        "Energy_and_Power Materials Mechanical_Engineering",
    }.items()
    for subject in subjects.split()
}

# MMMU seeds the module-level ``random`` with 42 on import and draws the fallback choice from it, so the
# fallback depends on how many unparsable answers came before: score in the dataset's order to reproduce it.
_FALLBACK_RNG = random.Random(42)

_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_TRIVIAL = {":", ",", ".", "!", "?", ";", "'"}
_NUMBER_PATTERNS = (
    re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b"),  # with thousands separators
    re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+"),  # scientific notation
    re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])"),  # plain
)


def mmmu_parse_choice(
    response: str,
    all_choices: list[str],
    index2ans: dict[str, str],
    *,
    rng: random.Random | None = None,
    profile: str = "official",
) -> str:
    """MMMU's ``parse_multi_choice_response``: the option letter a response gives.

    The response loses ``, . ! ? ; : '`` from both ends (one character class after the other, as the official
    loop does) and is padded with spaces. Candidates are the letters written ``(X)``; failing that, letters
    standing alone (`` X ``); failing that, and only for responses of more than 5 words, the options whose text
    occurs in the response. Of several candidates the one occurring last wins; with none, a random choice.
    The random fallback draws from ``rng``, by default a module-level ``random.Random(42)`` standing in for
    MMMU's ``random.seed(42)``: like the original, the result depends on the order of the calls.
    Both profiles behave alike (Megatron NVLM-1.0 calls this very function).
    """
    check_profile(profile)
    if not all_choices:
        raise ValueError("a multiple-choice question needs at least one choice")
    for ch in ",.!?;:'":
        response = response.strip(ch)
    response = f" {response} "
    candidates = [c for c in all_choices if f"({c})" in response]
    marker = "({})" if candidates else " {} "
    if not candidates:
        candidates = [c for c in all_choices if f" {c} " in response]
    by_text = False
    if not candidates and len(response.split()) > 5:
        candidates = [k for k, v in index2ans.items() if v.lower() in response.lower()]
        by_text = bool(candidates)
    if not candidates:
        return (rng or _FALLBACK_RNG).choice(all_choices)
    if len(candidates) == 1:
        return candidates[0]
    if by_text:
        positions = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
    else:
        positions = [response.rfind(marker.format(c)) for c in candidates]
    return candidates[positions.index(max(positions))]


def _normalize(text: str) -> list:
    """MMMU's ``normalize_str``: a number becomes a float rounded to 2 places; text is lower-cased, and a
    one-character text is padded on either side (two entries) so it cannot match inside a word."""
    text = text.strip()
    try:
        return [round(float(text.replace(",", "")), 2)]
    except ValueError:
        pass
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


def _key_responses(response: str) -> list[str]:
    """The tails of each line after the indicator word that leaves the shortest tail."""
    response = response.strip().strip(".").lower()
    # The official split is r"\.\s(?=[A-Z])|\n" on lower-cased text: only the newlines ever split.
    lines = response.split("\n")
    keys = []
    for i, line in enumerate(lines):
        indicators = _INDICATORS + (("=",) if i == len(lines) - 1 else ())
        shortest = None
        for ind in indicators:
            if ind in line:
                tail = line.split(ind)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in _TRIVIAL:
            keys.append(shortest)
    return keys or [response]


def mmmu_parse_open(response: str) -> list:
    """MMMU's ``parse_open_response``: candidate answers (floats and lower-case strings) in a response.

    Keeps the tail of each line after "could be/so/is/thus/therefore/final/answer/result" (and "=" on the last
    line), adds every number found in those tails, and normalises each (numbers to floats with 2 decimals).
    The official code returns ``list(set(...))``; this keeps first-seen order instead (the scoring looks at every
    element, so order does not matter).
    """
    keys = _key_responses(response)
    found = keys + [n for key in keys for pattern in _NUMBER_PATTERNS for n in pattern.findall(key)]
    parsed: list = []
    for item in found:
        for norm in _normalize(item):
            if norm not in parsed:
                parsed.append(norm)
    return parsed


def mmmu_eval_open(gold: str | list[str], parsed: list) -> bool:
    """MMMU's ``eval_open``: a parsed number equal to a normalised gold number, or a normalised gold string
    contained in a parsed string."""
    norm: list = [n for g in ([gold] if isinstance(gold, str) else gold) for n in _normalize(str(g))]
    for pred in parsed:
        if isinstance(pred, str):
            if any(isinstance(n, str) and n in pred for n in norm):
                return True
        elif pred in norm:
            return True
    return False


def mmmu_correct(
    prediction: str,
    question_type: str,
    answer: str | list[str],
    options: list[str],
    *,
    rng: random.Random | None = None,
    profile: str = "official",
) -> bool:
    """Score one MMMU answer as ``main_eval_only.py`` does.

    ``question_type == "multiple-choice"``: the letter from ``mmmu_parse_choice`` (options lettered A, B, ...)
    must equal ``answer`` (or one of a list of answers). Otherwise ``mmmu_eval_open(answer,
    mmmu_parse_open(prediction))``. Both profiles behave alike (see the module docstring).
    """
    check_profile(profile)
    if question_type == "multiple-choice":
        letters = [chr(ord("A") + i) for i in range(len(options))]
        parsed = mmmu_parse_choice(
            prediction, letters, dict(zip(letters, options, strict=True)), rng=rng, profile=profile
        )
        return parsed in answer if isinstance(answer, list) else parsed == answer
    return mmmu_eval_open(answer, mmmu_parse_open(prediction))
