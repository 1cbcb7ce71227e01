"""pass@k for code generation (HumanEval): the unbiased estimator of openai/human-eval
``human_eval/evaluation.py::estimate_pass_at_k`` (Chen et al. 2021)."""

from __future__ import annotations

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of ``k`` samples drawn from ``n`` (``c`` of them correct) passes.

    ``1 - C(n-c, k) / C(n, k)``, computed as ``1 - prod_{i=n-c+1..n} (1 - k/i)`` in numpy (so the floats
    match human-eval's to the last bit); 1.0 when ``n - c < k``.
    """
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"need 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))
