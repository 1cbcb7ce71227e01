"""Benchmark evaluation: the scorers (``nvlm.eval.metrics``) and the HumanEval sandbox (``nvlm.eval.sandbox``).

Every scorer takes ``profile="official"`` (each benchmark's own scorer, the default) or ``profile="nvlm"``
(Megatron-LM's NVLM-1.0 scoring, quirks included); docs/EVAL_METRICS.md says what each one does.
"""
