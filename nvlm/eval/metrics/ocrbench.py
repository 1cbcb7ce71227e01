"""OCRBench (v1) scoring.

Official: Yuliang-Liu/MultimodalOCR ``example.py`` (the version Megatron cites, 1b7713f4): per item, a binary
substring match, counted out of 1000 in ten categories. nvlm: Megatron NVLM-1.0 ``evaluate_ocrbench.py``, the
same code with ``score += 1`` for every matching ground truth (no ``break``), so one item can count twice.
"""

from __future__ import annotations

from ._util import check_profile

# The ten ``type`` strings of OCRBench.json and how many of the 1000 items each has.
OCRBENCH_CATEGORIES: dict[str, int] = {
    "Regular Text Recognition": 50,
    "Irregular Text Recognition": 50,
    "Artistic Text Recognition": 50,
    "Handwriting Recognition": 50,
    "Digit String Recognition": 50,
    "Non-Semantic Text Recognition": 50,
    "Scene Text-centric VQA": 200,
    "Doc-oriented VQA": 200,
    "Key Information Extraction": 200,
    "Handwritten Mathematical Expression Recognition": 100,
}
_RECOGNITION = tuple(OCRBENCH_CATEGORIES)[:6]


def _prepare(text: str, hme: bool) -> str:
    if hme:  # handwritten maths: newlines and spaces (only " ", as in the official code) removed
        return text.strip().replace("\n", " ").replace(" ", "")
    return text.lower().strip().replace("\n", " ")


def ocrbench_match(prediction: str, answers: list[str] | str, dataset_name: str, *, profile: str = "official") -> int:
    """Score one OCRBench item: does some ground truth occur, as a substring, in the prediction?

    For ``dataset_name == "HME100k"`` both sides are stripped and lose newlines and spaces (case kept); for
    every other set both are lower-cased, stripped and have newlines turned into spaces. ``official``: 1 if
    any answer matches, else 0. ``nvlm``: the number of matching answers (Megatron counts each one).
    """
    profile = check_profile(profile)
    hme = dataset_name == "HME100k"
    pred = _prepare(prediction, hme)
    hits = sum(_prepare(a, hme) in pred for a in ([answers] if isinstance(answers, str) else answers))
    return hits if profile == "nvlm" else int(hits > 0)


def ocrbench_totals(scores: list[int], types: list[str]) -> dict[str, int]:
    """Sum item scores per category; add ``"Text Recognition"`` (the six recognition categories, out of 300)
    and ``"Final Score"`` (everything, out of 1000), as the official script prints them."""
    if len(scores) != len(types):
        raise ValueError(f"{len(scores)} scores but {len(types)} types")
    totals = dict.fromkeys(OCRBENCH_CATEGORIES, 0)
    for score, kind in zip(scores, types, strict=True):
        if kind not in totals:
            raise ValueError(f"unknown OCRBench category {kind!r}")
        totals[kind] += score
    totals["Text Recognition"] = sum(totals[k] for k in _RECOGNITION)
    totals["Final Score"] = sum(totals[k] for k in OCRBENCH_CATEGORIES)
    return totals
