"""Text-only benchmarks: MMLU, GSM8K, MATH and HumanEval (EVAL_SPEC 2.13-2.16).

NVIDIA did not publish its protocol for these (EVAL_SPEC 1.4), so ours is stated here and in docs/EVAL.md,
and is the same for both profiles (no first-line cut; scored with the benchmarks' official rules):
- MMLU: 0-shot chat, generative: ``The following is a multiple choice question about {subject}.\\n\\n
  {question}\\nA. ...\\nD. ...\\nAnswer with the option's letter from the given choices directly.``; the
  letter is extracted from the answer; micro average over questions.
- GSM8K and MATH: 0-shot chat, ``{problem}\\nPlease reason step by step, and put your final answer within
  \\boxed{}.``; the final answer is taken from the response (``\\boxed``, else the scorer's fallbacks).
- HumanEval: plain completion of the prompt (no chat template), greedy, stopped at lm-eval's stop
  sequences (``\\nclass``, ``\\ndef``, ``\\n#``, ``\\nif``, ``\\nprint``); pass@1 in a subprocess sandbox.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from nvlm.eval.metrics import choice_correct, gsm8k_correct, math_correct
from nvlm.eval.sandbox import evaluate_humaneval
from nvlm.eval.tasks.base import (
    LETTER_SUFFIX,
    NVLM_SYSTEM,
    DataError,
    Prompt,
    Sample,
    Task,
    check_unique,
    mean,
    need,
    options_block,
    parquet_files,
    read_csv,
    read_json,
    read_jsonl,
    read_parquet,
)

BOXED = "Please reason step by step, and put your final answer within \\boxed{}."


class _Text(Task):
    first_line = False

    def postprocess(self, raw: str, profile: str) -> str:
        return raw.strip()


class MMLU(_Text):
    name, dirname, split = "mmlu", "mmlu", "test"
    max_tokens = {"official": 32, "nvlm": 32}
    layout = """mmlu/
  data/test/<subject>_test.csv                   (people.eecs.berkeley.edu/~hendrycks/data.tar; no header:
                                                  question, A, B, C, D, answer letter)
or all/test-*.parquet                            (HF cais/mmlu, config all: question, subject, choices, answer)"""

    def load(self, root: str | Path) -> list[Sample]:
        d = self.find_dir(root)
        csvs = sorted(d.glob("data/test/*_test.csv")) or sorted(d.glob("test/*_test.csv"))
        out = []
        if csvs:
            for path in csvs:
                subject = path.name.removesuffix("_test.csv")
                for i, (where, row) in enumerate(read_csv(path)):
                    if len(row) != 6 or row[5].strip() not in "ABCD" or not row[5].strip():
                        raise DataError(f"{where}: expected question, 4 choices and an answer letter")
                    out.append(
                        Sample(
                            f"{subject}/{i}",
                            [],
                            {"subject": subject, "question": row[0], "options": row[1:5], "answer": row[5].strip()},
                        )
                    )
            return check_unique(out, str(d))
        files = parquet_files(d / "all", self.split) if (d / "all").is_dir() else parquet_files(d, self.split)
        if not files:
            raise self.missing(d, "data/test/*_test.csv or all/test-*.parquet")
        counts: dict[str, int] = {}
        for where, record in read_parquet(files):
            question, subject, choices, answer = need(record, where, "question", "subject", "choices", "answer")
            if len(choices) != 4 or answer not in range(4):
                raise DataError(f"{where}: expected 4 choices and an answer index 0-3")
            n = counts[subject] = counts.get(subject, -1) + 1
            out.append(
                Sample(
                    f"{subject}/{n}",
                    [],
                    {"subject": subject, "question": question, "options": list(choices), "answer": "ABCD"[answer]},
                )
            )
        return check_unique(out, str(d))

    def prompt(self, sample: Sample, profile: str) -> Prompt:
        f = sample.fields
        subject = f["subject"].replace("_", " ")
        text = (
            f"The following is a multiple choice question about {subject}.\n\n{f['question'].strip()}\n"
            f"{options_block(f['options'])}\n{LETTER_SUFFIX}"
        )
        return Prompt(NVLM_SYSTEM, text)

    def score(self, predictions: Sequence[str], samples: Sequence[Sample], profile: str) -> dict[str, float]:
        return {
            "accuracy": mean(
                [
                    float(choice_correct(p, s.fields["answer"], options=s.fields["options"], profile="official"))
                    for p, s in zip(predictions, samples, strict=True)
                ]
            )
        }


class GSM8K(_Text):
    name, dirname, split = "gsm8k", "gsm8k", "test"
    max_tokens = {"official": 512, "nvlm": 512}
    layout = """gsm8k/
  test.jsonl (or data/test.jsonl)                (github.com/openai/grade-school-math: question, answer)
or main/test-*.parquet                           (HF openai/gsm8k, config main)"""

    def load(self, root: str | Path) -> list[Sample]:
        d = self.find_dir(root)
        path = next(
            (
                p
                for p in (d / "test.jsonl", d / "data" / "test.jsonl", d / "grade_school_math" / "data" / "test.jsonl")
                if p.is_file()
            ),
            None,
        )
        if path is not None:
            rows = list(read_jsonl(path))
        else:  # the HF repo also has a "socratic" config with the same questions: read "main" only
            files = parquet_files(d / "main", self.split) if (d / "main").is_dir() else parquet_files(d, self.split)
            if not files:
                raise self.missing(d, "test.jsonl or main/test-*.parquet")
            rows = list(read_parquet(files))
        out = []
        for i, (where, row) in enumerate(rows):
            question, solution = need(row, where, "question", "answer")
            out.append(Sample(str(i), [], {"question": question, "solution": solution}))
        return out

    def prompt(self, sample: Sample, profile: str) -> Prompt:
        return Prompt(NVLM_SYSTEM, f"{sample.fields['question']}\n{BOXED}")

    def score(self, predictions: Sequence[str], samples: Sequence[Sample], profile: str) -> dict[str, float]:
        return _solved(gsm8k_correct, predictions, samples)


class MATH(_Text):
    name, dirname, split = "math", "math", "test"
    max_tokens = {"official": 1024, "nvlm": 1024}
    layout = """math/
  test/<type>/<n>.json                           (github.com/hendrycks/math release: problem, level, type,
                                                  solution)
or <config>/test-*.parquet                       (HF EleutherAI/hendrycks_math, its 7 configs)"""

    def load(self, root: str | Path) -> list[Sample]:
        d = self.find_dir(root)
        jsons = sorted(d.glob("test/*/*.json"), key=lambda p: (p.parent.name, _num(p.stem)))
        out = []
        if jsons:
            for path in jsons:
                problem, solution = need(read_json(path), str(path), "problem", "solution")
                out.append(Sample(f"{path.parent.name}/{path.stem}", [], {"problem": problem, "solution": solution}))
            return check_unique(out, str(d / "test"))
        counts: dict[str, int] = {}
        for where, row in self.parquet_rows(d, "test/<type>/*.json or <config>/test-*.parquet"):
            problem, solution = need(row, where, "problem", "solution")
            group = str(row.get("type") or Path(where.split(" (")[0]).parent.name)
            n = counts[group] = counts.get(group, -1) + 1
            out.append(Sample(f"{group}/{n}", [], {"problem": problem, "solution": solution}))
        return check_unique(out, str(d))

    def prompt(self, sample: Sample, profile: str) -> Prompt:
        return Prompt(NVLM_SYSTEM, f"{sample.fields['problem']}\n{BOXED}")

    def score(self, predictions: Sequence[str], samples: Sequence[Sample], profile: str) -> dict[str, float]:
        return _solved(math_correct, predictions, samples)


class HumanEval(_Text):
    name, dirname, split = "humaneval", "humaneval", "test"
    max_tokens = {"official": 512, "nvlm": 512}
    stop = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
    main_metric = "pass@1"
    layout = """humaneval/
  HumanEval.jsonl.gz (or HumanEval.jsonl)        (github.com/openai/human-eval data/)
or openai_humaneval/test-*.parquet               (HF openai/openai_humaneval)"""

    def load(self, root: str | Path) -> list[Sample]:
        d = self.find_dir(root)
        path = next((p for p in (d / "HumanEval.jsonl.gz", d / "HumanEval.jsonl") if p.is_file()), None)
        if path is not None:
            rows = list(read_jsonl(path))
        else:
            rows = list(self.parquet_rows(d, "HumanEval.jsonl.gz or test-*.parquet"))
        out = []
        for where, row in rows:
            need(row, where, "task_id", "prompt", "test", "entry_point")
            fields = {k: row[k] for k in ("task_id", "prompt", "test", "entry_point")}
            out.append(Sample(row["task_id"], [], fields))
        return check_unique(out, str(d))

    def prompt(self, sample: Sample, profile: str) -> Prompt:
        return Prompt(None, sample.fields["prompt"], chat=False)

    def postprocess(self, raw: str, profile: str) -> str:
        return raw  # the completion's indentation matters

    def score(self, predictions: Sequence[str], samples: Sequence[Sample], profile: str) -> dict[str, float]:
        result = evaluate_humaneval(
            [s.fields for s in samples], [(s.id, p) for p, s in zip(predictions, samples, strict=True)]
        )
        return {"pass@1": 100.0 * result["pass@1"]}


def _num(stem: str) -> tuple[int, str]:
    return (int(stem), "") if stem.isdigit() else (1 << 62, stem)


def _solved(
    correct: Callable[[str, str], bool], predictions: Sequence[str], samples: Sequence[Sample]
) -> dict[str, float]:
    """Accuracy of predictions judged against each sample's reference solution."""
    return {
        "accuracy": mean([float(correct(p, s.fields["solution"])) for p, s in zip(predictions, samples, strict=True)])
    }
