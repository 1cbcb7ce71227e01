"""MMMU (validation; test as a submission file) and MathVista testmini (EVAL_SPEC 2.7, 2.9).

MMMU prompts are MMMU's ``construct_prompt`` with ``configs/llava1.5.yaml`` as Megatron uses it. Loaded by
``yaml.safe_load``, that config's double-quoted scalars fold their blank lines, so the formats are
``"{}\\n{}\\nAnswer with the option's letter from the given choices directly."`` and
``"{}\\nAnswer the question using a single word or phrase."``; with the options block ending in a newline a
multiple-choice prompt reads ``{question}\\n(A) x\\n(B) y\\n\\nAnswer with ...``.
- nvlm: Megatron's ``single_image`` path: every ``<image k>`` tag is deleted, ``<image>\\n`` is put in
  front, and only ``image_1`` is fed.
- official: Megatron's multi-image path (same tag): each ``<image k>`` tag becomes an ``<image>``
  placeholder fed with ``image_k``, in the order the tags appear.

MathVista (Megatron ``MathVistaDataset``): multiple choice as ``{question}\\nA. x\\nB. y\\nAnswer with the
option's letter from the given choices directly.``; free form as ``query`` without "Hint: ". System
"Answer the questions." (nvlm) or "You are math expert. Use your math knowledge to calculate the answer."
(official, Megatron HEAD).
"""

from __future__ import annotations

import ast
import json
import random
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nvlm.eval.metrics import MMMU_DOMAINS, mathvista_correct, mmmu_correct, mmmu_parse_choice
from nvlm.eval.tasks.base import (
    LETTER_SUFFIX,
    NVLM_SYSTEM,
    VQA_SUFFIX,
    DataError,
    Prompt,
    Sample,
    Task,
    check_unique,
    letters,
    mean,
    need,
    options_block,
)

MATH_SYSTEM = "You are math expert. Use your math knowledge to calculate the answer."
_TAG = re.compile(r"<image (\d+)>")


class MMMU(Task):
    dirname = "mmmu"
    max_tokens = {"official": 128, "nvlm": 16}
    layout = """mmmu/
  <Subject>/validation-*.parquet, <Subject>/test-*.parquet   (HF MMMU/MMMU, the 30 subject configs)
or data/validation-*.parquet, data/test-*.parquet          (HF lmms-lab/MMMU, all subjects in one)"""

    def __init__(self, name: str, split: str) -> None:
        self.name, self.split = name, split
        self.has_answers = split != "test"
        self.prefix = {"validation": "validation_", "test": "test_", "dev": "dev_"}[split]

    def load(self, root: str | Path) -> list[Sample]:
        d = self.find_dir(root)
        out = []
        for where, row in self.parquet_rows(d, f"{self.split}-*.parquet"):
            sid, question, options, qtype = need(row, where, "id", "question", "options", "question_type")
            if not sid.startswith(self.prefix):  # Megatron keeps only the split's own ids
                continue
            try:
                opts = ast.literal_eval(options) if isinstance(options, str) else list(options)
            except (ValueError, SyntaxError):
                raise DataError(f"{where}: options {options!r} is not a list literal") from None
            images = {int(k.split("_")[1]): v for k, v in row.items() if re.fullmatch(r"image_\d+", k)}
            fields = {
                "question": question,
                "options": [str(o) for o in opts],
                "question_type": qtype,
                "answer": row.get("answer"),
                "subject": _subject(sid, self.prefix),
            }
            if self.has_answers and fields["answer"] is None:
                raise DataError(f"{where}: no answer")
            out.append(Sample(sid, [images[k] for k in sorted(images)], fields))
        return check_unique(out, str(d))

    def text(self, sample: Sample) -> str:
        """MMMU's ``construct_prompt`` (llava1.5 config), ``<image k>`` tags still in."""
        f = sample.fields
        if f["question_type"] == "multiple-choice":
            example = "".join(f"({k}) {o}\n" for k, o in zip(letters(len(f["options"])), f["options"], strict=True))
            return f"{f['question']}\n{example}\n{LETTER_SUFFIX}"
        return f"{f['question']}\n{VQA_SUFFIX}"

    def prompt(self, sample: Sample, profile: str) -> Prompt:
        text = self.text(sample)
        if profile == "nvlm":
            for i in range(8):
                text = text.replace(f"<image {i}>", "")
            return Prompt(NVLM_SYSTEM, f"<image>\n{text}", sample.images[:1])
        images = []
        for k in _TAG.findall(text):
            idx = int(k) - 1
            if idx >= len(sample.images):
                raise DataError(f"{self.name} {sample.id}: <image {k}> in the prompt but no image_{k}")
            images.append(sample.images[idx])
            text = text.replace(f"<image {k}>", "<image>", 1)
        if not images:  # no tag: the first image goes in front, as in the single-image path
            return Prompt(NVLM_SYSTEM, f"<image>\n{text}", sample.images[:1])
        return Prompt(NVLM_SYSTEM, text, images)

    def score(self, predictions: Sequence[str], samples: Sequence[Sample], profile: str) -> dict[str, float]:
        rng = random.Random(42)  # MMMU seeds its random fallback once, then parses in order
        hits = [
            float(
                mmmu_correct(
                    p, s.fields["question_type"], s.fields["answer"], s.fields["options"], rng=rng, profile=profile
                )
            )
            for p, s in zip(predictions, samples, strict=True)
        ]
        out = {"accuracy": mean(hits)}
        domains: dict[str, list[float]] = defaultdict(list)
        for h, s in zip(hits, samples, strict=True):
            domains[MMMU_DOMAINS.get(s.fields["subject"], "Other")].append(h)
        out.update({f"accuracy_{d}": mean(v) for d, v in sorted(domains.items())})
        return out

    def submission(self, predictions: Sequence[str], samples: Sequence[Sample]) -> tuple[str, str] | None:
        """``{id: answer}`` as MMMU's EvalAI server takes it: the parsed letter for multiple choice."""
        if self.has_answers:
            return None

        rng, out = random.Random(42), {}
        for p, s in zip(predictions, samples, strict=True):
            opts = s.fields["options"]
            if s.fields["question_type"] == "multiple-choice":
                choices = list(letters(len(opts)))
                out[s.id] = mmmu_parse_choice(
                    p, choices, dict(zip(choices, opts, strict=True)), rng=rng, profile="official"
                )
            else:
                out[s.id] = p
        return f"{self.name}_submission.json", json.dumps(out, indent=1)


def _subject(sample_id: str, prefix: str) -> str:
    """``validation_Art_Theory_12`` -> ``Art_Theory``."""
    return re.sub(r"_\d+$", "", sample_id.removeprefix(prefix))


class MathVista(Task):
    name, dirname, split = "mathvista_testmini", "mathvista", "testmini"
    max_tokens = {"official": 512, "nvlm": 16}
    layout = """mathvista/
  data/testmini-*.parquet                        (HF AI4Math/MathVista; images in decoded_image, or the
                                                  image path relative to this directory)"""

    def load(self, root: str | Path) -> list[Sample]:
        d = self.find_dir(root)
        out = []
        for where, row in self.parquet_rows(d, "testmini-*.parquet"):
            pid, question, qtype, answer = need(row, where, "pid", "question", "question_type", "answer")
            image: Any = row.get("decoded_image")
            if image is None:
                (path,) = need(row, where, "image")
                image = d / path
                if not image.is_file():
                    raise DataError(f"{where}: image {image} not found")
            choices = list(row.get("choices") or [])
            if qtype == "multi_choice" and answer not in choices:
                raise DataError(f"{where}: answer {answer!r} is not one of its choices {choices}")
            fields = {
                "question": question,
                "query": row.get("query") or question,
                "question_type": qtype,
                "answer_type": row.get("answer_type"),
                "answer": answer,
                "choices": choices,
                "precision": row.get("precision"),
                "unit": row.get("unit"),
            }
            out.append(Sample(str(pid), [image], fields))
        return check_unique(out, str(d))

    def prompt(self, sample: Sample, profile: str) -> Prompt:
        f = sample.fields
        if f["question_type"] == "multi_choice":
            text = f"{f['question']}\n{options_block(f['choices'])}\n{LETTER_SUFFIX}"
        else:
            text = f["query"].replace("Hint: ", "")
        return Prompt(NVLM_SYSTEM if profile == "nvlm" else MATH_SYSTEM, f"<image>\n{text}", list(sample.images))

    def score(self, predictions: Sequence[str], samples: Sequence[Sample], profile: str) -> dict[str, float]:
        rng, hits = random.Random(42), []  # the nvlm profile's MMMU choice parser falls back at random
        for p, s in zip(predictions, samples, strict=True):
            f = s.fields
            hits.append(
                float(
                    mathvista_correct(
                        p,
                        question_type=f["question_type"],
                        answer_type=f["answer_type"],
                        answer=f["answer"],
                        choices=f["choices"],
                        precision=f["precision"],
                        rng=rng,
                        profile=profile,
                    )
                )
            )
        return {"accuracy": mean(hits)}
