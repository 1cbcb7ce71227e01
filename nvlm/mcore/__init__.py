"""Megatron-Core interop for NVLM-D: read Megatron's legacy per-rank checkpoints (``nvidia/NVLM-D-72B-mcore``)
and write them back. See docs/MCORE.md and MCORE_SPEC.md.

- ``McoreCheckpoint``: the rank files of one checkpoint, checked as a set, merged one tensor at a time
  (``NVLM.from_pretrained`` on such a directory reads it through ``nvlm.pretrained.load_mcore``);
- ``convert_to_hf``: a standalone NVLM-D-72B-layout directory (``nvlm convert SRC DST``);
- ``convert_to_mcore``: Megatron rank files at any TP x PP (``nvlm convert SRC DST --to mcore --tp N --pp M``).
"""

from nvlm.mcore.layout import is_mcore
from nvlm.mcore.read import McoreCheckpoint, convert_to_hf
from nvlm.mcore.write import convert_to_mcore

__all__ = ["McoreCheckpoint", "convert_to_hf", "convert_to_mcore", "is_mcore"]
