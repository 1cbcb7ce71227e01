"""The NVLM-D-72B ``config.json`` mapping, and where a run directory keeps its model. Imports no torch.

The released checkpoint's ``config.json`` nests a ``vision_config`` (InternViT) and an ``llm_config``
(Qwen2, though it says ``model_type: "llama"``). ``from_hf`` reads it; ``to_hf`` writes it back in the same
shape so that vLLM's ``NVLM_D`` loader and the HF remote code can read what we save.
Spec: NVLM_SPEC.md sections 2, 4 and 9.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

from nvlm.arch import ARCHITECTURES, BY_HF_NAME
from nvlm.config import (
    ConfigError,
    CrossAttentionConfig,
    LLMConfig,
    LLMFamily,
    NVLMConfig,
    VisionConfig,
    default_projector,
    default_xattn,
    is_number,
)

# Our own top-level keys (tag strings): written only when they differ from NVLM-D's.
TOP_LEVEL_OURS = ("image_token", "image_token_id", "image_start", "image_end", "tile_tag", "thumbnail_tag")


class CheckpointError(ValueError):
    """A checkpoint directory that does not match the model it should hold."""


def model_dir(path: str | Path) -> Path:
    """A checkpoint directory, or a training or demo run directory whose final model is in ``model/``."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    if not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
        return path / "model"
    return path


def from_hf(cfg: dict[str, Any]) -> NVLMConfig:
    """Read a released-style ``config.json`` dict (NVLM_D, or our NVLM_X / NVLM_H). ``architectures`` names
    the model (``NVLM_D``, or ``NVLM_D_Model`` as the released remote code's ``save_pretrained`` writes it,
    with ``model_type: NVLM_D``); without it, ``model_type`` does."""
    try:
        arch_name = (cfg.get("architectures") or [cfg.get("model_type", "")])[0]
        arch = BY_HF_NAME.get(arch_name)
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
        if not (is_number(ratio) and 0 < ratio <= 1):
            raise ConfigError(f"downsample_ratio must be in (0, 1], not {ratio!r}")
        projector = replace(default_projector(vision, llm, ratio, arch), **cfg.get("projector_config", {}))
        xattn = (
            replace(default_xattn(llm), **cfg.get("xattn_config", {}))
            if ARCHITECTURES[arch].cross_attention
            else CrossAttentionConfig()
        )
        extra = {f.name: cfg[f.name] for f in fields(NVLMConfig) if f.name in TOP_LEVEL_OURS and f.name in cfg}
        return NVLMConfig(
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


def to_hf(config: NVLMConfig) -> dict[str, Any]:
    """The ``config.json`` dict in the NVLM-D-72B layout (vision_config / llm_config nested)."""
    v, lm = config.vision, config.llm
    name = config.architecture.hf_names[0]
    out: dict[str, Any] = {
        "architectures": [name],
        "model_type": name,
        "downsample_ratio": config.downsample_ratio,
        "dynamic_image_size": True,
        "force_image_size": v.image_size,
        "max_dynamic_patch": config.max_tiles,
        "min_dynamic_patch": config.min_tiles,
        "ps_version": config.ps_version,
        "select_layer": config.select_layer,
        "template": config.template,
        "torch_dtype": config.torch_dtype,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "use_thumbnail": config.use_thumbnail,
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
            "torch_dtype": config.torch_dtype,
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
            "torch_dtype": config.torch_dtype,
            "use_flash_attn": False,
        },
    }
    if config.architecture.released:  # the released remote code
        out["auto_map"] = {
            "AutoConfig": "configuration_nvlm_d.NVLM_D_Config",
            "AutoModel": "modeling_nvlm_d.NVLM_D_Model",
            "AutoModelForCausalLM": "modeling_nvlm_d.NVLM_D_Model",
        }
    defaults = NVLMConfig()
    for name_ in TOP_LEVEL_OURS:
        if getattr(config, name_) != getattr(defaults, name_):
            out[name_] = getattr(config, name_)
    if config.projector != default_projector(v, lm, config.downsample_ratio, config.arch):
        out["projector_config"] = asdict(config.projector)
    if config.architecture.cross_attention:
        out["xattn_config"] = asdict(config.xattn)
    return out


def from_json_file(path: str | Path) -> NVLMConfig:
    """The config of a ``config.json`` file; a ``ConfigError`` names the file."""
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
        return from_hf(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
