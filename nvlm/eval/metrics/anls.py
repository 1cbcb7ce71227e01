"""ANLS (DocVQA, InfographicVQA): average normalised Levenshtein similarity.

Official: shunk031/ANLS (PyPI ``anls`` 0.0.2, ``anls/metrics/{score,dist}.py``), the RRC definition.
nvlm: Megatron's DocVQA/InfoVQA branch (``evaluate_vqav2.py``, after the NVLM-1.0 tag), which applies the VQA
normalisation to prediction and answers and then the same ANLS code.
"""

from __future__ import annotations

from ._util import check_profile, levenshtein
from .vqa import normalize_vqa


def _squash(text: str) -> str:
    return " ".join(text.strip().lower().split())


def _similarity(pred: str, gold: str, threshold: float) -> float:
    # The anls package measures lengths of the upper-cased strings ("ß" counts 2); both empty -> distance 0.
    length = max(len(pred.upper()), len(gold.upper()))
    nl = levenshtein(pred, gold) / length if length else 0.0
    return 1.0 - nl if nl < threshold else 0.0


def anls(prediction: str, answers: list[str], *, threshold: float = 0.5, profile: str = "official") -> float:
    """ANLS of one prediction: the best over the answers of ``1 - NL`` if ``NL < threshold`` else 0.

    ``official``: both strings are stripped, lower-cased and their whitespace runs collapsed (case-insensitive,
    space-sensitive); ``NL = Levenshtein / max(len)``; the threshold is strict (``NL == 0.5`` scores 0). An empty
    prediction against an empty answer scores 1 (the package's convention); no answers score 0 (the package
    raises on ``max([])``). ``nvlm``: ``normalize_vqa`` on prediction and answers first, then the same.
    """
    if check_profile(profile) == "nvlm":
        prediction, answers = normalize_vqa(prediction), [normalize_vqa(a) for a in answers]
    pred = _squash(prediction)
    return max((_similarity(pred, _squash(a), threshold) for a in answers), default=0.0)
