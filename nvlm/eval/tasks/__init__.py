"""The benchmark registry: ``TASKS[name]``, and ``get_task`` for registered names and ``jsonl:PATH``."""

from __future__ import annotations

from nvlm.eval.tasks.base import PROFILES, DataError, MissingData, ParquetImage, Prompt, Sample, Task
from nvlm.eval.tasks.caption import COCO, FLICKR30K
from nvlm.eval.tasks.choice import AI2D, MMBench, RealWorldQA
from nvlm.eval.tasks.custom import JsonlTask
from nvlm.eval.tasks.mmmu import MMMU, MathVista
from nvlm.eval.tasks.ocrbench import OCRBench
from nvlm.eval.tasks.text import GSM8K, MATH, MMLU, HumanEval
from nvlm.eval.tasks.vqa import ChartQA, DocVQA, TextVQA, VQAv2

TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        MMMU("mmmu_val", "validation"),
        MMMU("mmmu_test", "test"),
        MathVista(),
        OCRBench(),
        AI2D("ai2d", "ai2d", "lmms-lab/ai2d"),
        AI2D("ai2d_no_mask", "ai2d_no_mask", "lmms-lab/ai2d-no-mask"),
        ChartQA(),
        DocVQA("docvqa_val", "validation"),
        DocVQA("docvqa_test", "test"),
        TextVQA(),
        RealWorldQA(),
        VQAv2("vqav2_val", "validation"),
        VQAv2("vqav2_testdev", "testdev"),
        MMBench(),
        COCO,
        FLICKR30K,
        MMLU(),
        GSM8K(),
        MATH(),
        HumanEval(),
    ]
}


def get_task(name: str) -> Task:
    """A registered task, or ``jsonl:PATH`` / ``custom:PATH`` for a JSONL file of your own."""
    for prefix in ("jsonl:", "custom:"):
        if name.startswith(prefix):
            return JsonlTask(name[len(prefix) :])
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}, or jsonl:PATH")
    return TASKS[name]


__all__ = [
    "PROFILES",
    "TASKS",
    "DataError",
    "JsonlTask",
    "MissingData",
    "ParquetImage",
    "Prompt",
    "Sample",
    "Task",
    "get_task",
]
