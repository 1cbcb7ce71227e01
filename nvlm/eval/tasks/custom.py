"""``--tasks jsonl:PATH``: your own data, one JSON record a line.

Record: ``{"id": ..., "image": "rel/path.png" | "images": [...], "question": ..., "answer": ... | "answers":
[...]}``. ``id`` defaults to the line number; image paths are relative to the JSONL file; a record without
images is a text-only question. The question is asked as ``<image>\\n`` per image then the question (unless
it already holds one ``<image>`` per image). Scores: ``exact_match`` (the VQA-normalised prediction equals a
normalised answer) and, when every record has at least 3 answers, ``vqa_accuracy`` (the profile's VQA
accuracy; with fewer human answers it has no meaning: one answer scores 0 officially). A malformed record
is an error naming the file and line.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from nvlm.eval.metrics import normalize_vqa, vqa_accuracy
from nvlm.eval.tasks.base import (
    NVLM_SYSTEM,
    DataError,
    MissingData,
    Prompt,
    Sample,
    Task,
    check_unique,
    mean,
    read_jsonl,
)


class JsonlTask(Task):
    dirname = ""
    split = "jsonl"
    max_tokens = {"official": 32, "nvlm": 16}
    main_metric = "exact_match"
    layout = """a JSONL file, one record a line:
  {"id": "q1", "image": "images/q1.png", "question": "What color is the square?", "answer": "red"}
  ("images": [...] for several, "answers": [...] for several; paths relative to the file)"""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.name = f"jsonl:{self.path.stem}"

    def load(self, root: str | Path | None = None) -> list[Sample]:
        if not self.path.is_file():
            raise MissingData(f"{self.name}: {self.path} not found; expected {self.layout}")
        out = []
        for n, (where, r) in enumerate(read_jsonl(self.path), 1):
            if not isinstance(r, dict):
                raise DataError(f"{where}: expected an object, got {type(r).__name__}")
            if not isinstance(r.get("question"), str):
                raise DataError(f"{where}: missing field 'question' (a string)")
            answers = r.get("answers", r.get("answer"))
            answers = [answers] if isinstance(answers, (str, int, float)) else answers
            if (
                not isinstance(answers, list)
                or not answers
                or not all(isinstance(a, (str, int, float)) for a in answers)
            ):
                raise DataError(f"{where}: needs 'answer' (a string) or 'answers' (a non-empty list of strings)")
            images = r.get("images", [r["image"]] if r.get("image") is not None else [])
            if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
                raise DataError(f"{where}: 'image' must be a path, 'images' a list of paths")
            paths = []
            for rel in images:
                p = self.path.parent / rel
                if not p.is_file():
                    raise DataError(f"{where}: image {p} not found")
                paths.append(p)
            sid = str(r.get("id", n))
            out.append(Sample(sid, paths, {"question": r["question"], "answers": [str(a) for a in answers]}))
        if not out:
            raise DataError(f"{self.path}: no records")
        return check_unique(out, str(self.path))

    def prompt(self, sample: Sample, profile: str) -> Prompt:
        q, n = sample.fields["question"], len(sample.images)
        text = q if n and q.count("<image>") == n else "<image>\n" * n + q
        return Prompt(NVLM_SYSTEM, text, list(sample.images))

    def score(self, predictions: Sequence[str], samples: Sequence[Sample], profile: str) -> dict[str, float]:
        exact = [
            float(normalize_vqa(p) in {normalize_vqa(a) for a in s.fields["answers"]})
            for p, s in zip(predictions, samples, strict=True)
        ]
        out = {"exact_match": mean(exact)}
        if all(len(s.fields["answers"]) >= 3 for s in samples):
            out["vqa_accuracy"] = mean(
                [
                    vqa_accuracy(p, s.fields["answers"], profile=profile)
                    for p, s in zip(predictions, samples, strict=True)
                ]
            )
        return out
