"""Caption metrics: CIDEr-D and BLEU-1..4 as pycocoevalcap 1.2 computes them (salaniz/pycocoevalcap, the
``tylin/coco-caption`` code: ``cider/cider_scorer.py``, ``bleu/bleu_scorer.py``), after its tokenizer
(``tokenizer/ptbtokenizer.py``: Stanford PTBTokenizer ``-preserveLines -lowerCase`` over all captions as one
file, then the punctuation tokens dropped): pycocoevalcap's own when it and Java are installed, else the
pure-Python port of the same lexer rules in ``ptb.py``.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import shutil
from collections import Counter
from typing import Literal

from .ptb import ptb_lines

Tokenizer = Literal["auto", "java", "python"]
# pycocoevalcap's PUNCTUATIONS, removed after tokenising. The bracket names are upper case in its list while
# the tokenizer lower-cases them, so "-lrb-" and friends survive; we keep that.
_DROPPED = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}


@functools.cache
def java_tokenizer_available() -> bool:
    """Whether pycocoevalcap's PTBTokenizer can run here (the package and a ``java`` on the PATH)."""
    return importlib.util.find_spec("pycocoevalcap") is not None and shutil.which("java") is not None


def tokenize_captions(captions: list[str], tokenizer: Tokenizer = "auto") -> list[list[str]]:
    """Each caption's words as pycocoevalcap scores them: PTBTokenizer over the captions written one per line
    (a rule's lookahead may read into the next line, as it does there), lower-cased, the punctuation tokens
    dropped, then split on whitespace as its scorers split (a space kept inside a token, as in ``2 3/4``,
    splits it). ``tokenizer``: ``"java"`` runs pycocoevalcap's PTBTokenizer, ``"python"`` the port,
    ``"auto"`` the first when it can run."""
    if tokenizer not in ("auto", "java", "python"):
        raise ValueError(f"tokenizer must be 'auto', 'java' or 'python', not {tokenizer!r}")
    if not captions:
        return []
    if tokenizer == "java" or (tokenizer == "auto" and java_tokenizer_available()):
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        out = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
        return [out[i][0].split() if i in out else [] for i in range(len(captions))]
    lines = ptb_lines(captions)
    return [" ".join(t.lower() for t in line if t.lower() not in _DROPPED).split() for line in lines]


def caption_tokenize(text: str) -> list[str]:
    """One caption's words as pycocoevalcap scores them, by the pure-Python PTBTokenizer (``ptb.py``): the
    caption alone in the file. Numbers, ordinals and decades stay whole ("2nd", "1950s", "3/4", "1,000",
    "3.5"); clitics split ("is n't", "ca n't", "dog 's"); "a&b" is "a & b" but "AT&T" one token; runs of
    "!"/"?" ("!!", "?!") are tokens that pycocoevalcap keeps; brackets become "-lrb-" and friends (kept too);
    single quotes, ".", ",", "?", "!", ":", ";", "-", "--", "..." are dropped."""
    return tokenize_captions([text], tokenizer="python")[0]


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def _check(predictions: list[str], references: list[list[str]]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions or any(not refs for refs in references):
        raise ValueError("every image needs a prediction and at least one reference")


def _tokenized(
    predictions: list[str], references: list[list[str]], tokenizer: Tokenizer
) -> tuple[list[list[str]], list[list[list[str]]]]:
    """Predictions and references tokenised as ``COCOEvalCap`` does: the references of all images as one
    file, the predictions as another."""
    _check(predictions, references)
    flat = tokenize_captions([r for rs in references for r in rs], tokenizer)
    refs, start = [], 0
    for rs in references:
        refs.append(flat[start : start + len(rs)])
        start += len(rs)
    return tokenize_captions(predictions, tokenizer), refs


def cider(
    predictions: list[str], references: list[list[str]], tokenizer: Tokenizer = "auto"
) -> tuple[float, list[float]]:
    """CIDEr-D of pycocoevalcap 1.2 (``Cider().compute_score`` after its tokenizer): (corpus score, per image).

    For n = 1..4: TF-IDF vectors of the n-grams, with document frequencies counted over the reference sets of
    *the images scored here* (so a subset is not comparable with the full set), ``idf = log(#images) -
    log(max(1, df))``; the similarity to each reference clips the prediction's weights at the reference's,
    divides by both norms and multiplies by a Gaussian length penalty (sigma 6) on the difference of the two
    captions' bigram counts (pycocoevalcap's ``length``). Averaged over n and over references, times 10; the
    corpus score is the mean over images. Scale as pycocoevalcap's (the COCO demo's 0.600; papers print x100).
    ``tokenizer`` as in ``tokenize_captions``.
    """
    n, sigma = 4, 6.0
    pred_words, ref_words = _tokenized(predictions, references, tokenizer)
    refs = [[_ngrams(r, n) for r in rs] for rs in ref_words]
    tests = [_ngrams(p, n) for p in pred_words]
    df: Counter = Counter(g for rs in refs for g in set().union(*rs))
    log_images = math.log(len(references))

    def vector(counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(n)]
        for gram, tf in counts.items():
            vec[len(gram) - 1][gram] = tf * (log_images - math.log(max(1.0, df[gram])))
        norms = [math.sqrt(sum(w * w for w in v.values())) for v in vec]
        return vec, norms, sum(tf for g, tf in counts.items() if len(g) == 2)

    scores = []
    for test, rs in zip(tests, refs, strict=True):
        vec, norm, length = vector(test)
        total = 0.0
        for ref in rs:
            rvec, rnorm, rlength = vector(ref)
            penalty = math.exp(-((length - rlength) ** 2) / (2 * sigma**2))
            for k in range(n):
                val = sum(min(w, rvec[k].get(g, 0.0)) * rvec[k].get(g, 0.0) for g, w in vec[k].items())
                if norm[k] and rnorm[k]:
                    val /= norm[k] * rnorm[k]
                total += val * penalty
        scores.append(total / n / len(rs) * 10.0)
    return sum(scores) / len(scores), scores


def bleu(predictions: list[str], references: list[list[str]], tokenizer: Tokenizer = "auto") -> list[float]:
    """Corpus BLEU-1..4 of pycocoevalcap 1.2 (``Bleu(4).compute_score``, ``option="closest"``).

    Clipped n-gram counts summed over the corpus, the reference length of each image being the one closest
    to the prediction's (the shorter on ties), a brevity penalty on the corpus lengths, and pycocoevalcap's
    smoothing constants (1e-15 on matches, 1e-9 on guesses). On the 0-1 scale. ``tokenizer`` as in
    ``tokenize_captions``.
    """
    n, tiny, small = 4, 1e-15, 1e-9
    correct, guess = [0] * n, [0] * n
    test_len = ref_len = 0
    pred_words, all_ref_words = _tokenized(predictions, references, tokenizer)
    for words, ref_words in zip(pred_words, all_ref_words, strict=True):
        counts = _ngrams(words, n)
        best: dict = {}
        for rw in ref_words:
            for gram, c in _ngrams(rw, n).items():
                best[gram] = max(best.get(gram, 0), c)
        for gram, c in counts.items():
            correct[len(gram) - 1] += min(best.get(gram, 0), c)
        for k in range(n):
            guess[k] += max(0, len(words) - k)
        test_len += len(words)
        ref_len += min((abs(len(rw) - len(words)), len(rw)) for rw in ref_words)[1]
    scores, product = [], 1.0
    for k in range(n):
        product *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (test_len + tiny) / (ref_len + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores
