"""Multiple choice over an image: AI2D (with and without mask), MMBench and RealWorldQA (EVAL_SPEC 2.5, 2.10, 2.12).

AI2D and MMBench: ``<image>\\n{question}\\nA. ...\\nB. ...\\nAnswer with the option's letter from the given
choices directly.`` (MMBench puts its hint first when there is one). RealWorldQA's questions already hold
their choices and instruction, so they go in verbatim. System: "Answer the questions." (nvlm) or "Follow the
user's instruction and answer questions." (official, Megatron HEAD's for AI2D and RealWorldQA).
"""

from __future__ import annotations

import base64
import csv
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from nvlm.eval.metrics import choice_correct, normalize_vqa
from nvlm.eval.tasks.base import (
    FOLLOW_SYSTEM,
    LETTER_SUFFIX,
    NVLM_SYSTEM,
    DataError,
    Prompt,
    Sample,
    Task,
    check_unique,
    letters,
    mean,
    need,
    options_block,
    parquet_files,
    read_parquet,
)


class _Choice(Task):
    max_tokens = {"official": 16, "nvlm": 16}

    def system(self, profile: str) -> str:
        return NVLM_SYSTEM if profile == "nvlm" else FOLLOW_SYSTEM

    def prompt(self, sample: Sample, profile: str) -> Prompt:
        f = sample.fields
        text = f"{f['question']}\n{options_block(f['options'])}\n{LETTER_SUFFIX}"
        if f.get("hint"):
            text = f"{f['hint']}\n{text}"
        return Prompt(self.system(profile), f"<image>\n{text}", list(sample.images))

    def score(self, predictions: Sequence[str], samples: Sequence[Sample], profile: str) -> dict[str, float]:
        return {
            "accuracy": mean(
                [
                    float(choice_correct(p, s.fields["answer"], options=s.fields["options"], profile=profile))
                    for p, s in zip(predictions, samples, strict=True)
                ]
            )
        }


class AI2D(_Choice):
    split = "test"

    def __init__(self, name: str, dirname: str, hf_repo: str) -> None:
        self.name, self.dirname = name, dirname
        self.layout = f"""{dirname}/
  data/test-*.parquet                            (HF {hf_repo}: question, options, answer index, image)"""

    def load(self, root: str | Path) -> list[Sample]:
        d = self.find_dir(root)
        out = []
        for i, (where, row) in enumerate(self.parquet_rows(d, "test-*.parquet")):
            question, options, answer, image = need(row, where, "question", "options", "answer", "image")
            try:
                letter = letters(len(options))[int(answer)]
            except (ValueError, IndexError):
                raise DataError(f"{where}: answer {answer!r} is not an index into its {len(options)} options") from None
            out.append(
                Sample(
                    str(row.get("question_id", i)),
                    [image],
                    {"question": question, "options": list(options), "answer": letter},
                )
            )
        return check_unique(out, str(d))


class MMBench(_Choice):
    name, dirname, split = "mmbench_en_dev", "mmbench", "dev"
    max_tokens = {"official": 32, "nvlm": 16}
    layout = """mmbench/
  en/dev-*.parquet                               (HF lmms-lab/MMBench, config en)
or VLMEvalKit's TSV:
  MMBench_DEV_EN.tsv                             (base64 images)"""

    def load(self, root: str | Path) -> list[Sample]:
        d = self.find_dir(root)
        if (d / "MMBench_DEV_EN.tsv").is_file():
            rows = list(_read_tsv(d / "MMBench_DEV_EN.tsv"))
        else:
            files = parquet_files(d / "en", self.split) if (d / "en").is_dir() else parquet_files(d, self.split)
            if not files:
                raise self.missing(d, "en/dev-*.parquet or MMBench_DEV_EN.tsv")
            rows = list(read_parquet(files))
        out = []
        for where, row in rows:
            index, question, answer, image = need(row, where, "index", "question", "answer", "image")
            opts = {k: row[k] for k in "ABCDEFGH" if _present(row.get(k))}
            if list(opts) != list(letters(len(opts))) or answer not in opts:
                raise DataError(f"{where}: options {list(opts)} with answer {answer!r}")
            hint = row.get("hint") if _present(row.get("hint")) else None
            fields = {
                "question": question,
                "options": list(opts.values()),
                "answer": answer,
                "hint": hint,
                "category": row.get("category"),
            }
            out.append(Sample(str(index), [image], fields))
        return check_unique(out, str(d))


class RealWorldQA(_Choice):
    name, dirname, split = "realworldqa", "realworldqa", "test"
    layout = """realworldqa/
  data/test-*.parquet                            (HF lmms-lab/RealWorldQA or xai-org/RealworldQA)"""

    def load(self, root: str | Path) -> list[Sample]:
        d = self.find_dir(root)
        out = []
        for i, (where, row) in enumerate(self.parquet_rows(d, "test-*.parquet")):
            question, answer, image = need(row, where, "question", "answer", "image")
            out.append(Sample(str(i), [image], {"question": question, "answer": str(answer).strip()}))
        return out

    def prompt(self, sample: Sample, profile: str) -> Prompt:
        return Prompt(self.system(profile), f"<image>\n{sample.fields['question']}", list(sample.images))

    def score(self, predictions: Sequence[str], samples: Sequence[Sample], profile: str) -> dict[str, float]:
        """Letter answers as multiple choice; other answers by exact match (VQA-normalised for nvlm, as
        Megatron HEAD; lower-cased without a final '.' for official, as lmms-eval)."""
        hits = []
        for p, s in zip(predictions, samples, strict=True):
            answer = s.fields["answer"]
            if re.fullmatch(r"[A-Z]", answer):
                hits.append(float(choice_correct(p, answer, profile=profile)))
            elif profile == "nvlm":
                hits.append(float(normalize_vqa(p) == normalize_vqa(answer)))
            else:
                hits.append(float(p.strip().rstrip(".").lower() == answer.lower()))
        return {"accuracy": mean(hits)}


def _present(v: object) -> bool:
    """Not None, not NaN, not empty (MMBench leaves missing options and hints as NaN or empty)."""
    if v is None:
        return False
    if isinstance(v, float) and v != v:
        return False
    return not (isinstance(v, str) and v.strip().lower() in ("", "nan", "none"))


def _read_tsv(path: Path):
    """VLMEvalKit's TSV: base64 images; a short ``image`` cell names the row whose image it shares."""
    csv.field_size_limit(sys.maxsize)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    by_index = {r.get("index"): r.get("image", "") for r in rows}
    for n, row in enumerate(rows, 2):
        where = f"{path}:{n}"
        image = row.get("image") or ""
        if len(image) <= 64:
            image = by_index.get(image, "")
        try:
            row["image"] = base64.b64decode(image, validate=True) if image else None
        except ValueError:
            raise DataError(f"{where}: image is not base64") from None
        yield where, row
