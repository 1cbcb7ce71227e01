"""nvlm: a pure-PyTorch NVLM 1.0 (NVLM-D / -X / -H)."""

from nvlm.config import LLMConfig, NVLMConfig, ProjectorConfig, VisionConfig, preset

__all__ = ["LLMConfig", "NVLMConfig", "ProjectorConfig", "VisionConfig", "preset"]
