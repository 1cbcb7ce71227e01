"""ChartQA relaxed accuracy.

Official: ``relaxed_correctness`` of google-research/pix2struct ``pix2struct/metrics.py`` (also used verbatim by
lmms-eval, VLMEvalKit and InternVL). nvlm: the ChartQA branch of Megatron NVLM-1.0 ``evaluate_vqav2.py``.
"""

from __future__ import annotations

from ._util import check_profile
from .vqa import normalize_vqa


def _to_float(text: str) -> float | None:
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def _pix2struct(prediction: str, target: str) -> bool:
    pred, tgt = _to_float(prediction), _to_float(target)
    if pred is not None and tgt:  # a zero (or unparsable) target needs an exact match
        return abs(pred - tgt) / abs(tgt) <= 0.05
    return prediction.lower() == target.lower()


def _megatron(prediction: str, target: str) -> bool:
    pred, tgt = normalize_vqa(prediction).rstrip("%"), normalize_vqa(target).rstrip("%")
    try:
        p, t = float(pred), float(tgt)
    except ValueError:
        return pred == tgt
    return t * 0.95 <= p <= t * 1.05


def relaxed_accuracy(prediction: str, target: str | list[str], *, profile: str = "official") -> float:
    """1.0 if the prediction is relaxed-correct for any target, else 0.0.

    ``official`` (pix2struct): if the prediction parses as a float (Python ``float``; a trailing ``%`` is
    parsed and divided by 100) and the target parses as a non-zero float, correct when
    ``|p - t| / |t| <= 0.05``; otherwise a case-insensitive exact match of the raw strings.
    ``nvlm`` (Megatron): ``normalize_vqa`` on both, a trailing ``%`` stripped (not rescaled), then
    ``0.95 t <= p <= 1.05 t`` if both parse as floats, else string equality. The normalisation deletes
    commas between digits and turns ``-`` into a space, so minus signs are lost (``"10"`` matches ``"-10"``).
    Megatron asserts a single target; here a list is scored as the best over its targets in both profiles.
    """
    check = _megatron if check_profile(profile) == "nvlm" else _pix2struct
    targets = [target] if isinstance(target, str) else target
    return float(any(check(prediction, t) for t in targets))
