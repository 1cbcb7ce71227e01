"""An OpenAI-compatible server for NVLM-D, -X and -H: ``nvlm serve --model DIR`` (the ``server`` extra)."""
