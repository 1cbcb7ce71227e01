"""Tiny Megatron-Core NVLM-D checkpoints in the exact legacy layout, and a forward computed straight from them.

Written independently of ``nvlm.mcore`` (from MCORE_SPEC's tables): ``write_megatron`` draws each TP rank's
tensors at random in Megatron's per-rank shapes (TE names, ``_extra_state`` entries as TE 1.x ``io.BytesIO`` or
TE 2.x uint8 tensors, the ViT's dummy heads zero) and saves them with ``torch.save`` beside a pickled
``argparse.Namespace`` holding Megatron enums, the rerun state machine's enums, numpy's and torch's RNG state
and optimizer param groups, as a real training run saves them. ``megatron_logits`` runs the model the way
Megatron's modules split the work: every TP rank computes its own part (the fused qkv viewed per query group
or per head, fc1's output ``chunk(2)`` gate first, row-parallel outputs summed over the ranks, the ViT's q/k
RMSNorm variance summed over the ranks and divided by the unpadded width), never through the converter.
"""

from __future__ import annotations

import argparse
import enum
import io
import math
import random
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nvlm.config import NVLMConfig
from nvlm.presets import preset

Ranks = dict[tuple[int, int], dict[str, Any]]  # (tp rank, pp rank) -> the rank's "model" dict


def tiny_config() -> NVLMConfig:
    """tiny-d with splits every TP of 1, 2 and 4 divides: 8 query heads in 4 groups, 4 LM layers."""
    base = preset("tiny-d")
    llm = replace(base.llm, num_heads=8, num_kv_heads=4, num_layers=4, rms_norm_eps=1e-6)
    return replace(base, llm=llm, projector=replace(base.projector, norm_eps=1e-6)).validate()


# ------------------------------------------------------------------------------------- Megatron's globals


@contextmanager
def megatron_modules() -> Iterator[dict[str, Any]]:
    """Megatron's enums, importable under their real module names while a checkpoint is saved."""
    specs = {
        "megatron.core.enums": {"ModelType": ["encoder_or_decoder", "encoder_and_decoder"]},
        "megatron.core.transformer.enums": {"AttnBackend": ["flash", "fused", "unfused", "local", "auto"]},
        "megatron.core.rerun_state_machine": {
            "RerunMode": ["disabled", "validate_results"],
            "RerunState": ["NOT_RUNNING_YET", "INITIAL_RUN"],
            "RerunDiagnostic": ["CORRECT_RESULT", "TRANSIENT_ERROR"],
        },
    }
    classes: dict[str, Any] = {}
    added = []
    for mod_name, enums in specs.items():
        for part in range(1, mod_name.count(".") + 2):
            name = ".".join(mod_name.split(".")[:part])
            if name not in sys.modules:
                sys.modules[name] = types.ModuleType(name)
                added.append(name)
        for cls_name, members in enums.items():
            cls = enum.Enum(cls_name, {m: m for m in members}, module=mod_name)
            setattr(sys.modules[mod_name], cls_name, cls)
            classes[cls_name] = cls
    try:
        yield classes
    finally:
        for name in added:
            del sys.modules[name]


def megatron_args(cfg: NVLMConfig, tp: int, pp: int, vocab_rows: int, enums: dict[str, Any]) -> argparse.Namespace:
    lm = cfg.llm
    return argparse.Namespace(
        num_layers=lm.num_layers,
        hidden_size=lm.hidden_size,
        ffn_hidden_size=lm.intermediate_size,
        num_attention_heads=lm.num_heads,
        num_query_groups=lm.num_kv_heads,
        group_query_attention=True,
        kv_channels=lm.head_dim,
        max_position_embeddings=lm.max_position_embeddings,
        seq_length=256,
        position_embedding_type="rope",
        rotary_base=int(lm.rope_theta),
        rotary_percent=1.0,
        rotary_interleaved=False,
        add_bias_linear=False,
        add_qkv_bias=True,
        swiglu=True,
        untie_embeddings_and_output_weights=True,
        normalization="RMSNorm",
        norm_epsilon=1e-6,
        apply_query_key_layer_scaling=False,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        tokenizer_type="MultimodalTokenizer",
        tokenizer_model="Qwen/Qwen2-72B-Instruct",
        padded_vocab_size=vocab_rows,
        make_vocab_size_divisible_by=128,
        ckpt_format="torch",
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=torch.float32,
        main_grads_dtype=torch.float32,
        bf16=False,
        attention_backend=enums["AttnBackend"].auto,
        model_type=enums["ModelType"].encoder_and_decoder,
        vision_model_type="internvit",
        freeze_ViT=True,
        use_tile_tags=True,
        image_tag_type="nvlm",
    )


def _extra(te_major: int) -> Any:
    if te_major == 2:
        return torch.frombuffer(bytearray(b"\x80\x02N."), dtype=torch.uint8)  # pickle.dumps(None)
    buf = io.BytesIO()
    torch.save(None, buf)
    return buf


# ------------------------------------------------------------------------------------------ the checkpoint


def megatron_tensors(
    cfg: NVLMConfig, tp: int, pp: int, vit_heads: int, vocab_rows: int, seed: int = 0, te_major: int = 1
) -> Ranks:
    """Each rank's ``model`` dict: random weights in Megatron's per-rank shapes, per-stage layer numbering."""
    g = torch.Generator().manual_seed(seed)
    v, lm, pj = cfg.vision, cfg.llm, cfg.projector

    def rnd(*shape: int, scale: float = 0.0) -> torch.Tensor:
        std = scale or 1 / math.sqrt(shape[-1])
        return torch.randn(*shape, generator=g) * std

    def norm(n: int) -> torch.Tensor:
        return 1 + 0.1 * torch.randn(n, generator=g)

    ranks: Ranks = {(t, p): {} for t in range(tp) for p in range(pp)}

    def col(name: str, full: torch.Tensor, p: int = 0) -> None:  # split along dim 0
        for t, part in enumerate(full.chunk(tp, dim=0)):
            ranks[(t, p)][name] = part.clone()

    def row(name: str, full: torch.Tensor, p: int = 0) -> None:  # split along dim 1
        for t, part in enumerate(full.chunk(tp, dim=1)):
            ranks[(t, p)][name] = part.clone()

    def rep(name: str, full: torch.Tensor, p: int = 0) -> None:
        for t in range(tp):
            ranks[(t, p)][name] = full.clone()

    def extra(name: str, p: int = 0) -> None:
        for t in range(tp):
            ranks[(t, p)][name + "._extra_state"] = _extra(te_major)

    # ViT: per-head [q_h; k_h; v_h] rows; heads from v.num_heads on are dummies (zero).
    c, hd, width = v.hidden_size, v.head_dim, vit_heads * v.head_dim
    rep("vision_model.class_token", rnd(1, 1, c, scale=0.02))
    rep("vision_model.conv1.weight", rnd(c, 3, v.patch_size, v.patch_size, scale=0.05))
    rep("vision_model.conv1.bias", rnd(c, scale=0.02))
    rep("vision_model.position_embeddings.weight", rnd(v.num_patches + 1, c, scale=0.02))
    for j in range(v.num_layers):
        m = f"vision_model.decoder.layers.{j}."
        rep(m + "input_layernorm.weight", norm(c))
        qkv = rnd(vit_heads, 3 * hd, c)
        qkv[v.num_heads :] = 0
        col(m + "self_attention.linear_qkv.weight", qkv.reshape(3 * width, c))
        for q in "qk":
            w = norm(width)
            w[c:] = 0
            col(m + f"self_attention.{q}_layernorm.weight", w)
        proj = rnd(c, width)
        proj[:, c:] = 0
        row(m + "self_attention.linear_proj.weight", proj)
        rep(m + "self_attention.linear_proj.bias", rnd(c, scale=0.02))
        rep(m + "pre_mlp_layernorm.weight", norm(c))
        col(m + "mlp.linear_fc1.weight", rnd(v.intermediate_size, c))
        col(m + "mlp.linear_fc1.bias", rnd(v.intermediate_size, scale=0.02))
        row(m + "mlp.linear_fc2.weight", rnd(c, v.intermediate_size))
        rep(m + "mlp.linear_fc2.bias", rnd(c, scale=0.02))
        rep(m + "ls1", 0.1 + 0.02 * torch.randn(c, generator=g))
        rep(m + "ls2", 0.1 + 0.02 * torch.randn(c, generator=g))
        for e in (
            "self_attention.core_attention",
            "self_attention.linear_qkv",
            "self_attention.linear_proj",
            "mlp.linear_fc1",
            "mlp.linear_fc2",
        ):
            extra(m + e)
    m = "vision_projection.encoder."
    rep(m + "linear_fc1.layer_norm_weight", norm(pj.input_size))
    rep(m + "linear_fc1.layer_norm_bias", rnd(pj.input_size, scale=0.1))
    col(m + "linear_fc1.weight", rnd(pj.hidden_size, pj.input_size))
    row(m + "linear_fc2.weight", rnd(pj.output_size, pj.hidden_size))
    extra(m + "linear_fc1")
    extra(m + "linear_fc2")
    # LLM: embedding on the first stage, output layer and final norm on the last; layers numbered per stage.
    h, per_stage = lm.hidden_size, lm.num_layers // pp
    col("language_model.embedding.word_embeddings.weight", rnd(vocab_rows, h, scale=0.5))
    groups, per, lhd = lm.num_kv_heads // tp, lm.num_heads // lm.num_kv_heads, lm.head_dim
    for i in range(lm.num_layers):
        p, m = i // per_stage, f"language_model.decoder.layers.{i % per_stage}."
        rep(m + "self_attention.linear_qkv.layer_norm_weight", norm(h), p)
        for t in range(tp):  # each rank: its query groups, each [q heads; k; v]
            ranks[(t, p)][m + "self_attention.linear_qkv.weight"] = rnd(groups * (per + 2) * lhd, h)
            ranks[(t, p)][m + "self_attention.linear_qkv.bias"] = rnd(groups * (per + 2) * lhd, scale=0.1)
            ranks[(t, p)][m + "mlp.linear_fc1.weight"] = rnd(2 * lm.intermediate_size // tp, h)  # [gate_t; up_t]
        row(m + "self_attention.linear_proj.weight", rnd(h, lm.num_heads * lhd), p)
        rep(m + "mlp.linear_fc1.layer_norm_weight", norm(h), p)
        row(m + "mlp.linear_fc2.weight", rnd(h, lm.intermediate_size), p)
        for e in (
            "self_attention.core_attention",
            "self_attention.linear_qkv",
            "self_attention.linear_proj",
            "mlp.linear_fc1",
            "mlp.linear_fc2",
        ):
            extra(m + e, p)
    rep("language_model.decoder.final_layernorm.weight", norm(h), pp - 1)
    if te_major == 2:  # TE >= 1.13 RMSNorm keeps an extra state too
        extra("language_model.decoder.final_layernorm", pp - 1)
    col("language_model.output_layer.weight", rnd(vocab_rows, h), pp - 1)
    for t in range(tp):
        ranks[(t, pp - 1)]["language_model.output_layer._extra_state"] = None
    return ranks


def save_megatron(
    root: Path,
    ranks: Ranks,
    cfg: NVLMConfig,
    tp: int,
    pp: int,
    vocab_rows: int,
    release: bool = False,
    stale_pp_args: bool = False,
) -> Path:
    """Write ``ranks`` as Megatron does (``checkpointing.py``): tracker, iteration directory, one file per rank."""
    it = "release" if release else "iter_0031500"
    with megatron_modules() as enums:
        args = megatron_args(cfg, tp, 1 if stale_pp_args else pp, vocab_rows, enums)
        for (t, p), model in ranks.items():
            d = root / it / (f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else ""))
            d.mkdir(parents=True)
            np.random.seed(t)
            state = {
                "args": args,
                "checkpoint_version": 3.0,
                "iteration": 31500,
                "model": model,
                "optimizer": {"optimizer": {"param_groups": [{"lr": 1e-5, "weight_decay": 0.1, "params": [0, 1]}]}},
                "opt_param_scheduler": {"max_lr": 1e-5, "num_steps": 31500},
                "rerun_state_machine": {
                    "mode": enums["RerunMode"].disabled,
                    "state": enums["RerunState"].NOT_RUNNING_YET,
                    "diagnostic": enums["RerunDiagnostic"].CORRECT_RESULT,
                },
                "rng_state": [
                    {
                        "random_rng_state": random.getstate(),
                        "np_rng_state": np.random.get_state(),
                        "torch_rng_state": torch.get_rng_state(),
                        "rng_tracker_states": {},
                    }
                ],
                "num_floating_point_operations_so_far": 1.5e21,
            }
            torch.save(state, d / "model_optim_rng.pt")
    (root / "latest_checkpointed_iteration.txt").write_text("release" if release else "31500")
    return root / it


def write_megatron(root: Path, cfg: NVLMConfig, tp: int, pp: int, seed: int = 0, te_major: int = 1, **kw: Any) -> Ranks:
    """A tiny checkpoint under ``root`` (12 padded ViT heads, 576 vocabulary rows); returns the ranks' tensors."""
    ranks = megatron_tensors(cfg, tp, pp, vit_heads=12, vocab_rows=576, seed=seed, te_major=te_major)
    save_megatron(root, ranks, cfg, tp, pp, 576, **kw)
    return ranks


def read_megatron(it_dir: Path) -> tuple[Ranks, int, int]:
    """The ``model`` dicts of rank files this package wrote (stdlib/torch types only: ``weights_only`` loads them)."""
    ranks: Ranks = {}
    for d in it_dir.iterdir():
        parts = d.name.split("_")[2:]
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(d / "model_optim_rng.pt", weights_only=True)
        ranks[(int(parts[0]), int(parts[1]) if len(parts) > 1 else 0)] = state["model"]
    return ranks, max(t for t, _ in ranks) + 1, max(p for _, p in ranks) + 1


# ----------------------------------------------------------------------------------- Megatron's forward


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:  # (B, T, H, D), rotate-half
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    freqs = torch.arange(x.shape[1], dtype=torch.float32)[:, None] * inv
    emb = torch.cat([freqs, freqs], dim=-1)[None, :, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * emb.cos() + torch.cat([-x2, x1], dim=-1) * emb.sin()


def _pixel_shuffle(x: torch.Tensor, scale: float = 0.5) -> torch.Tensor:  # Megatron llava_model.pixel_shuffle v2
    side = int(x.shape[1] ** 0.5)
    x = x.reshape(x.shape[0], side, side, -1)
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale), int(c / scale)).permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale), int(w * scale), int(c / (scale * scale))).permute(0, 2, 1, 3).contiguous()
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _vision(ranks: Ranks, tp: int, cfg: NVLMConfig, pixels: torch.Tensor) -> torch.Tensor:
    v, r0 = cfg.vision, ranks[(0, 0)]
    hd, c = v.head_dim, v.hidden_size
    x = F.conv2d(pixels, r0["vision_model.conv1.weight"], r0["vision_model.conv1.bias"], stride=v.patch_size)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([r0["vision_model.class_token"].expand(x.shape[0], -1, -1), x], dim=1)
    x = x + r0["vision_model.position_embeddings.weight"]
    n, length, _ = x.shape
    for j in range(v.num_layers):
        m = f"vision_model.decoder.layers.{j}."
        h = _rms(x, r0[m + "input_layernorm.weight"], v.norm_eps)
        qs, ks, vs = [], [], []
        for t in range(tp):
            out = h @ ranks[(t, 0)][m + "self_attention.linear_qkv.weight"].T
            out = out.view(n, length, -1, 3 * hd)  # per head [q; k; v]
            qs.append(out[..., :hd])
            ks.append(out[..., hd : 2 * hd])
            vs.append(out[..., 2 * hd :])
        # InternViTRMSNorm over every rank's heads, divided by the unpadded width.
        for parts, q in ((qs, "q"), (ks, "k")):
            var = sum(p.pow(2).sum((-1, -2)) for p in parts)[..., None, None] / c
            for t in range(tp):
                w = ranks[(t, 0)][m + f"self_attention.{q}_layernorm.weight"].view(-1, hd)
                parts[t] = parts[t] * torch.rsqrt(var + v.norm_eps) * w
        attn = torch.zeros_like(x)
        for t in range(tp):
            q, k, vv = (p[t].transpose(1, 2) for p in (qs, ks, vs))
            o = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ vv
            attn = (
                attn
                + o.transpose(1, 2).reshape(n, length, -1) @ ranks[(t, 0)][m + "self_attention.linear_proj.weight"].T
            )
        x = x + (attn + r0[m + "self_attention.linear_proj.bias"]) * r0[m + "ls1"]
        h = _rms(x, r0[m + "pre_mlp_layernorm.weight"], v.norm_eps)
        mlp = sum(
            F.gelu(h @ ranks[(t, 0)][m + "mlp.linear_fc1.weight"].T + ranks[(t, 0)][m + "mlp.linear_fc1.bias"])
            @ ranks[(t, 0)][m + "mlp.linear_fc2.weight"].T
            for t in range(tp)
        )
        x = x + (mlp + r0[m + "mlp.linear_fc2.bias"]) * r0[m + "ls2"]
    x = _pixel_shuffle(x[:, 1:])
    m = "vision_projection.encoder."
    x = F.layer_norm(
        x, (x.shape[-1],), r0[m + "linear_fc1.layer_norm_weight"], r0[m + "linear_fc1.layer_norm_bias"], 1e-6
    )
    return sum(
        F.gelu(x @ ranks[(t, 0)][m + "linear_fc1.weight"].T) @ ranks[(t, 0)][m + "linear_fc2.weight"].T
        for t in range(tp)
    )


def megatron_logits(
    ranks: Ranks,
    tp: int,
    pp: int,
    cfg: NVLMConfig,
    input_ids: torch.Tensor,
    pixels: torch.Tensor | None = None,
    image_token_id: int = -1,
) -> torch.Tensor:
    """Logits (B, T, vocab_size) of NVLM-D computed from Megatron's rank tensors, rank by rank."""
    lm = cfg.llm
    b, length = input_ids.shape
    table = torch.cat([ranks[(t, 0)]["language_model.embedding.word_embeddings.weight"] for t in range(tp)])
    x = table[input_ids]
    if pixels is not None:
        feats = _vision(ranks, tp, cfg, pixels).reshape(-1, lm.hidden_size)
        x = x.clone()
        x[input_ids == image_token_id] = feats
    hd, per = lm.head_dim, lm.num_heads // lm.num_kv_heads
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    per_stage = lm.num_layers // pp
    for i in range(lm.num_layers):
        p, m = i // per_stage, f"language_model.decoder.layers.{i % per_stage}."
        r0 = ranks[(0, p)]
        h = _rms(x, r0[m + "self_attention.linear_qkv.layer_norm_weight"], lm.rms_norm_eps)
        attn = torch.zeros_like(x)
        for t in range(tp):
            r = ranks[(t, p)]
            out = h @ r[m + "self_attention.linear_qkv.weight"].T + r[m + "self_attention.linear_qkv.bias"]
            out = out.view(b, length, -1, (per + 2) * hd)  # the rank's query groups
            q = out[..., : per * hd].reshape(b, length, -1, hd)
            k, vv = out[..., per * hd : (per + 1) * hd], out[..., (per + 1) * hd :]
            q, k = _rope(q, lm.rope_theta), _rope(k, lm.rope_theta)
            k, vv = k.repeat_interleave(per, dim=2), vv.repeat_interleave(per, dim=2)
            s = q.transpose(1, 2) @ k.permute(0, 2, 3, 1) / math.sqrt(hd)
            o = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1) @ vv.transpose(1, 2)
            attn = attn + o.transpose(1, 2).reshape(b, length, -1) @ r[m + "self_attention.linear_proj.weight"].T
        x = x + attn
        h = _rms(x, r0[m + "mlp.linear_fc1.layer_norm_weight"], lm.rms_norm_eps)
        mlp = torch.zeros_like(x)
        for t in range(tp):
            gate, up = (h @ ranks[(t, p)][m + "mlp.linear_fc1.weight"].T).chunk(2, dim=-1)
            mlp = mlp + (F.silu(gate) * up) @ ranks[(t, p)][m + "mlp.linear_fc2.weight"].T
        x = x + mlp
    last = ranks[(0, pp - 1)]
    x = _rms(x, last["language_model.decoder.final_layernorm.weight"], lm.rms_norm_eps)
    logits = torch.cat([x @ ranks[(t, pp - 1)]["language_model.output_layer.weight"].T for t in range(tp)], dim=-1)
    return logits[..., : lm.vocab_size]
