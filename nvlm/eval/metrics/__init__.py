"""Benchmark scorers, each in two profiles: ``official`` (the benchmark's own scorer, the default) and
``nvlm`` (Megatron-LM's NVLM-1.0 scoring). See docs/EVAL_METRICS.md."""

from ._util import PROFILES
from .anls import anls
from .caption import bleu, caption_tokenize, cider
from .chartqa import relaxed_accuracy
from .choice import choice_correct, extract_choice
from .code import pass_at_k
from .mathvista import mathvista_correct
from .mmmu import MMMU_DOMAINS, mmmu_correct, mmmu_eval_open, mmmu_parse_choice, mmmu_parse_open
from .ocrbench import OCRBENCH_CATEGORIES, ocrbench_match, ocrbench_totals
from .textonly import (
    GSM8K_INVALID,
    gsm8k_answer,
    gsm8k_correct,
    gsm8k_extract,
    last_boxed,
    math_correct,
    math_is_equiv,
    strip_boxed,
)
from .vqa import first_line, normalize_vqa, textvqa_accuracy, vqa_accuracy

__all__ = [
    "GSM8K_INVALID",
    "MMMU_DOMAINS",
    "OCRBENCH_CATEGORIES",
    "PROFILES",
    "anls",
    "bleu",
    "caption_tokenize",
    "choice_correct",
    "cider",
    "extract_choice",
    "first_line",
    "gsm8k_answer",
    "gsm8k_correct",
    "gsm8k_extract",
    "last_boxed",
    "math_correct",
    "math_is_equiv",
    "mathvista_correct",
    "mmmu_correct",
    "mmmu_eval_open",
    "mmmu_parse_choice",
    "mmmu_parse_open",
    "normalize_vqa",
    "ocrbench_match",
    "ocrbench_totals",
    "pass_at_k",
    "relaxed_accuracy",
    "strip_boxed",
    "textvqa_accuracy",
    "vqa_accuracy",
]
