"""Short-answer VQA: VQAv2, TextVQA, DocVQA and ChartQA (EVAL_SPEC 2.1-2.4).

Prompt ``<image>\\n{question}\\n{suffix}``. nvlm profile: system "Answer the questions." and "Answer the
question using a single word or phrase." for all four (DocVQA is not at the NVLM-1.0 tag; it gets the tag's
VQA prompt). official profile (Megatron HEAD, spec section 8): system "Follow the user's instruction and
answer questions."; TextVQA and DocVQA end with "...single word, phrase, or number.", VQAv2 and ChartQA
with "...single word or phrase.".
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nvlm.eval.metrics import anls, relaxed_accuracy, textvqa_accuracy, vqa_accuracy
from nvlm.eval.tasks.base import (
    FOLLOW_SYSTEM,
    NUMBER_SUFFIX,
    NVLM_SYSTEM,
    VQA_SUFFIX,
    DataError,
    Prompt,
    Sample,
    Task,
    check_unique,
    mean,
    need,
    parquet_files,
    read_json,
    read_parquet,
)


class _VQA(Task):
    official_suffix = VQA_SUFFIX
    max_tokens = {"official": 16, "nvlm": 16}

    def prompt(self, sample: Sample, profile: str) -> Prompt:
        suffix = VQA_SUFFIX if profile == "nvlm" else self.official_suffix
        system = NVLM_SYSTEM if profile == "nvlm" else FOLLOW_SYSTEM
        return Prompt(system, f"<image>\n{sample.fields['question']}\n{suffix}", list(sample.images))


def _image_file(directory: Path, name: str, where: str) -> Path:
    path = directory / name
    if not path.is_file():
        raise DataError(f"{where}: image {path} not found")
    return path


# ------------------------------------------------------------------------------------------- VQAv2


class VQAv2(_VQA):
    dirname = "vqav2"
    main_metric = "accuracy"
    layout = """vqav2/
  data/validation-*.parquet, data/testdev-*.parquet    (HF lmms-lab/VQAv2)
or the official release (visualqa.org):
  v2_OpenEnded_mscoco_val2014_questions.json + v2_mscoco_val2014_annotations.json + val2014/*.jpg
  v2_OpenEnded_mscoco_test-dev2015_questions.json + test2015/*.jpg"""
    _official = {
        "validation": (
            "v2_OpenEnded_mscoco_val2014_questions.json",
            "v2_mscoco_val2014_annotations.json",
            "val2014",
            "COCO_val2014_{:012d}.jpg",
        ),
        "testdev": ("v2_OpenEnded_mscoco_test-dev2015_questions.json", None, "test2015", "COCO_test2015_{:012d}.jpg"),
    }

    def __init__(self, name: str, split: str) -> None:
        self.name, self.split = name, split
        self.has_answers = split != "testdev"

    def load(self, root: str | Path) -> list[Sample]:
        d = self.find_dir(root)
        questions, annotations, image_dir, image_name = self._official[self.split]
        if (d / questions).is_file():
            return self._load_official(d, questions, annotations, image_dir, image_name)
        out = []
        for where, row in self.parquet_rows(d, f"{self.split}-*.parquet or {questions}"):
            qid, question, image = need(row, where, "question_id", "question", "image")
            answers = [a["answer"] if isinstance(a, dict) else a for a in row.get("answers") or []]
            if self.has_answers and not answers:
                raise DataError(f"{where}: no answers")
            fields = {"question": question, "answers": answers, "answer_type": row.get("answer_type")}
            out.append(Sample(str(qid), [image], fields))
        return check_unique(out, str(d))

    def _load_official(
        self, d: Path, questions: str, annotations: str | None, image_dir: str, image_name: str
    ) -> list[Sample]:
        qs = read_json(d / questions)
        anns: dict[Any, dict] = {}
        if annotations:
            if not (d / annotations).is_file():
                raise self.missing(d, annotations)
            anns = {a["question_id"]: a for a in read_json(d / annotations).get("annotations", [])}
        out = []
        for i, q in enumerate(qs.get("questions", [])):
            where = f"{d / questions}: question {i}"
            qid, question, image_id = need(q, where, "question_id", "question", "image_id")
            fields: dict[str, Any] = {"question": question, "answers": [], "answer_type": None}
            if annotations:
                if qid not in anns:
                    raise DataError(f"{where}: question_id {qid} has no annotation in {annotations}")
                fields["answers"] = [a["answer"] for a in anns[qid]["answers"]]
                fields["answer_type"] = anns[qid].get("answer_type")
            out.append(Sample(str(qid), [_image_file(d / image_dir, image_name.format(image_id), where)], fields))
        return check_unique(out, str(d / questions))

    def score(self, predictions: Sequence[str], samples: Sequence[Sample], profile: str) -> dict[str, float]:
        acc = [vqa_accuracy(p, s.fields["answers"], profile=profile) for p, s in zip(predictions, samples, strict=True)]
        out = {"accuracy": mean(acc)}
        by_type: dict[str, list[float]] = defaultdict(list)
        for a, s in zip(acc, samples, strict=True):
            if s.fields.get("answer_type"):
                by_type[s.fields["answer_type"]].append(a)
        out.update({f"accuracy_{t}": mean(v) for t, v in sorted(by_type.items())})
        return out

    def submission(self, predictions: Sequence[str], samples: Sequence[Sample]) -> tuple[str, str] | None:
        return None if self.has_answers else _answers_file(self.name, "question_id", predictions, samples)


# ----------------------------------------------------------------------------------------- TextVQA


class TextVQA(_VQA):
    name, dirname, split = "textvqa_val", "textvqa", "validation"
    official_suffix = NUMBER_SUFFIX
    layout = """textvqa/
  data/validation-*.parquet                      (HF lmms-lab/textvqa)
or the official release (textvqa.org):
  TextVQA_0.5.1_val.json + train_images/<image_id>.jpg"""

    def load(self, root: str | Path) -> list[Sample]:
        d = self.find_dir(root)
        if (d / "TextVQA_0.5.1_val.json").is_file():
            path = d / "TextVQA_0.5.1_val.json"
            data = read_json(path)
            out = []
            for i, r in enumerate(data.get("data", []) if isinstance(data, dict) else []):
                where = f"{path}: record {i}"
                qid, question, answers, image_id = need(r, where, "question_id", "question", "answers", "image_id")
                image = _image_file(d / "train_images", f"{image_id}.jpg", where)
                out.append(Sample(str(qid), [image], {"question": question, "answers": list(answers)}))
            return check_unique(out, str(path))
        out = []
        for where, row in self.parquet_rows(d, "validation-*.parquet or TextVQA_0.5.1_val.json"):
            qid, question, answers, image = need(row, where, "question_id", "question", "answers", "image")
            out.append(Sample(str(qid), [image], {"question": question, "answers": list(answers)}))
        return check_unique(out, str(d))

    def score(self, predictions: Sequence[str], samples: Sequence[Sample], profile: str) -> dict[str, float]:
        return {
            "accuracy": mean(
                [
                    textvqa_accuracy(p, s.fields["answers"], profile=profile)
                    for p, s in zip(predictions, samples, strict=True)
                ]
            )
        }


# ------------------------------------------------------------------------------------------ DocVQA


class DocVQA(_VQA):
    dirname = "docvqa"
    main_metric = "anls"
    official_suffix = NUMBER_SUFFIX
    max_tokens = {"official": 32, "nvlm": 16}
    layout = """docvqa/
  DocVQA/validation-*.parquet, DocVQA/test-*.parquet   (HF lmms-lab/DocVQA, config DocVQA; its
                                                        InfographicVQA/ folder is ignored)
or the RRC release (rrc.cvc.uab.es, Single Page DocVQA):
  val_v1.0_withQT.json (or val_v1.0.json), test_v1.0.json, with their "image" paths
  (documents/<name>.png) relative to the JSON file"""
    _json = {"validation": ("val_v1.0_withQT.json", "val_v1.0.json"), "test": ("test_v1.0.json",)}

    def __init__(self, name: str, split: str) -> None:
        self.name, self.split = name, split
        self.has_answers = split != "test"

    def load(self, root: str | Path) -> list[Sample]:
        d = self.find_dir(root)
        for name in self._json[self.split]:
            if (d / name).is_file():
                return self._load_json(d / name)
        files = [f for f in parquet_files(d, self.split) if "InfographicVQA" not in f.parts]
        if not files:
            raise self.missing(d, f"{self.split}-*.parquet or {self._json[self.split][0]}")
        out = []
        for where, row in read_parquet(files):
            qid, question, image = need(row, where, "questionId", "question", "image")
            answers = list(row.get("answers") or [])
            if self.has_answers and not answers:
                raise DataError(f"{where}: no answers")
            out.append(Sample(str(qid), [image], {"question": question, "answers": answers}))
        return check_unique(out, str(d))

    def _load_json(self, path: Path) -> list[Sample]:
        data = read_json(path)
        out = []
        for i, r in enumerate(data.get("data", []) if isinstance(data, dict) else []):
            where = f"{path}: record {i}"
            qid, question, image = need(r, where, "questionId", "question", "image")
            answers = list(r.get("answers") or [])
            if self.has_answers and not answers:
                raise DataError(f"{where}: no answers")
            image = _image_file(path.parent, image, where)
            out.append(Sample(str(qid), [image], {"question": question, "answers": answers}))
        return check_unique(out, str(path))

    def score(self, predictions: Sequence[str], samples: Sequence[Sample], profile: str) -> dict[str, float]:
        return {
            "anls": mean(
                [anls(p, s.fields["answers"], profile=profile) for p, s in zip(predictions, samples, strict=True)]
            )
        }

    def submission(self, predictions: Sequence[str], samples: Sequence[Sample]) -> tuple[str, str] | None:
        return None if self.has_answers else _answers_file(self.name, "questionId", predictions, samples)


# ----------------------------------------------------------------------------------------- ChartQA


class ChartQA(_VQA):
    name, dirname, split = "chartqa", "chartqa", "test"
    main_metric = "relaxed_overall"
    layout = """chartqa/
  data/test-*.parquet                            (HF lmms-lab/ChartQA: type, question, answer, image)
or the original release (github.com/vis-nlp/ChartQA):
  test/test_human.json, test/test_augmented.json, test/png/<imgname>"""

    def load(self, root: str | Path) -> list[Sample]:
        d = self.find_dir(root)
        if (d / "test" / "test_human.json").is_file():
            out = []
            for kind in ("human", "augmented"):
                path = d / "test" / f"test_{kind}.json"
                records = read_json(path) if path.is_file() else []
                for i, r in enumerate(records):
                    where = f"{path}: record {i}"
                    imgname, query, label = need(r, where, "imgname", "query", "label")
                    image = _image_file(d / "test" / "png", imgname, where)
                    out.append(Sample(f"{kind}_{i}", [image], {"question": query, "answer": str(label), "type": kind}))
            return check_unique(out, str(d / "test"))
        out = []
        for i, (where, row) in enumerate(self.parquet_rows(d, "test-*.parquet or test/test_human.json")):
            question, answer, image = need(row, where, "question", "answer", "image")
            kind = str(row.get("type") or "").removesuffix("_test")
            out.append(Sample(str(i), [image], {"question": question, "answer": str(answer), "type": kind}))
        return out

    def score(self, predictions: Sequence[str], samples: Sequence[Sample], profile: str) -> dict[str, float]:
        acc = [
            relaxed_accuracy(p, s.fields["answer"], profile=profile) for p, s in zip(predictions, samples, strict=True)
        ]
        out = {"relaxed_overall": mean(acc)}
        for kind in ("human", "augmented"):
            part = [a for a, s in zip(acc, samples, strict=True) if s.fields["type"] == kind]
            if part:
                out[f"relaxed_{kind}"] = mean(part)
        return out


def _int(x: str) -> int | str:
    try:
        return int(x)
    except ValueError:
        return x


def _answers_file(task: str, id_key: str, predictions: Sequence[str], samples: Sequence[Sample]) -> tuple[str, str]:
    """The evaluation server's submission: a JSON list of {id_key: question id, "answer": prediction}."""
    rows = [{id_key: _int(s.id), "answer": p} for p, s in zip(predictions, samples, strict=True)]
    return f"{task}_submission.json", json.dumps(rows)
