"""Training data: records from JSONL files, supervised token labels, blends and packing."""
