"""The key mapping between Megatron-Core's NVLM-D (TE layer specs) and ours, with each tensor's TP split.

Each ``Rule`` ties one Megatron tensor to the tensors of ours it holds, with the TP-independent ("merged") shape,
how the ranks split it (MCORE_SPEC 3) and the two conversions of the merged tensor:
- ``rep``: replicated (every rank holds it whole); ``col``: ranks concatenated along dim 0; ``row``: along dim 1;
  ``glu``: the LM's fc1, each rank holding ``[gate_r; up_r]``, merged as ``[gate; up]`` (MCORE_SPEC 2.4).
- LM ``linear_qkv``: per query group ``[q heads of the group; k; v]`` (MCORE_SPEC 2.3) <-> q/k/v projections.
- ViT ``linear_qkv``: per head ``[q_h; k_h; v_h]`` over ``vit_heads`` heads, the ones after the real heads all
  zero (MCORE_SPEC 2.5) <-> our ``[Q; K; V]`` of the real heads; q/k-norm and proj padded likewise.
- embedding and output layer: ``padded_vocab`` rows, of which ours keeps the first ``vocab_size``; padding is
  written as Megatron's converter does, repeating the last row (MCORE_SPEC 2.8).
Names here are global (a layer's index counts from the first layer of the whole model); ``nvlm.mcore.read`` and
``write`` translate them to the per-stage numbering of the rank files.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from nvlm.checkpoint import CheckpointError
from nvlm.config import NVLMConfig

Split = Literal["rep", "col", "row", "glu"]
Tensor = torch.Tensor


@dataclass(frozen=True)
class Geometry:
    """What the Megatron layout adds to the model's config: TP size, padded vocabulary, padded ViT heads."""

    tp: int
    padded_vocab: int
    vit_heads: int


@dataclass(frozen=True)
class Rule:
    mcore: str  # global Megatron name
    split: Split
    shape: tuple[int, ...]  # merged
    ours: tuple[str, ...]
    to_ours: Callable[[Tensor], tuple[Tensor, ...]]
    from_ours: Callable[..., Tensor]
    layer: int | None = None  # LM decoder layer (pipeline placement); None: first stage, or last if ``last``
    last: bool = False

    def piece_shape(self, tp: int) -> tuple[int, ...]:
        """The shape each TP rank holds."""
        dim = {"rep": None, "col": 0, "glu": 0, "row": 1}[self.split]
        if dim is None:
            return self.shape
        return tuple(n // tp if d == dim else n for d, n in enumerate(self.shape))


def merge_into(rule: Rule, out: Tensor, piece_: Tensor, tp: int, rank: int) -> None:
    """Copy TP rank ``rank``'s piece into its place in the merged tensor ``out`` (``rep``: the whole of it)."""
    if rule.split == "rep":
        out.copy_(piece_)
    elif rule.split == "glu":
        n, half = piece_.shape[0] // 2, out.shape[0] // 2
        out[rank * n : (rank + 1) * n].copy_(piece_[:n])
        out[half + rank * n : half + (rank + 1) * n].copy_(piece_[n:])
    elif rule.split == "col":
        n = piece_.shape[0]
        out[rank * n : (rank + 1) * n].copy_(piece_)
    else:
        n = piece_.shape[1]
        out[:, rank * n : (rank + 1) * n].copy_(piece_)


def piece(rule: Rule, merged: Tensor, tp: int, rank: int) -> Tensor:
    """TP rank ``rank``'s piece of a merged tensor, its own copy (torch.save writes whole storages)."""
    if rule.split == "rep":
        return merged.clone()
    if rule.split == "glu":
        gate, up = (t.chunk(tp, dim=0)[rank] for t in merged.chunk(2, dim=0))
        return torch.cat([gate, up], dim=0)
    return merged.chunk(tp, dim=0 if rule.split == "col" else 1)[rank].clone()


def check_geometry(cfg: NVLMConfig, geo: Geometry) -> None:
    """Every split dimension divisible by the TP size, the padded sizes large enough: else ``CheckpointError``."""
    v, lm = cfg.vision, cfg.llm
    sizes = {
        "LLM query groups": lm.num_kv_heads,
        "LLM FFN width": lm.intermediate_size,
        "padded vocabulary": geo.padded_vocab,
        "padded ViT heads": geo.vit_heads,
        "ViT MLP width": v.intermediate_size,
        "projector width": cfg.projector.hidden_size,
    }
    bad = [f"{k} {n}" for k, n in sizes.items() if n % geo.tp]
    if bad:
        raise CheckpointError(f"tensor parallelism {geo.tp} does not divide the {', '.join(bad)}")
    if geo.padded_vocab < lm.vocab_size or geo.vit_heads < v.num_heads:
        raise CheckpointError(
            f"the Megatron layout has {geo.padded_vocab} vocabulary rows and {geo.vit_heads} ViT "
            f"heads; the config needs {lm.vocab_size} and {v.num_heads}"
        )
    if not cfg.architecture.released or cfg.projector.num_layers != 2:
        raise CheckpointError(f"NVLM-{cfg.arch}: only NVLM-D has a Megatron-Core layout (examples/multimodal)")


def rules(cfg: NVLMConfig, geo: Geometry) -> list[Rule]:
    """Every Megatron tensor of an NVLM-D of this config, in Megatron's module order (ViT, projector, LLM)."""
    check_geometry(cfg, geo)
    return _vision(cfg, geo) + _projector(cfg) + _llm(cfg, geo)


def _same(t: Tensor) -> tuple[Tensor, ...]:
    return (t,)


def _one(t: Tensor) -> Tensor:
    return t


def _plain(mcore: str, ours: str, split_: Split, shape: tuple[int, ...], **kw: object) -> Rule:
    return Rule(mcore, split_, shape, (ours,), _same, _one, **kw)  # type: ignore[arg-type]


def _llm(cfg: NVLMConfig, geo: Geometry) -> list[Rule]:
    lm = cfg.llm
    h, hd, ng, f = lm.hidden_size, lm.head_dim, lm.num_kv_heads, lm.intermediate_size
    per = lm.num_heads // ng  # query heads per group

    def qkv_to_ours(w: Tensor) -> tuple[Tensor, ...]:
        rest = w.shape[1:]
        g = w.reshape(ng, (per + 2) * hd, *rest)
        q, k, v = g[:, : per * hd], g[:, per * hd : (per + 1) * hd], g[:, (per + 1) * hd :]
        return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)

    def qkv_from_ours(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        rest = q.shape[1:]
        parts = [q.reshape(ng, per * hd, *rest), k.reshape(ng, hd, *rest), v.reshape(ng, hd, *rest)]
        return torch.cat(parts, dim=1).reshape(-1, *rest)

    def vocab_to_ours(w: Tensor) -> tuple[Tensor, ...]:
        return (w[: lm.vocab_size],)

    def vocab_from_ours(w: Tensor) -> Tensor:
        return torch.cat([w, w[-1:].expand(geo.padded_vocab - w.shape[0], -1)], dim=0)

    def glu_to_ours(w: Tensor) -> tuple[Tensor, ...]:
        return tuple(w.chunk(2, dim=0))

    def glu_from_ours(gate: Tensor, up: Tensor) -> Tensor:
        return torch.cat([gate, up], dim=0)

    vocab = (geo.padded_vocab, h)
    out = [
        Rule(
            "language_model.embedding.word_embeddings.weight",
            "col",
            vocab,
            ("language_model.model.embed_tokens.weight",),
            vocab_to_ours,
            vocab_from_ours,
        )
    ]
    rows = (lm.num_heads + 2 * ng) * hd
    for i in range(lm.num_layers):
        m, o = f"language_model.decoder.layers.{i}.", f"language_model.model.layers.{i}."
        qkv = tuple(f"{o}self_attn.{p}_proj." for p in "qkv")
        out += [
            _plain(
                f"{m}self_attention.linear_qkv.layer_norm_weight", f"{o}input_layernorm.weight", "rep", (h,), layer=i
            ),
            Rule(
                f"{m}self_attention.linear_qkv.weight",
                "col",
                (rows, h),
                tuple(p + "weight" for p in qkv),
                qkv_to_ours,
                qkv_from_ours,
                layer=i,
            ),
        ]
        if lm.qkv_bias:
            out.append(
                Rule(
                    f"{m}self_attention.linear_qkv.bias",
                    "col",
                    (rows,),
                    tuple(p + "bias" for p in qkv),
                    qkv_to_ours,
                    qkv_from_ours,
                    layer=i,
                )
            )
        out += [
            _plain(
                f"{m}self_attention.linear_proj.weight",
                f"{o}self_attn.o_proj.weight",
                "row",
                (h, lm.num_heads * hd),
                layer=i,
            ),
            _plain(f"{m}mlp.linear_fc1.layer_norm_weight", f"{o}post_attention_layernorm.weight", "rep", (h,), layer=i),
            Rule(
                f"{m}mlp.linear_fc1.weight",
                "glu",
                (2 * f, h),
                (f"{o}mlp.gate_proj.weight", f"{o}mlp.up_proj.weight"),
                glu_to_ours,
                glu_from_ours,
                layer=i,
            ),
            _plain(f"{m}mlp.linear_fc2.weight", f"{o}mlp.down_proj.weight", "row", (h, f), layer=i),
        ]
    out.append(
        _plain(
            "language_model.decoder.final_layernorm.weight", "language_model.model.norm.weight", "rep", (h,), last=True
        )
    )
    if not lm.tie_word_embeddings:
        out.append(
            Rule(
                "language_model.output_layer.weight",
                "col",
                vocab,
                ("language_model.lm_head.weight",),
                vocab_to_ours,
                vocab_from_ours,
                last=True,
            )
        )
    return out


def _vision(cfg: NVLMConfig, geo: Geometry) -> list[Rule]:
    v = cfg.vision
    c, hd, heads, hp = v.hidden_size, v.head_dim, v.num_heads, geo.vit_heads
    width = hp * hd

    def qkv_to_ours(w: Tensor) -> tuple[Tensor, ...]:
        rest = w.shape[1:]
        per_head = w.reshape(hp, 3, hd, *rest)
        if per_head[heads:].any():
            warnings.warn(f"the ViT's dummy heads {heads}..{hp - 1} are not all zero; they are dropped", stacklevel=2)
        return (per_head[:heads].transpose(0, 1).reshape(3 * heads * hd, *rest),)

    def qkv_from_ours(w: Tensor) -> Tensor:
        rest = w.shape[1:]
        per_head = w.reshape(3, heads, hd, *rest).transpose(0, 1)
        pad = per_head.new_zeros(hp - heads, 3, hd, *rest)
        return torch.cat([per_head, pad], dim=0).reshape(3 * width, *rest)

    def norm_to_ours(w: Tensor) -> tuple[Tensor, ...]:
        return (w[:c],)

    def norm_from_ours(w: Tensor) -> Tensor:  # zeros for the dummy channels, as Megatron's converter writes
        return torch.cat([w, w.new_zeros(width - c)])

    def proj_to_ours(w: Tensor) -> tuple[Tensor, ...]:
        if w[:, c:].any():
            warnings.warn("the ViT's dummy-head projection columns are not all zero; they are dropped", stacklevel=2)
        return (w[:, :c],)

    def proj_from_ours(w: Tensor) -> Tensor:
        return torch.cat([w, w.new_zeros(w.shape[0], width - c)], dim=1)

    def pos_to_ours(w: Tensor) -> tuple[Tensor, ...]:
        return (w.unsqueeze(0),)

    def pos_from_ours(w: Tensor) -> Tensor:
        return w.squeeze(0)

    m, o = "vision_model.", "vision_model.embeddings."
    p = v.patch_size
    out = [
        _plain(f"{m}class_token", f"{o}class_embedding", "rep", (1, 1, c)),
        _plain(f"{m}conv1.weight", f"{o}patch_embedding.weight", "rep", (c, 3, p, p)),
        _plain(f"{m}conv1.bias", f"{o}patch_embedding.bias", "rep", (c,)),
        Rule(
            f"{m}position_embeddings.weight",
            "rep",
            (v.num_patches + 1, c),
            (f"{o}position_embedding",),
            pos_to_ours,
            pos_from_ours,
        ),
    ]
    for j in range(v.num_layers):
        m, o = f"vision_model.decoder.layers.{j}.", f"vision_model.encoder.layers.{j}."
        out += [
            _plain(f"{m}input_layernorm.weight", f"{o}norm1.weight", "rep", (c,)),
            Rule(
                f"{m}self_attention.linear_qkv.weight",
                "col",
                (3 * width, c),
                (f"{o}attn.qkv.weight",),
                qkv_to_ours,
                qkv_from_ours,
            ),
        ]
        if v.qkv_bias:
            out.append(
                Rule(
                    f"{m}self_attention.linear_qkv.bias",
                    "col",
                    (3 * width,),
                    (f"{o}attn.qkv.bias",),
                    qkv_to_ours,
                    qkv_from_ours,
                )
            )
        if v.qk_norm:
            out += [
                Rule(
                    f"{m}self_attention.{q}_layernorm.weight",
                    "col",
                    (width,),
                    (f"{o}attn.{q}_norm.weight",),
                    norm_to_ours,
                    norm_from_ours,
                )
                for q in "qk"
            ]
        out += [
            Rule(
                f"{m}self_attention.linear_proj.weight",
                "row",
                (c, width),
                (f"{o}attn.proj.weight",),
                proj_to_ours,
                proj_from_ours,
            ),
            _plain(f"{m}self_attention.linear_proj.bias", f"{o}attn.proj.bias", "rep", (c,)),
            _plain(f"{m}pre_mlp_layernorm.weight", f"{o}norm2.weight", "rep", (c,)),
            _plain(f"{m}mlp.linear_fc1.weight", f"{o}mlp.fc1.weight", "col", (v.intermediate_size, c)),
            _plain(f"{m}mlp.linear_fc1.bias", f"{o}mlp.fc1.bias", "col", (v.intermediate_size,)),
            _plain(f"{m}mlp.linear_fc2.weight", f"{o}mlp.fc2.weight", "row", (c, v.intermediate_size)),
            _plain(f"{m}mlp.linear_fc2.bias", f"{o}mlp.fc2.bias", "rep", (c,)),
            _plain(f"{m}ls1", f"{o}ls1", "rep", (c,)),
            _plain(f"{m}ls2", f"{o}ls2", "rep", (c,)),
        ]
    return out


def _projector(cfg: NVLMConfig) -> list[Rule]:
    p, m = cfg.projector, "vision_projection.encoder."
    return [
        _plain(f"{m}linear_fc1.layer_norm_weight", "mlp1.0.weight", "rep", (p.input_size,)),
        _plain(f"{m}linear_fc1.layer_norm_bias", "mlp1.0.bias", "rep", (p.input_size,)),
        _plain(f"{m}linear_fc1.weight", "mlp1.1.weight", "col", (p.hidden_size, p.input_size)),
        _plain(f"{m}linear_fc2.weight", "mlp1.3.weight", "row", (p.output_size, p.hidden_size)),
    ]


def extra_state_keys(cfg: NVLMConfig) -> list[tuple[str, int | None, bool]]:
    """The ``_extra_state`` entries a TE >= 1.8 Megatron expects (global name, LM layer, last stage), all ``None``."""
    attn = (
        "self_attention.core_attention",
        "self_attention.linear_qkv",
        "self_attention.linear_proj",
        "mlp.linear_fc1",
        "mlp.linear_fc2",
    )
    out: list[tuple[str, int | None, bool]] = [
        (f"vision_model.decoder.layers.{j}.{m}._extra_state", None, False)
        for j in range(cfg.vision.num_layers)
        for m in attn
    ]
    out += [(f"vision_projection.encoder.{m}._extra_state", None, False) for m in ("linear_fc1", "linear_fc2")]
    out += [
        (f"language_model.decoder.layers.{i}.{m}._extra_state", i, False)
        for i in range(cfg.llm.num_layers)
        for m in attn
    ]
    out.append(("language_model.output_layer._extra_state", None, True))
    return out
