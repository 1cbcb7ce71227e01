"""The NVLM 1.0 72B numbers to compare with: paper Tables 7/8 (NVLM_SPEC 7.5) and the NVLM-D-72B card's
Huggingface-codebase row (EVAL_SPEC 6). Percent, OCRBench out of 1000.

The paper reports VQAv2 on test-dev and DocVQA on test; our ``vqav2_val`` and ``docvqa_val`` rows show
those numbers for orientation only (``note``). AI2D: the paper's "test/no_mask" pair is 85.2/94.2 for
NVLM-D; the card's single AI2D number (94.2) is the no-mask one.
"""

from __future__ import annotations

from dataclasses import dataclass

COLUMNS = {"D": "NVLM-D 72B", "X": "NVLM-X 72B", "H": "NVLM-H 72B", "D-HF": "NVLM-D 72B (HF)"}


@dataclass(frozen=True)
class PaperRow:
    D: float
    X: float
    H: float
    D_HF: float | None = None
    note: str = ""  # e.g. which split the paper's number is on, when it is not ours

    def get(self, column: str) -> float | None:
        return self.D_HF if column == "D-HF" else getattr(self, column)


PAPER: dict[str, PaperRow] = {
    "mmmu_val": PaperRow(59.7, 57.4, 60.2, 58.7),
    "mmmu_test": PaperRow(54.6, 53.6, 53.0, 54.9),
    "mathvista_testmini": PaperRow(65.2, 64.6, 66.6, 65.2),
    "vqav2_testdev": PaperRow(85.4, 85.2, 85.2, 85.4),
    "vqav2_val": PaperRow(85.4, 85.2, 85.2, 85.4, note="paper: test-dev"),
    "ai2d": PaperRow(85.2, 84.2, 83.8),
    "ai2d_no_mask": PaperRow(94.2, 93.6, 93.3, 94.2),
    "textvqa_val": PaperRow(82.1, 80.2, 80.3, 82.6),
    "chartqa": PaperRow(86.0, 82.9, 83.3, 86.0),
    "docvqa_test": PaperRow(92.6, 82.9, 83.1, 92.6),
    "docvqa_val": PaperRow(92.6, 82.9, 83.1, 92.6, note="paper: test"),
    "realworldqa": PaperRow(69.7, 66.1, 66.0, 69.5),
    "ocrbench": PaperRow(853, 828, 831, 852),
    "mmlu": PaperRow(82.0, 81.4, 80.4, 81.7),
    "gsm8k": PaperRow(92.9, 91.8, 91.5, 93.2),
    "math": PaperRow(73.1, 70.6, 71.4, 73.1),
    "humaneval": PaperRow(88.4, 85.2, 86.6, 89.0),
}
