"""OCRBench v1 (EVAL_SPEC 2.6): ``<image>\\n{question}``, scored out of 1000 with a per-category breakdown."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from nvlm.eval.metrics import ocrbench_match, ocrbench_totals
from nvlm.eval.tasks.base import (
    FOLLOW_SYSTEM,
    NVLM_SYSTEM,
    DataError,
    Prompt,
    Sample,
    Task,
    check_unique,
    need,
    read_json,
)


class OCRBench(Task):
    name, dirname, split = "ocrbench", "ocrbench", "test"
    max_tokens = {"official": 128, "nvlm": 16}
    main_metric = "Final Score"
    layout = """ocrbench/
  OCRBench.json + OCRBench_Images/<image_path>   (github.com/Yuliang-Liu/MultimodalOCR; image_path may
                                                  also be relative to the JSON file)
or data/test-*.parquet                           (HF echo840/OCRBench)"""

    def load(self, root: str | Path) -> list[Sample]:
        d = self.find_dir(root)
        path = d / "OCRBench.json"
        out = []
        if path.is_file():
            records = read_json(path)
            if not isinstance(records, list):
                raise DataError(f"{path}: expected a list of records")
            for i, r in enumerate(records):
                where = f"{path}: record {i}"
                image, question, answers, name, kind = need(
                    r, where, "image_path", "question", "answers", "dataset_name", "type"
                )
                candidates = [d / "OCRBench_Images" / image, d / image]
                found = next((c for c in candidates if c.is_file()), None)
                if found is None:
                    raise DataError(f"{where}: image {image} not found in {d / 'OCRBench_Images'} or {d}")
                out.append(Sample(str(r.get("id", i)), [found], _fields(question, answers, name, kind)))
            return check_unique(out, str(path))
        for i, (where, row) in enumerate(self.parquet_rows(d, "OCRBench.json or test-*.parquet")):
            name, question, kind, answers, image = need(
                row, where, "dataset", "question", "question_type", "answer", "image"
            )
            out.append(Sample(str(i), [image], _fields(question, answers, name, kind)))
        return out

    def prompt(self, sample: Sample, profile: str) -> Prompt:
        system = NVLM_SYSTEM if profile == "nvlm" else FOLLOW_SYSTEM
        return Prompt(system, f"<image>\n{sample.fields['question']}", list(sample.images))

    def score(self, predictions: Sequence[str], samples: Sequence[Sample], profile: str) -> dict[str, float]:
        scores = [
            ocrbench_match(p, s.fields["answers"], s.fields["dataset_name"], profile=profile)
            for p, s in zip(predictions, samples, strict=True)
        ]
        return {k: float(v) for k, v in ocrbench_totals(scores, [s.fields["type"] for s in samples]).items()}


def _fields(question: str, answers: object, name: str, kind: str) -> dict:
    answers = [str(a) for a in answers] if isinstance(answers, (list, tuple)) else [str(answers)]
    return {"question": question, "answers": answers, "dataset_name": name, "type": kind}
