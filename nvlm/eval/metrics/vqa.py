"""VQA accuracy (VQAv2, TextVQA) and the VQA answer normalisation every Megatron scorer reuses.

Sources reproduced:

* ``normalize_vqa``: ``processPunctuation`` then ``processDigitArticle`` of the official VQA evaluation
  (GT-Vision-Lab/VQA ``vqaEval.py``) in open_flamingo's copy (``open_flamingo/eval/vqa_metric.py``), the one
  Megatron imports.
* ``vqa_accuracy`` official: ``VQAEval.evaluate`` (10-choose-9 average, normalisation only when the ground
  truths differ); nvlm: Megatron NVLM-1.0 ``evaluate_vqav2.py::compute_vqa_accuracy`` (always normalise,
  ``min(1, n/3)``).
* ``textvqa_accuracy`` official: MMF's ``EvalAIAnswerProcessor`` + ``TextVQAAccuracyEvaluator``.
"""

from __future__ import annotations

import re

from ._util import check_profile

_PUNCT = ';/[]"{}()=+\\_-><@`,?!'
_VQA_COMMA = re.compile(r"(\d)(,)(\d)")  # VQA: a comma between digits anywhere -> punctuation is deleted
_EVALAI_COMMA = re.compile(r"(?<=\d)(,)+(?=\d)")
# The official pattern is "(?!<=\d)(\.)(?!\d)": a typo for a look-behind, so it only keeps periods followed
# by a digit. It is applied with ``sub(..., re.UNICODE)``, which passes 32 as *count*: at most 32 periods go.
_PERIOD = re.compile(r"\.(?!\d)")
_PERIOD_COUNT = int(re.UNICODE)
_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
# The VQA contraction table, generated: a form with one apostrophe is keyed by its apostrophe-free spelling,
# a form with several by each spelling that lacks exactly one of them ("couldnt've", "couldn'tve").
_CONTRACTED = [
    "ain't",
    "aren't",
    "can't",
    "could've",
    "couldn't",
    "couldn't've",
    "didn't",
    "doesn't",
    "don't",
    "hadn't",
    "hadn't've",
    "hasn't",
    "haven't",
    "he'd",
    "he'd've",
    "he's",
    "how'd",
    "how'll",
    "how's",
    "isn't",
    "it'd",
    "it'd've",
    "it'll",
    "ma'am",
    "mightn't",
    "mightn't've",
    "might've",
    "mustn't",
    "must've",
    "needn't",
    "not've",
    "o'clock",
    "oughtn't",
    "'ow's'at",
    "shan't",
    "she'd've",
    "should've",
    "shouldn't",
    "shouldn't've",
    "somebody'd've",
    "somebody'll",
    "somebody's",
    "someone'd",
    "someone'd've",
    "someone'll",
    "someone's",
    "something'd",
    "something'd've",
    "something'll",
    "that's",
    "there'd",
    "there'd've",
    "there're",
    "there's",
    "they'd",
    "they'd've",
    "they'll",
    "they're",
    "they've",
    "'twas",
    "wasn't",
    "we'd've",
    "we've",
    "weren't",
    "what'll",
    "what're",
    "what's",
    "what've",
    "when's",
    "where'd",
    "where's",
    "where've",
    "who'd",
    "who'd've",
    "who'll",
    "who's",
    "who've",
    "why'll",
    "why're",
    "why's",
    "won't",
    "would've",
    "wouldn't",
    "wouldn't've",
    "y'all",
    "y'all'll",
    "y'all'd've",
    "you'd",
    "you'd've",
    "you'll",
    "you're",
    "you've",
]


def _contraction_table() -> dict[str, str]:
    table = {}
    for word in _CONTRACTED:
        cuts = [i for i, c in enumerate(word) if c == "'"]
        keys = [word.replace("'", "")] if len(cuts) == 1 else [word[:i] + word[i + 1 :] for i in cuts]
        table.update(dict.fromkeys(keys, word))
    # The table's own oddity, kept: it maps "somebody'd" to "somebodyd". (Its capitalised keys "Im", "Ive",
    # "Id've", "I'dve" never match lower-cased words, and "let's"/"she's" map to themselves.)
    table["somebody'd"] = "somebodyd"
    return table


_CONTRACTIONS = _contraction_table()


def _process_punctuation(text: str, comma: re.Pattern[str]) -> str:
    """Each punctuation mark is deleted if it touches a space (or a digit-comma-digit occurs), else spaced."""
    delete_all = comma.search(text) is not None
    out = text
    for p in _PUNCT:
        out = out.replace(p, "" if delete_all or p + " " in text or " " + p in text else " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def _process_digit_article(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_vqa(text: str) -> str:
    """The VQA answer normalisation: ``processPunctuation`` then ``processDigitArticle`` (open_flamingo copy).

    Punctuation next to a space is deleted, other punctuation becomes a space (all of it is deleted when the
    text holds a digit-comma-digit), periods not followed by a digit go; then lower-case, number words to
    digits, articles dropped, contractions restored: ``"A Dog."`` -> ``"dog"``, ``"one-way"`` -> ``"1 way"``.
    """
    return _process_digit_article(_process_punctuation(text, _VQA_COMMA))


def first_line(text: str) -> str:
    """Megatron NVLM-1.0 answer post-processing (``run_text_generation.py::get_prompt_and_generated``).

    Strip, then keep what comes before the first blank line and before the first newline.
    """
    return text.strip().split("\n\n")[0].split("\n")[0]


def _leave_one_out(prediction: str, answers: list[str]) -> float:
    """Mean over leaving each answer out of ``min(1, #other answers equal to the prediction / 3)``."""
    if not answers:
        return 0.0
    hits = answers.count(prediction)
    return sum(min(1.0, (hits - (a == prediction)) / 3) for a in answers) / len(answers)


def _megatron_vqa(prediction: str, answers: list[str]) -> float:
    pred = normalize_vqa(prediction)
    return min(1.0, sum(normalize_vqa(a) == pred for a in answers) / 3)


def _vqa_clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(prediction: str, answers: list[str], *, profile: str = "official") -> float:
    """VQA accuracy of one prediction against its human answers (normally 10), in [0, 1].

    ``official`` (GT-Vision-Lab ``VQAEval``): newlines and tabs become spaces and everything is stripped;
    prediction and answers are normalised with ``normalize_vqa`` only if the answers are not all identical;
    the score is the mean, over leaving each answer out, of ``min(1, #remaining answers equal to the
    prediction / 3)``. With fewer than 10 answers the leave-one-out runs over however many there are (so a
    single answer always scores 0); no answers score 0.
    ``nvlm`` (Megatron NVLM-1.0 ``compute_vqa_accuracy``): always normalise, ``min(1, #equal answers / 3)``.
    """
    if check_profile(profile) == "nvlm":
        return _megatron_vqa(prediction, answers)
    pred, gts = _vqa_clean(prediction), [_vqa_clean(a) for a in answers]
    if len(set(gts)) > 1:
        pred, gts = normalize_vqa(pred), [normalize_vqa(a) for a in gts]
    return _leave_one_out(pred, gts)


def _evalai_normalize(text: str) -> str:
    """MMF's ``EvalAIAnswerProcessor``: ``word_tokenize`` (lower, drop "," and "?", "'s" -> " 's"), then the VQA
    rules."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = _vqa_clean(text)
    return _process_digit_article(_process_punctuation(text, _EVALAI_COMMA))


def textvqa_accuracy(prediction: str, answers: list[str], *, profile: str = "official") -> float:
    """TextVQA accuracy in [0, 1].

    ``official`` (MMF ``TextVQAAccuracyEvaluator``, as copied by LLaVA, InternVL and lmms-eval): the EvalAI
    answer processor is applied to the prediction and to every answer, always; then the same leave-one-out
    ``min(1, n/3)`` average as VQA. ``nvlm``: Megatron scores TextVQA exactly like VQAv2 (``vqa_accuracy``
    with ``profile="nvlm"``), without the EvalAI ``word_tokenize`` step.
    """
    if check_profile(profile) == "nvlm":
        return _megatron_vqa(prediction, answers)
    return _leave_one_out(_evalai_normalize(prediction), [_evalai_normalize(a) for a in answers])
