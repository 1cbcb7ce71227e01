"""Typed configs for NVLM and its parts, and their checks. Imports no torch (nor does ``import nvlm``).

The named presets are in ``nvlm.presets``; the NVLM-D-72B ``config.json`` mapping (``from_hf`` / ``to_hf``) is in
``nvlm.hf_config``. Spec: NVLM_SPEC.md sections 2, 4 and 9.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, TypeGuard

from nvlm.arch import ARCHITECTURES, Arch, Architecture, architecture

LLMFamily = Literal["qwen2", "llama"]


class ConfigError(ValueError):
    """A ``config.json`` that does not describe a model this package can build."""


def read_json_object(file: Path, error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """A JSON file that must hold an object; anything else is ``error`` naming the file."""
    try:
        data = json.loads(file.read_bytes())
    except ValueError as e:  # bad JSON or not UTF-8
        raise error(f"{file}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{file}: a JSON object was expected, not a {type(data).__name__}")
    return data


@dataclass(frozen=True)
class VisionConfig:
    """InternViT as NVLM uses it (InternViT-6B-448px-V1-5 by default)."""

    hidden_size: int = 3200
    num_layers: int = 45
    num_heads: int = 25  # real heads; the released checkpoint stores 7 more all-zero "dummy" heads
    intermediate_size: int = 12800
    image_size: int = 448
    patch_size: int = 14
    norm_eps: float = 1e-6
    qk_norm: bool = True
    qkv_bias: bool = False
    layer_scale_init: float = 0.1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class LLMConfig:
    """A decoder-only LLM of the Qwen2 family (q/k/v biases) or the Llama/Yi family (no biases)."""

    family: LLMFamily = "qwen2"
    vocab_size: int = 152064
    hidden_size: int = 8192
    intermediate_size: int = 29568
    num_layers: int = 80
    num_heads: int = 64
    num_kv_heads: int = 8
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 151643
    eos_token_id: int | None = 151645
    # The released HF code (transformers 4.39 Qwen2) and Megatron's training apply no RoPE scaling, and by
    # default neither do we: ``rope_scaling`` is kept for the round trip. ``dynamic_rope`` applies it as
    # transformers >= 4.45 does (dynamic NTK past ``max_position_embeddings``; docs/DESIGN.md).
    rope_scaling: dict[str, Any] | None = None
    dynamic_rope: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def qkv_bias(self) -> bool:
        return self.family == "qwen2"


@dataclass(frozen=True)
class ProjectorConfig:
    """``mlp1``: LayerNorm -> Linear (no bias) -> GELU -> Linear (no bias), after pixel shuffle."""

    input_size: int = 12800  # ViT width * (1 / downsample_ratio)^2
    hidden_size: int = 29568  # the LLM's FFN size
    output_size: int = 8192  # the LLM's width
    norm_eps: float = 1e-5  # nn.LayerNorm's default, as in the HF code (Megatron used 1e-6)
    num_layers: int = 2  # 2 for NVLM-D and -H; NVLM-X's is one layer: LayerNorm -> Linear (12800 -> 8192)


@dataclass(frozen=True)
class CrossAttentionConfig:
    """The gated cross-attention blocks of NVLM-X and NVLM-H (spec sections 5 and 6).

    The paper fixes the count (10) and the spacing (every 8th layer of the 80-layer 72B, every 6th of the
    60-layer 34B). Our choices where it is silent (docs/DESIGN.md): a block sits *before* decoder layers
    0, k, 2k, ...; each block is Flamingo's GATED XATTN-DENSE (cross-attention, then its own SwiGLU FFN of
    the LLM's width, each behind a tanh gate initialised to 0); RMSNorm before each, as in the LLM; the
    LLM's query heads and GQA key/value heads; no RoPE (the memory has no 1-D order; tile tags place it).
    """

    num_layers: int = 10  # blocks
    interval: int = 8  # a block before every interval-th decoder layer
    intermediate_size: int = 29568  # the block FFN's width (the LLM's)

    def layer_indices(self) -> tuple[int, ...]:
        """The decoder layers that have a block before them."""
        return tuple(i * self.interval for i in range(self.num_layers))


@dataclass(frozen=True)
class NVLMConfig:
    """The whole model: architecture, its three parts, and the image tiling and tagging."""

    arch: Arch = "D"
    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    xattn: CrossAttentionConfig = field(default_factory=CrossAttentionConfig)  # X and H only
    select_layer: int = -1
    downsample_ratio: float = 0.5
    ps_version: str = "v2"
    min_tiles: int = 1
    max_tiles: int = 6
    use_thumbnail: bool = True
    template: str = "chatml"
    image_token: str = "<|vision_pad|>"
    image_token_id: int = 151654  # Qwen2.5's id; from_pretrained reads the checkpoint's tokenizer.json
    image_start: str = "<Image>"
    image_end: str = "</Image>"
    tile_tag: str = "<tile_{}>"  # 1-based, row-major
    thumbnail_tag: str = "<tile_global_thumbnail>"
    torch_dtype: str = "bfloat16"

    @property
    def architecture(self) -> Architecture:
        """What this architecture does with a prompt's image (``nvlm.arch``)."""
        return ARCHITECTURES[self.arch]

    @property
    def tile_size(self) -> int:
        return self.vision.image_size

    @property
    def tokens_per_tile(self) -> int:
        return int(self.vision.num_patches * self.downsample_ratio**2)

    def validate(self) -> NVLMConfig:
        """The config itself, or ``ConfigError`` listing every problem. Types and ranges are checked first (every
        size and count an integer in ``[1, LIMITS[name]]``, every float finite and positive, flags booleans, the
        dtype a floating one), so the relations after them never divide by zero and no absurd model is built."""
        problems = _field_problems(self)
        if problems:
            raise ConfigError("invalid NVLM config: " + "; ".join(problems))
        v, lm, p = self.vision, self.llm, self.projector
        if self.arch not in ARCHITECTURES:
            problems.append(f"arch must be D, X or H, not {self.arch!r}")
        if v.hidden_size % v.num_heads:
            problems.append(f"vision hidden_size {v.hidden_size} is not divisible by num_heads {v.num_heads}")
        if v.image_size % v.patch_size:
            problems.append(f"vision image_size {v.image_size} is not a multiple of patch_size {v.patch_size}")
        side = v.image_size // v.patch_size
        scale = round(1 / self.downsample_ratio)
        if side % scale:
            problems.append(f"a {side}x{side} patch grid cannot be pixel-shuffled by {self.downsample_ratio}")
        if p.input_size != v.hidden_size * scale * scale:
            problems.append(f"projector input_size {p.input_size} != vision width * {scale * scale}")
        if p.output_size != lm.hidden_size:
            problems.append(f"projector output_size {p.output_size} != LLM hidden_size {lm.hidden_size}")
        if lm.hidden_size % lm.num_heads or lm.num_heads % lm.num_kv_heads:
            problems.append("LLM heads do not divide its width, or KV heads do not divide its heads")
        elif lm.head_dim % 2:
            problems.append(f"LLM head dim {lm.head_dim} is odd: RoPE rotates pairs of channels")
        if lm.dynamic_rope:
            rs = lm.rope_scaling if isinstance(lm.rope_scaling, dict) else {}
            kind, factor = rs.get("rope_type", rs.get("type")), rs.get("factor")
            if kind != "dynamic" or not (is_number(factor) and factor >= 1):
                problems.append(
                    f"dynamic_rope needs rope_scaling {{'type': 'dynamic', 'factor' >= 1}}, not {lm.rope_scaling!r}"
                )
        if not -v.num_layers <= self.select_layer <= v.num_layers:
            problems.append(f"select_layer {self.select_layer} is outside the ViT's {v.num_layers} layers")
        if self.ps_version != "v2":
            problems.append(f"ps_version {self.ps_version!r}: NVLM uses pixel shuffle v2 only")
        if not 1 <= self.min_tiles <= self.max_tiles <= LIMITS["max_tiles"]:
            problems.append(
                f"tiles: need 1 <= min_tiles <= max_tiles <= {LIMITS['max_tiles']}, "
                f"got {self.min_tiles}, {self.max_tiles}"
            )
        if p.num_layers not in (1, 2):
            problems.append(f"projector num_layers must be 1 or 2, not {p.num_layers}")
        x = self.xattn
        if ARCHITECTURES[self.arch].cross_attention and (
            x.num_layers < 1 or x.interval < 1 or x.layer_indices()[-1] >= lm.num_layers
        ):
            problems.append(
                f"{x.num_layers} cross-attention blocks every {x.interval} layers do not fit "
                f"the LLM's {lm.num_layers} layers"
            )
        if problems:
            raise ConfigError("invalid NVLM config: " + "; ".join(problems))
        return self

    def with_arch(self, arch: Arch) -> NVLMConfig:
        """The same vision path and LLM as another architecture: its projector and cross-attention defaults."""
        if arch == self.arch:
            return self
        v, lm = self.vision, self.llm
        projector = default_projector(v, lm, self.downsample_ratio, arch)
        new = architecture(arch)
        if new.projector_layers == 2 == self.projector.num_layers:
            projector = self.projector  # D <-> H share the two-layer projector
        xattn = default_xattn(lm) if new.cross_attention else CrossAttentionConfig()
        return replace(self, arch=arch, projector=projector, xattn=xattn).validate()


# Upper bounds far above any released model (NVLM-D-72B: 80 layers of width 8192, FFN 29568, 152k tokens; the
# ViT: 45 layers of width 3200): a corrupt config.json is refused before a model of absurd size is built.
LIMITS = {
    "num_layers": 1024,
    "hidden_size": 65536,
    "intermediate_size": 1 << 20,
    "num_heads": 1024,
    "num_kv_heads": 1024,
    "vocab_size": 1 << 22,
    "max_position_embeddings": 1 << 24,
    "image_size": 8192,
    "patch_size": 8192,
    "input_size": 1 << 20,
    "output_size": 65536,
    "interval": 1024,
    "max_tiles": 128,
    "projector.hidden_size": 1 << 20,
}
FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


def _field_problems(cfg: NVLMConfig) -> list[str]:
    """Type and range problems of the part configs' fields and the top-level numbers, flags and strings."""
    out = []
    for part in ("vision", "llm", "projector", "xattn"):
        obj = getattr(cfg, part)
        for f in fields(obj):
            value, name = getattr(obj, f.name), f"{part}.{f.name}"
            limit = LIMITS.get(name, LIMITS.get(f.name))
            if f.type == "int" and not (_is_int(value) and 1 <= value <= limit):
                out.append(f"{name} must be an integer in [1, {limit}], not {value!r}")
            elif f.type == "float" and not (is_number(value) and 0 < value < math.inf):
                out.append(f"{name} must be a positive number, not {value!r}")
            elif f.type == "bool" and not isinstance(value, bool):
                out.append(f"{name} must be true or false, not {value!r}")
    for name in ("select_layer", "min_tiles", "max_tiles", "image_token_id"):
        if not _is_int(getattr(cfg, name)):
            out.append(f"{name} must be an integer, not {getattr(cfg, name)!r}")
    if not (is_number(cfg.downsample_ratio) and 0 < cfg.downsample_ratio <= 1):
        out.append(f"downsample_ratio must be in (0, 1], not {cfg.downsample_ratio!r}")
    if not isinstance(cfg.use_thumbnail, bool):
        out.append(f"use_thumbnail must be true or false, not {cfg.use_thumbnail!r}")
    for name in ("ps_version", "template", "image_token", "image_start", "image_end", "tile_tag", "thumbnail_tag"):
        if not isinstance(getattr(cfg, name), str):
            out.append(f"{name} must be a string, not {getattr(cfg, name)!r}")
    if isinstance(cfg.tile_tag, str):
        try:
            cfg.tile_tag.format(1)
        except (IndexError, KeyError, ValueError):
            out.append(f"tile_tag {cfg.tile_tag!r} must take one {{}} for the tile number")
    if not isinstance(cfg.image_token, str) or not cfg.image_token:
        out.append("image_token must be a non-empty string")
    if not isinstance(cfg.torch_dtype, str) or cfg.torch_dtype.removeprefix("torch.") not in FLOAT_DTYPES:
        out.append(f"torch_dtype must be one of {', '.join(FLOAT_DTYPES)}, not {cfg.torch_dtype!r}")
    return out


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x: Any) -> TypeGuard[int | float]:
    """An int or a float, not a bool."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def default_projector(
    vision: VisionConfig, llm: LLMConfig, downsample_ratio: float, arch: Arch = "D"
) -> ProjectorConfig:
    """The released rule: ViT width x (1/ratio)^2 -> the LLM's FFN size -> the LLM's width (one layer for X)."""
    scale = round(1 / downsample_ratio)
    layers = architecture(arch).projector_layers
    return ProjectorConfig(
        vision.hidden_size * scale * scale, llm.intermediate_size, llm.hidden_size, num_layers=layers
    )


def default_xattn(llm: LLMConfig) -> CrossAttentionConfig:
    """The paper's 10 blocks spread evenly (every 8th of 80 layers, every 6th of 60), FFN of the LLM's width."""
    count = min(10, llm.num_layers)
    return CrossAttentionConfig(count, llm.num_layers // count, llm.intermediate_size)
