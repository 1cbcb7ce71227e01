"""nvlm: a pure-PyTorch NVLM 1.0 (NVLM-D / -X / -H).

The names below load on first use (PEP 562), so ``import nvlm.config`` imports no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers only: the names' real homes
    from nvlm.chat import Chat
    from nvlm.config import LLMConfig, NVLMConfig, ProjectorConfig, VisionConfig
    from nvlm.image import ImageProcessor, load_image
    from nvlm.presets import preset
    from nvlm.pretrained import NVLM
    from nvlm.processor import Processor

_HOME = {
    "NVLM": "nvlm.pretrained",
    "Chat": "nvlm.chat",
    "ImageProcessor": "nvlm.image",
    "LLMConfig": "nvlm.config",
    "NVLMConfig": "nvlm.config",
    "Processor": "nvlm.processor",
    "ProjectorConfig": "nvlm.config",
    "VisionConfig": "nvlm.config",
    "load_image": "nvlm.image",
    "preset": "nvlm.presets",
}

__all__ = [
    "NVLM",
    "Chat",
    "ImageProcessor",
    "LLMConfig",
    "NVLMConfig",
    "Processor",
    "ProjectorConfig",
    "VisionConfig",
    "load_image",
    "preset",
]
assert set(__all__) == set(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'nvlm' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))
