"""Megatron-Core interop for NVLM-D: read Megatron's legacy per-rank checkpoints (``nvidia/NVLM-D-72B-mcore``)
and write them back. See docs/MCORE.md and MCORE_SPEC.md.

- ``load_mcore``: an ``NVLM`` in memory from a Megatron checkpoint (``NVLM.from_pretrained`` hands off here);
- ``convert_to_hf``: a standalone NVLM-D-72B-layout directory (``nvlm convert SRC DST``);
- ``convert_to_mcore``: Megatron rank files at any TP x PP (``nvlm convert SRC DST --to mcore --tp N --pp M``).
"""

from nvlm.mcore.layout import is_mcore
from nvlm.mcore.read import McoreCheckpoint, convert_to_hf, load_mcore
from nvlm.mcore.write import convert_to_mcore

__all__ = ["McoreCheckpoint", "convert_to_hf", "convert_to_mcore", "is_mcore", "load_mcore"]
