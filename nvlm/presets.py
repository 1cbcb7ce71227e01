"""The named configs: the released models' exact dimensions, and the tiny and demo models. Imports no torch."""

from __future__ import annotations

import copy
from dataclasses import replace

from nvlm.config import Arch, LLMConfig, LLMFamily, NVLMConfig, ProjectorConfig, VisionConfig


def _tiny(arch: Arch, family: LLMFamily = "qwen2") -> NVLMConfig:
    """A few-hundred-kB model for tests and the CPU demo: 56-px tiles (4 tokens each), 2 layers each."""
    vision = VisionConfig(hidden_size=40, num_layers=2, num_heads=5, intermediate_size=80, image_size=56)
    llm = LLMConfig(
        family=family,
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        rope_theta=10000.0,
        max_position_embeddings=4096,
        bos_token_id=None,
        eos_token_id=491,  # <|im_end|> of nvlm.tokenizer.build_tiny_tokenizer()
    )
    projector = ProjectorConfig(input_size=160, hidden_size=128, output_size=64)
    cfg = NVLMConfig(
        arch="D",
        vision=vision,
        llm=llm,
        projector=projector,
        torch_dtype="float32",
        image_token_id=500,  # <|vision_pad|> of build_tiny_tokenizer()
    )
    return cfg.with_arch(arch)


def _demo(arch: Arch) -> NVLMConfig:
    """The CPU demo's model (~1M parameters): the tiny preset with its tiles cut into 7-px patches (16 tokens
    per tile, fine enough to read a digit), a 64-wide ViT and a 128-wide LLM (2 layers each). NVLM-X and -H
    get one cross-attention block, before layer 0: the paper's one block per 8 (72B) or 6 (34B) decoder
    layers is nearer one per 2 than the two that ``default_xattn`` gives a 2-layer LLM."""
    tiny = _tiny("D")
    vision = replace(tiny.vision, hidden_size=64, num_heads=4, intermediate_size=128, patch_size=7)
    llm = replace(tiny.llm, hidden_size=128, intermediate_size=256)
    projector = ProjectorConfig(input_size=256, hidden_size=256, output_size=128)
    cfg = replace(tiny, vision=vision, llm=llm, projector=projector).with_arch(arch)
    return replace(cfg, xattn=replace(cfg.xattn, num_layers=1, interval=2)) if cfg.architecture.cross_attention else cfg


def _nvlm_d_72b() -> NVLMConfig:
    return NVLMConfig(arch="D", llm=LLMConfig(rope_scaling={"factor": 3.0, "type": "dynamic"}))


def _nvlm_d_34b() -> NVLMConfig:
    llm = LLMConfig(
        family="llama",
        vocab_size=64000,
        hidden_size=7168,
        intermediate_size=20480,
        num_layers=60,
        num_heads=56,
        num_kv_heads=8,
        rope_theta=5_000_000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=7,
    )
    return NVLMConfig(
        arch="D", llm=llm, projector=ProjectorConfig(hidden_size=20480, output_size=7168), thumbnail_tag="<tile_global>"
    )


PRESETS = {
    "nvlm-d-72b": _nvlm_d_72b,
    "nvlm-x-72b": lambda: _nvlm_d_72b().with_arch("X"),  # 1-layer projector, 10 blocks every 8th layer
    "nvlm-h-72b": lambda: _nvlm_d_72b().with_arch("H"),
    "nvlm-d-34b": _nvlm_d_34b,
    "nvlm-x-34b": lambda: _nvlm_d_34b().with_arch("X"),  # 10 blocks every 6th of 60 layers
    "nvlm-h-34b": lambda: _nvlm_d_34b().with_arch("H"),
    "tiny-d": lambda: _tiny("D"),
    "tiny-x": lambda: _tiny("X"),  # 2 blocks, before both decoder layers
    "tiny-h": lambda: _tiny("H"),
    "tiny-d-llama": lambda: _tiny("D", "llama"),
    "demo-d": lambda: _demo("D"),
    "demo-x": lambda: _demo("X"),
    "demo-h": lambda: _demo("H"),
    "demo-d-untagged": lambda: replace(_demo("D"), tile_tag="", thumbnail_tag=""),  # the no-tag ablation
}


def preset(name: str) -> NVLMConfig:
    """A named config: ``nvlm-d-72b`` (the released model's exact dimensions), ``tiny-d``, ..."""
    try:
        return copy.deepcopy(PRESETS[name]().validate())
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
