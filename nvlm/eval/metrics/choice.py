"""Multiple-choice letter matching (AI2D, MMBench, RealWorldQA, MMLU and other letter-answer tasks).

Official: there is no single official scorer; ``extract_choice`` follows the rules lmms-eval and VLMEvalKit
share (a leading ``X``/``X.``/``(X)``/``X)``, an "answer is X" phrase, or the text of exactly one option), then
the letter is compared with the gold letter. nvlm: Megatron's AI2D branch of ``evaluate_vqav2.py`` (NVLM-1.0
tag; RealWorldQA uses the same code at HEAD): VQA-normalised string equality of prediction and gold letter.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

from ._util import check_profile
from .vqa import normalize_vqa

_ALONE = re.compile(r"\W*([A-Za-z])\W*")  # the whole answer is one letter in punctuation: "B", "(c)", "D."
_LEADING = re.compile(r"(?:\(([A-Za-z])\)|([A-Z])[.):])(?=\s|$)")  # "(B) text", "B. text", "B) text", "B: text"
_STATED = re.compile(r"(?i:answer|option|choice)(?:\s+is)?\s*:?\s*(?:\(([A-Za-z])\)|([A-Z])\b)")
_EDGE_PUNCT = string.punctuation + " \t\n"


def _letter(match: re.Match[str] | None) -> str | None:
    return next((g.upper() for g in match.groups() if g), None) if match else None


def _option_letter(text: str, letters: Sequence[str], options: Sequence[str]) -> str | None:
    """The letter of the option whose text the prediction is, or the one option whose text it contains."""
    said = text.lower().strip(_EDGE_PUNCT)
    texts = {
        letter: opt.lower().strip(_EDGE_PUNCT) for letter, opt in zip(letters, options, strict=False)
    }  # no letter: no match
    exact = [letter for letter, opt in texts.items() if opt and opt == said]
    if len(exact) == 1:
        return exact[0]
    found = {
        letter: opt for letter, opt in texts.items() if opt and re.search(r"(?<!\w)" + re.escape(opt) + r"(?!\w)", said)
    }
    # "black cat" names one option even when "cat" is another: drop options inside a longer match.
    found = {k: v for k, v in found.items() if not any(v != w and v in w for w in found.values())}
    return next(iter(found)) if len(found) == 1 else None


def extract_choice(
    prediction: str, letters: Sequence[str] = string.ascii_uppercase, options: Sequence[str] | None = None
) -> str | None:
    """The option letter a free-form answer picks, or ``None``.

    In order: the whole answer is one letter (``"B"``, ``"(b)"``, ``"C."``); it starts with ``(X)`` or an upper-case
    ``X.``/``X)``/``X:`` followed by a space or the end; it says "answer/option/choice (is) X" (the last such
    phrase; a bare letter must be upper case so "the answer is a cat" picks nothing); it is, or contains as
    whole words, the text of exactly one option. A bare leading "A " is not read as a letter (it is
    usually the article). With ``options`` the letters are cut to ``len(options)``.
    """
    letters = [x.upper() for x in (letters[: len(options)] if options is not None else letters)]
    text = prediction.strip()
    if not text:
        return None
    alone = _ALONE.fullmatch(text)
    candidates = [_letter(alone), _letter(_LEADING.match(text))]
    candidates.append(_letter(list(_STATED.finditer(text))[-1]) if _STATED.search(text) else None)
    for letter in candidates:
        if letter in letters:
            return letter
    return _option_letter(text, letters, options) if options else None


def choice_correct(
    prediction: str, answer: str, *, options: Sequence[str] | None = None, profile: str = "official"
) -> bool:
    """Is the prediction the gold option letter ``answer``?

    ``official``: ``extract_choice(prediction, options=options)`` equals ``answer`` (case-insensitive).
    ``nvlm``: ``normalize_vqa(prediction) == normalize_vqa(answer)``. The normalisation drops articles, so the
    gold letter "A" becomes "" and an empty prediction, "An" or "The" count as correct for it; "B." and "(C)"
    are correct, "A. sun" and "D) moon" are not.
    """
    if check_profile(profile) == "nvlm":
        return normalize_vqa(prediction) == normalize_vqa(answer)
    return extract_choice(prediction, options=options) == answer.strip().upper()
