"""The ``args`` Namespace of a rank file: read into our LLM config, and written for Megatron to load.

Reading: the LLM's dimensions come from ``args`` (MCORE_SPEC 6.2 step 3); the ViT's do not (Megatron hard-codes
InternViT-6B by name) and come from the base config (``--config``), as do the HF vocabulary size, the tags and
BOS/EOS. Writing: ``make_args`` gives the fields Megatron's ``check_checkpoint_args`` and
``load_args_from_checkpoint`` (``--use-checkpoint-args``) read, in stdlib and torch types only, so a Megatron
without this package unpickles it.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from nvlm.checkpoint import CheckpointError
from nvlm.config import LLMConfig, NVLMConfig

VOCAB_DIVISOR = 128  # Megatron's default --make-vocab-size-divisible-by


def _get(args: Any, name: str, file: Path, default: Any = ...) -> Any:
    if not isinstance(args, argparse.Namespace):
        raise CheckpointError(f"{file}: 'args' is {type(args).__name__}, not the argparse.Namespace Megatron saves")
    value = getattr(args, name, default)
    if value is ...:
        raise CheckpointError(f"{file}: args has no {name!r}")
    return value


def llm_from_args(args: Any, file: Path, base: LLMConfig) -> LLMConfig:
    """Our LLM config from Megatron's args; the vocabulary size, BOS and EOS from ``base``."""
    expect = {
        "position_embedding_type": "rope",
        "rotary_interleaved": False,
        "swiglu": True,
        "normalization": "RMSNorm",
        "add_bias_linear": False,
        "apply_layernorm_1p": False,
        "use_rope_scaling": False,
        "rotary_percent": 1.0,
    }
    for name, want in expect.items():
        got = _get(args, name, file, want)
        if got != want:
            raise CheckpointError(f"{file}: args.{name} is {got!r}; this converter handles NVLM's {want!r} only")
    heads = _get(args, "num_attention_heads", file)
    groups = _get(args, "num_query_groups", file, None) if _get(args, "group_query_attention", file, False) else None
    hidden = _get(args, "hidden_size", file)
    kv = _get(args, "kv_channels", file, None)
    if kv is not None and kv * heads != hidden:
        raise CheckpointError(f"{file}: args.kv_channels {kv} x {heads} heads != hidden_size {hidden}")
    return replace(
        base,
        family="qwen2" if _get(args, "add_qkv_bias", file, False) else "llama",
        hidden_size=hidden,
        intermediate_size=_get(args, "ffn_hidden_size", file),
        num_layers=_get(args, "num_layers", file),
        num_heads=heads,
        num_kv_heads=groups or heads,
        rope_theta=float(_get(args, "rotary_base", file, 10000)),
        rms_norm_eps=float(_get(args, "norm_epsilon", file, 1e-5)),
        max_position_embeddings=_get(args, "max_position_embeddings", file, base.max_position_embeddings),
        tie_word_embeddings=not _get(args, "untie_embeddings_and_output_weights", file, False),
        rope_scaling=None,  # Megatron trained without RoPE scaling (no --use-rope-scaling)
    )


def config_from_args(args: Any, file: Path, base: NVLMConfig, dtype: torch.dtype) -> NVLMConfig:
    """The whole model's config: the LLM from ``args``, the rest from ``base``, the projector's LayerNorm epsilon
    as Megatron trained it (its ``--norm-epsilon``, MCORE_SPEC 5 item 2)."""
    llm = llm_from_args(args, file, base.llm)
    projector = replace(
        base.projector,
        hidden_size=llm.intermediate_size,
        output_size=llm.hidden_size,
        norm_eps=float(_get(args, "norm_epsilon", file, 1e-5)),
    )
    name = str(dtype).removeprefix("torch.")
    return replace(base, llm=llm, projector=projector, torch_dtype=name).validate()


def padded_vocab(vocab_size: int, tp: int, divisor: int = VOCAB_DIVISOR) -> int:
    """Megatron's ``_vocab_size_with_padding``: up to a multiple of ``divisor x tp``."""
    multiple = divisor * tp
    return -(-vocab_size // multiple) * multiple


def make_args(
    cfg: NVLMConfig, tp: int, pp: int, vocab_rows: int, iteration: int, dtype: torch.dtype
) -> argparse.Namespace:
    """The Namespace of a rank file for Megatron's NVLM example (``--use-checkpoint-args``)."""
    lm, v = cfg.llm, cfg.vision
    return argparse.Namespace(
        num_layers=lm.num_layers,
        hidden_size=lm.hidden_size,
        ffn_hidden_size=lm.intermediate_size,
        num_attention_heads=lm.num_heads,
        num_query_groups=lm.num_kv_heads,
        group_query_attention=lm.num_kv_heads != lm.num_heads,
        kv_channels=lm.head_dim,
        seq_length=min(lm.max_position_embeddings, 8192),
        max_position_embeddings=lm.max_position_embeddings,
        position_embedding_type="rope",
        add_position_embedding=False,
        use_rotary_position_embeddings=True,
        rotary_base=int(lm.rope_theta) if float(lm.rope_theta).is_integer() else lm.rope_theta,
        rotary_percent=1.0,
        rotary_interleaved=False,
        use_rope_scaling=False,
        add_bias_linear=False,
        add_qkv_bias=lm.qkv_bias,
        squared_relu=False,
        swiglu=True,
        untie_embeddings_and_output_weights=not lm.tie_word_embeddings,
        apply_layernorm_1p=False,
        normalization="RMSNorm",
        norm_epsilon=lm.rms_norm_eps,
        apply_query_key_layer_scaling=False,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        attention_softmax_in_fp32=True,
        tokenizer_type="MultimodalTokenizer",
        tokenizer_prompt_format="qwen2p0" if lm.family == "qwen2" else "nvlm-yi-34b",
        make_vocab_size_divisible_by=VOCAB_DIVISOR,
        padded_vocab_size=vocab_rows,
        ckpt_format="torch",
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=None,
        expert_model_parallel_size=1,
        iteration=iteration,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        vision_model_type="internvit",
        language_model_type="qwen2.0_72B" if lm.family == "qwen2" else "yi-34b",
        freeze_ViT=True,
        disable_vision_class_token=True,
        pixel_shuffle=True,
        use_tiling=True,
        max_num_tiles=cfg.max_tiles,
        use_thumbnail=cfg.use_thumbnail,
        use_tile_tags=True,
        image_tag_type="nvlm",
        img_h=v.image_size,
        img_w=v.image_size,
        patch_dim=v.patch_size,
    )
