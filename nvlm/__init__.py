"""nvlm: a pure-PyTorch NVLM 1.0 (NVLM-D / -X / -H)."""

from nvlm.chat import Chat
from nvlm.config import LLMConfig, NVLMConfig, ProjectorConfig, VisionConfig, preset
from nvlm.image import ImageProcessor, load_image
from nvlm.models.nvlm import NVLM
from nvlm.processor import Processor

__all__ = [
    "NVLM", "Chat", "ImageProcessor", "LLMConfig", "NVLMConfig", "Processor", "ProjectorConfig",
    "VisionConfig", "load_image", "preset",
]  # fmt: skip
