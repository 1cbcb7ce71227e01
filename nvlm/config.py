"""Typed configs for NVLM and its parts, the named presets, and the NVLM-D-72B ``config.json`` mapping.

The released checkpoint's ``config.json`` nests a ``vision_config`` (InternViT) and an ``llm_config``
(Qwen2, though it says ``model_type: "llama"``). ``NVLMConfig.from_hf`` reads it; ``to_hf`` writes it back
in the same shape so that vLLM's ``NVLM_D`` loader and the HF remote code can read what we save.
Spec: NVLM_SPEC.md sections 2, 4 and 9.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

Arch = Literal["D", "X", "H"]
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
        if self.arch not in ("D", "X", "H"):
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
            if kind != "dynamic" or not (_is_number(factor) and factor >= 1):
                problems.append(
                    f"dynamic_rope needs rope_scaling {{'type': 'dynamic', 'factor' >= 1}}, not {lm.rope_scaling!r}"
                )
        if not -v.num_layers <= self.select_layer <= v.num_layers:
            problems.append(f"select_layer {self.select_layer} is outside the ViT's {v.num_layers} layers")
        if self.ps_version != "v2":
            problems.append(f"ps_version {self.ps_version!r}: NVLM uses pixel shuffle v2 only")
        if not 1 <= self.min_tiles <= self.max_tiles <= LIMITS["max_tiles"]:
            problems.append(f"tiles: need 1 <= min_tiles <= max_tiles <= {LIMITS['max_tiles']}, "
                            f"got {self.min_tiles}, {self.max_tiles}")  # fmt: skip
        if p.num_layers not in (1, 2):
            problems.append(f"projector num_layers must be 1 or 2, not {p.num_layers}")
        x = self.xattn
        if self.arch != "D" and (x.num_layers < 1 or x.interval < 1 or x.layer_indices()[-1] >= lm.num_layers):
            problems.append(f"{x.num_layers} cross-attention blocks every {x.interval} layers do not fit "
                            f"the LLM's {lm.num_layers} layers")  # fmt: skip
        if problems:
            raise ConfigError("invalid NVLM config: " + "; ".join(problems))
        return self

    # ---------------------------------------------------------------- HF config.json (NVLM-D-72B layout)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> NVLMConfig:
        """Read a released-style ``config.json`` dict (NVLM_D, or our NVLM_X / NVLM_H). ``architectures`` names
        the model (``NVLM_D``, or ``NVLM_D_Model`` as the released remote code's ``save_pretrained`` writes it,
        with ``model_type: NVLM_D``); without it, ``model_type`` does."""
        try:
            arch_name = (cfg.get("architectures") or [cfg.get("model_type", "")])[0]
            # "NVLM_D_Model": the class name that the released remote code's save_pretrained writes
            arch = {"NVLM_D": "D", "NVLM_D_Model": "D", "NVLM_X": "X", "NVLM_H": "H"}.get(arch_name)
            if arch is None:
                raise ConfigError(f"architectures {cfg.get('architectures')!r} is not NVLM_D, NVLM_X or NVLM_H")
            vc, lc = cfg["vision_config"], cfg["llm_config"]
            if not isinstance(vc, dict) or not isinstance(lc, dict):
                raise ConfigError("vision_config and llm_config must be JSON objects")
            vision = VisionConfig(
                hidden_size=vc["hidden_size"],
                num_layers=vc["num_hidden_layers"],
                num_heads=vc["num_attention_heads"],
                intermediate_size=vc["intermediate_size"],
                image_size=cfg.get("force_image_size") or vc["image_size"],
                patch_size=vc["patch_size"],
                norm_eps=vc.get("layer_norm_eps", 1e-6),
                qk_norm=vc.get("qk_normalization", True),
                qkv_bias=vc.get("qkv_bias", False),
                layer_scale_init=vc.get("initializer_factor", 0.1),
            )
            if vc.get("norm_type", "rms_norm") != "rms_norm":
                raise ConfigError(f"vision_config.norm_type {vc['norm_type']!r}: NVLM's InternViT uses rms_norm")
            lm_arch = (lc.get("architectures") or [""])[0]
            if lm_arch.startswith("Qwen2") or lc.get("model_type") == "qwen2":
                family: LLMFamily = "qwen2"
            elif lm_arch.startswith("Llama") or lc.get("model_type") == "llama":
                family = "llama"
            else:
                raise ConfigError(f"llm_config architectures {lc.get('architectures')!r}: need Qwen2 or Llama")
            if family == "llama" and lc.get("attention_bias"):
                raise ConfigError("llm_config: a Llama-family LLM with attention_bias is not supported")
            kv_heads = lc.get("num_key_value_heads")  # absent or null: as many as the query heads (HF's rule)
            llm = LLMConfig(
                family=family,
                vocab_size=lc["vocab_size"],
                hidden_size=lc["hidden_size"],
                intermediate_size=lc["intermediate_size"],
                num_layers=lc["num_hidden_layers"],
                num_heads=lc["num_attention_heads"],
                num_kv_heads=lc["num_attention_heads"] if kv_heads is None else kv_heads,
                rope_theta=float(lc.get("rope_theta", 10000.0)),
                rms_norm_eps=lc.get("rms_norm_eps", 1e-6),
                max_position_embeddings=lc.get("max_position_embeddings", 32768),
                tie_word_embeddings=lc.get("tie_word_embeddings", False),
                bos_token_id=lc.get("bos_token_id"),
                eos_token_id=lc.get("eos_token_id"),
                rope_scaling=lc.get("rope_scaling"),
                dynamic_rope=lc.get("dynamic_rope", False),
            )
            ratio = cfg.get("downsample_ratio", 0.5)
            if not (_is_number(ratio) and 0 < ratio <= 1):
                raise ConfigError(f"downsample_ratio must be in (0, 1], not {ratio!r}")
            projector = replace(_default_projector(vision, llm, ratio, arch), **cfg.get("projector_config", {}))
            xattn = (
                replace(default_xattn(llm), **cfg.get("xattn_config", {})) if arch != "D" else CrossAttentionConfig()
            )
            extra = {f.name: cfg[f.name] for f in fields(cls) if f.name in _TOP_LEVEL_OURS and f.name in cfg}
            return cls(
                arch=arch,
                vision=vision,
                llm=llm,
                projector=projector,
                xattn=xattn,
                select_layer=cfg.get("select_layer", -1),
                downsample_ratio=ratio,
                ps_version=cfg.get("ps_version", "v1"),
                min_tiles=cfg.get("min_dynamic_patch", 1),
                max_tiles=cfg.get("max_dynamic_patch", 6),
                use_thumbnail=cfg.get("use_thumbnail", False),
                template=cfg.get("template", "chatml"),
                torch_dtype=cfg.get("torch_dtype") or "bfloat16",
                **extra,
            ).validate()
        except ConfigError:
            raise
        except KeyError as e:
            raise ConfigError(f"config.json lacks the key {e.args[0]!r}") from None
        except (TypeError, AttributeError, ValueError) as e:
            raise ConfigError(f"config.json has a value of the wrong type: {e}") from None

    def with_arch(self, arch: Arch) -> NVLMConfig:
        """The same vision path and LLM as another architecture: its projector and cross-attention defaults."""
        if arch == self.arch:
            return self
        v, lm = self.vision, self.llm
        projector = _default_projector(v, lm, self.downsample_ratio, arch)
        if arch != "X" and self.projector.num_layers == 2:
            projector = self.projector  # D <-> H share the two-layer projector
        xattn = CrossAttentionConfig() if arch == "D" else default_xattn(lm)
        return replace(self, arch=arch, projector=projector, xattn=xattn).validate()

    def to_hf(self) -> dict[str, Any]:
        """The ``config.json`` dict in the NVLM-D-72B layout (vision_config / llm_config nested)."""
        v, lm = self.vision, self.llm
        name = f"NVLM_{self.arch}"
        out: dict[str, Any] = {
            "architectures": [name],
            "model_type": name,
            "downsample_ratio": self.downsample_ratio,
            "dynamic_image_size": True,
            "force_image_size": v.image_size,
            "max_dynamic_patch": self.max_tiles,
            "min_dynamic_patch": self.min_tiles,
            "ps_version": self.ps_version,
            "select_layer": self.select_layer,
            "template": self.template,
            "torch_dtype": self.torch_dtype,
            "use_backbone_lora": 0,
            "use_llm_lora": 0,
            "use_thumbnail": self.use_thumbnail,
            "llm_config": {
                "architectures": ["Qwen2ForCausalLM" if lm.family == "qwen2" else "LlamaForCausalLM"],
                "model_type": "llama",  # as released, even for Qwen2
                "attention_bias": lm.qkv_bias,
                "bos_token_id": lm.bos_token_id,
                "eos_token_id": lm.eos_token_id,
                "hidden_act": "silu",
                "hidden_size": lm.hidden_size,
                "intermediate_size": lm.intermediate_size,
                "max_position_embeddings": lm.max_position_embeddings,
                "num_attention_heads": lm.num_heads,
                "num_hidden_layers": lm.num_layers,
                "num_key_value_heads": lm.num_kv_heads,
                "rms_norm_eps": lm.rms_norm_eps,
                "rope_scaling": lm.rope_scaling,
                **({"dynamic_rope": True} if lm.dynamic_rope else {}),
                "rope_theta": lm.rope_theta,
                "tie_word_embeddings": lm.tie_word_embeddings,
                "torch_dtype": self.torch_dtype,
                "vocab_size": lm.vocab_size,
            },
            "vision_config": {
                "architectures": ["InternVisionModel"],
                "model_type": "intern_vit_6b",
                "hidden_act": "gelu",
                "hidden_size": v.hidden_size,
                "image_size": v.image_size,
                "initializer_factor": v.layer_scale_init,
                "intermediate_size": v.intermediate_size,
                "layer_norm_eps": v.norm_eps,
                "norm_type": "rms_norm",
                "num_attention_heads": v.num_heads,
                "num_channels": 3,
                "num_hidden_layers": v.num_layers,
                "patch_size": v.patch_size,
                "qk_normalization": v.qk_norm,
                "qkv_bias": v.qkv_bias,
                "torch_dtype": self.torch_dtype,
                "use_flash_attn": False,
            },
        }
        if self.arch == "D":
            out["auto_map"] = {
                "AutoConfig": "configuration_nvlm_d.NVLM_D_Config",
                "AutoModel": "modeling_nvlm_d.NVLM_D_Model",
                "AutoModelForCausalLM": "modeling_nvlm_d.NVLM_D_Model",
            }
        defaults = NVLMConfig()
        for name_ in _TOP_LEVEL_OURS:
            if getattr(self, name_) != getattr(defaults, name_):
                out[name_] = getattr(self, name_)
        if self.projector != _default_projector(v, lm, self.downsample_ratio, self.arch):
            out["projector_config"] = asdict(self.projector)
        if self.arch != "D":
            out["xattn_config"] = asdict(self.xattn)
        return out

    @classmethod
    def from_json_file(cls, path: str | Path) -> NVLMConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json there") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot be read ({e.strerror})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a JSON object was expected")
        try:
            return cls.from_hf(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


# Upper bounds far above any released model (NVLM-D-72B: 80 layers of width 8192, FFN 29568, 152k tokens; the
# ViT: 45 layers of width 3200): a corrupt config.json is refused before a model of absurd size is built.
LIMITS = {
    "num_layers": 1024, "hidden_size": 65536, "intermediate_size": 1 << 20, "num_heads": 1024, "num_kv_heads": 1024,
    "vocab_size": 1 << 22, "max_position_embeddings": 1 << 24, "image_size": 8192, "patch_size": 8192,
    "input_size": 1 << 20, "output_size": 65536, "interval": 1024, "max_tiles": 128, "projector.hidden_size": 1 << 20,
}  # fmt: skip
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
            elif f.type == "float" and not (_is_number(value) and 0 < value < math.inf):
                out.append(f"{name} must be a positive number, not {value!r}")
            elif f.type == "bool" and not isinstance(value, bool):
                out.append(f"{name} must be true or false, not {value!r}")
    for name in ("select_layer", "min_tiles", "max_tiles", "image_token_id"):
        if not _is_int(getattr(cfg, name)):
            out.append(f"{name} must be an integer, not {getattr(cfg, name)!r}")
    if not (_is_number(cfg.downsample_ratio) and 0 < cfg.downsample_ratio <= 1):
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


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _default_projector(
    vision: VisionConfig, llm: LLMConfig, downsample_ratio: float, arch: Arch = "D"
) -> ProjectorConfig:
    """The released rule: ViT width x (1/ratio)^2 -> the LLM's FFN size -> the LLM's width (one layer for X)."""
    scale = round(1 / downsample_ratio)
    layers = 1 if arch == "X" else 2
    return ProjectorConfig(
        vision.hidden_size * scale * scale, llm.intermediate_size, llm.hidden_size, num_layers=layers
    )


def default_xattn(llm: LLMConfig) -> CrossAttentionConfig:
    """The paper's 10 blocks spread evenly (every 8th of 80 layers, every 6th of 60), FFN of the LLM's width."""
    count = min(10, llm.num_layers)
    return CrossAttentionConfig(count, llm.num_layers // count, llm.intermediate_size)


# Our own top-level keys (tag strings): written only when they differ from NVLM-D's.
_TOP_LEVEL_OURS = ("image_token", "image_token_id", "image_start", "image_end", "tile_tag", "thumbnail_tag")


# ------------------------------------------------------------------------------------------- presets


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
        arch="D", vision=vision, llm=llm, projector=projector, torch_dtype="float32",
        image_token_id=500,  # <|vision_pad|> of build_tiny_tokenizer()
    )  # fmt: skip
    return cfg.with_arch(arch)


def _demo(arch: Arch) -> NVLMConfig:
    """The CPU demo's model (~1M parameters): the tiny preset with its tiles cut into 7-px patches (16 tokens
    per tile, fine enough to read a digit), a 64-wide ViT and a 128-wide LLM (2 layers each)."""
    tiny = _tiny("D")
    vision = replace(tiny.vision, hidden_size=64, num_heads=4, intermediate_size=128, patch_size=7)
    llm = replace(tiny.llm, hidden_size=128, intermediate_size=256)
    projector = ProjectorConfig(input_size=256, hidden_size=256, output_size=128)
    return replace(tiny, vision=vision, llm=llm, projector=projector).with_arch(arch)


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
