"""Caption metrics: CIDEr-D and BLEU-1..4 as pycocoevalcap 1.2 computes them (salaniz/pycocoevalcap, the
``tylin/coco-caption`` code: ``cider/cider_scorer.py``, ``bleu/bleu_scorer.py``), with a pure-Python stand-in
for its Java tokenizer (``tokenizer/ptbtokenizer.py``: Stanford PTBTokenizer ``-preserveLines -lowerCase``,
then the punctuation tokens dropped).
"""

from __future__ import annotations

import math
import re
from collections import Counter

# Tokens pycocoevalcap drops after tokenising. The bracket names are upper case in its list while the
# tokenizer lower-cases them, so "-lrb-" and friends survive; we keep that.
_DROPPED = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "inc", "ltd", "co", "corp", "prof",
                  "mt", "ft", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct",
                  "nov", "dec", "e.g", "i.e"}
_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"),
                "wanna": ("wan", "na"), "lemme": ("lem", "me"), "gimme": ("gim", "me")}
_CLITIC = re.compile(r"(?i)(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_TOKEN = re.compile(
    r"""\.\.\.|--|``|''|[()\[\]{}"]        # ellipsis, dashes, quotes, brackets
    | \d+(?:[.,:]\d+)*(?:-\w[\w-]*)?       # numbers: 3.5, 1,000, 2:30, 1.2.3, 1,000-piece
    | \.\d+                               # .5
    | (?:\w\.){2,}                        # acronyms: u.s., p.m., e.g.
    | (?:[\w@][\w@'&/.+-]*[\w@]|\w)\.?   # words, hyphenated, e-mail, paths, o'neil, "mr."
    | \S""",
    re.VERBOSE,
)


def _word(token: str) -> list[str]:
    """Split clitics and a trailing period off one word-like token."""
    lower = token.lower()
    if lower in _SPLIT_WORDS:
        return list(_SPLIT_WORDS[lower])
    out: list[str] = []
    if token.endswith(".") and not re.fullmatch(r"(?:\w\.)+", token):
        stem = token[:-1]
        if stem.lower() in _ABBREVIATIONS:
            return [token]
        token, out = stem, ["."]
    if token.endswith("'") and len(token) > 1:  # plural possessive: "dogs'"
        token, out = token[:-1], ["'"] + out
    clitic = _CLITIC.fullmatch(token)  # "can't" -> "ca" "n't", as PTB does
    if clitic:
        return list(clitic.groups()) + out
    return [token] + out


def caption_tokenize(text: str) -> list[str]:
    """Tokenise a caption as pycocoevalcap does (PTBTokenizer, lower-cased), without Java.

    Punctuation is split off (but kept inside numbers "1,000", "3.5", "2:30", acronyms "u.s.", hyphenated
    words, e-mail addresses and paths); clitics are split ("isn't" -> "is n't", "can't" -> "ca n't",
    "dog's" -> "dog 's"); brackets become "-lrb-" and friends (which pycocoevalcap keeps); currency, "%", "#"
    and "&" are tokens of their own. Then the tokens pycocoevalcap removes (quotes, ".", ",", "?", "!", ":",
    ";", "-", "--", "...") are dropped. It is a stand-in for the Java tokenizer: it agrees on ordinary
    captions, and rare constructions (abbreviations at the end of a sentence, emoticons, URLs) may differ.
    """
    tokens: list[str] = []
    for raw in _TOKEN.findall(text.replace("\n", " ")):
        if raw in _BRACKETS:
            tokens.append(_BRACKETS[raw])
        elif raw[0].isalnum() or raw[0] in "_@":
            tokens.extend(_word(raw))
        else:
            tokens.append(raw)
    return [t.lower() for t in tokens if t not in _DROPPED and t != '"']


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i: i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def _check(predictions: list[str], references: list[list[str]]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions or any(not refs for refs in references):
        raise ValueError("every image needs a prediction and at least one reference")


def cider(predictions: list[str], references: list[list[str]]) -> tuple[float, list[float]]:
    """CIDEr-D of pycocoevalcap 1.2 (``Cider().compute_score`` after its tokenizer): (corpus score, per image).

    For n = 1..4: TF-IDF vectors of the n-grams, with document frequencies counted over the reference sets of
    *the images scored here* (so a subset is not comparable with the full set), ``idf = log(#images) -
    log(max(1, df))``; the similarity to each reference clips the prediction's weights at the reference's,
    divides by both norms and multiplies by a Gaussian length penalty (sigma 6) on the difference of the two
    captions' bigram counts (pycocoevalcap's ``length``). Averaged over n and over references, times 10; the
    corpus score is the mean over images. Scale as pycocoevalcap's (the COCO demo's 0.600; papers print x100).
    """
    _check(predictions, references)
    n, sigma = 4, 6.0
    refs = [[_ngrams(caption_tokenize(r), n) for r in rs] for rs in references]
    tests = [_ngrams(caption_tokenize(p), n) for p in predictions]
    df: Counter = Counter(g for rs in refs for g in set().union(*rs))
    log_images = math.log(len(references))

    def vector(counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(n)]
        for gram, tf in counts.items():
            vec[len(gram) - 1][gram] = tf * (log_images - math.log(max(1.0, df[gram])))
        norms = [math.sqrt(sum(w * w for w in v.values())) for v in vec]
        return vec, norms, sum(tf for g, tf in counts.items() if len(g) == 2)

    scores = []
    for test, rs in zip(tests, refs):
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


def bleu(predictions: list[str], references: list[list[str]]) -> list[float]:
    """Corpus BLEU-1..4 of pycocoevalcap 1.2 (``Bleu(4).compute_score``, ``option="closest"``).

    Clipped n-gram counts summed over the corpus, the reference length of each image being the one closest
    to the prediction's (the shorter on ties), a brevity penalty on the corpus lengths, and pycocoevalcap's
    smoothing constants (1e-15 on matches, 1e-9 on guesses). On the 0-1 scale.
    """
    _check(predictions, references)
    n, tiny, small = 4, 1e-15, 1e-9
    correct, guess = [0] * n, [0] * n
    test_len = ref_len = 0
    for pred, rs in zip(predictions, references):
        words = caption_tokenize(pred)
        ref_words = [caption_tokenize(r) for r in rs]
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
