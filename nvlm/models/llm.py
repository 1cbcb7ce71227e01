"""The decoder LLM: Qwen2 (q/k/v biases) or Llama/Yi (no biases), with a KV cache.

GQA attention through ``F.scaled_dot_product_attention``, non-interleaved ("rotate half") RoPE as in
HF checkpoints, RMSNorm, SwiGLU. Module names follow HF's ``Qwen2ForCausalLM`` so that the released
``language_model.*`` keys load as they are. Spec: NVLM_SPEC.md section 4.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nvlm.config import LLMConfig
from nvlm.models.cache import KVCache
from nvlm.models.vision import RMSNorm


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (B, T, head_dim) for integer positions (B, T), computed in float32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim)
    freqs = position_ids.float()[..., None] * inv_freq  # (B, T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rope_base(cfg: LLMConfig, position_ids: torch.Tensor) -> float:
    """The RoPE base for a forward over ``position_ids``: ``rope_theta``, or with ``cfg.dynamic_rope`` and a
    sequence past ``max_position_embeddings`` (its largest position + 1 = ``L``), the dynamic-NTK base of
    transformers' ``dynamic`` rope type, ``theta * (factor * L / max - (factor - 1)) ** (d / (d - 2))``.
    It follows the current call's positions: transformers keeps the largest base it has reached until a
    sequence shorter than ``max_position_embeddings`` comes; both agree on a generation that only grows."""
    if not cfg.dynamic_rope or not position_ids.numel():
        return cfg.rope_theta
    length, limit = int(position_ids.max()) + 1, cfg.max_position_embeddings
    if length <= limit:
        return cfg.rope_theta
    factor, d = float(cfg.rope_scaling["factor"]), cfg.head_dim  # type: ignore[index]
    return cfg.rope_theta * (factor * length / limit - (factor - 1)) ** (d / (d - 2))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D); rotate the two halves of the head dimension."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


Run = tuple[int, int, bool]  # [start, end) of a row, and whether it is a document (or padding)


@dataclass(frozen=True)
class Documents:
    """The documents of a batch without a cache, each attended on its own: a packed row's samples, or each
    row's real tokens. ``runs[b]`` splits row ``b`` into documents and padding, in order.

    Each document is one causal ``F.scaled_dot_product_attention`` over its own tokens, in the unmasked
    (flash) kernel: on a packed training batch ~sum(L^2) work where the block-diagonal (B, 1, T, T) mask
    costs B * T^2 in the masked kernel (``benchmarks/bench_attention.py``; docs/BENCHMARKS.md).
    """

    runs: tuple[tuple[Run, ...], ...]

    def to(self, device: torch.device | str) -> Documents:  # plain ints: the same on every device
        return self


def documents(attention_mask: torch.Tensor) -> Documents | None:
    """(B, T) mask (0 = padding, k > 0 = document k of the row) -> its documents, or None when a row holds a
    document in more than one run (a mask with holes), which only the (B, 1, T, T) mask expresses."""
    ids = attention_mask.long().cpu()
    b, t = ids.shape
    change = torch.ones(b, t, dtype=torch.bool)
    change[:, 1:] = ids[:, 1:] != ids[:, :-1]
    runs = []
    for r in range(b):
        begin = torch.nonzero(change[r]).squeeze(1)  # (R) where each run of one id starts
        values = ids[r, begin].tolist()
        docs = [v for v in values if v > 0]
        if len(set(docs)) != len(docs):
            return None
        starts = begin.tolist()
        ends = [*starts[1:], t]
        runs.append(tuple((s, e, v > 0) for s, e, v in zip(starts, ends, values, strict=True)))
    return Documents(tuple(runs))


@torch.compiler.disable  # its loop follows each batch's documents: under torch.compile a graph break, not a recompile
def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: Documents) -> torch.Tensor:
    """Causal attention within each document: q (B, H, T, D), k and v (B, Hkv, T, D) -> (B, H, T, D), zero at
    padding positions."""
    gqa = q.shape[1] != k.shape[1]
    if all(len(r) == 1 and r[0][2] for r in docs.runs):  # one document a row: plain causal attention
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    rows = []
    for runs, qr, kr, vr in zip(docs.runs, q.unbind(0), k.unbind(0), v.unbind(0), strict=True):  # (H, T, D) each
        sizes = [e - s for s, e, _ in runs]  # split and unbind, not slices: their backward is one cat or stack
        pieces = [
            F.scaled_dot_product_attention(qd[None], kd[None], vd[None], is_causal=True, enable_gqa=gqa)[0]
            if real
            else torch.zeros_like(qd)
            for (_, _, real), qd, kd, vd in zip(
                runs, qr.split(sizes, 1), kr.split(sizes, 1), vr.split(sizes, 1), strict=True
            )
        ]
        rows.append(torch.cat(pieces, dim=1))
    return torch.stack(rows)


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C)
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | Documents | None,  # (B, 1, T, S) bool, True = may attend; None = plain causal
        cache: KVCache | None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, Hkv, S, D)
        if isinstance(mask, Documents):
            out = document_attention(q, k, v, mask)
        else:
            gqa = self.num_heads != self.num_kv_heads
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LLMConfig, intermediate_size: int | None = None) -> None:
        super().__init__()
        width = intermediate_size or cfg.intermediate_size
        self.gate_proj = nn.Linear(cfg.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache):  # (B, T, C) -> (B, T, C)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LanguageModel(nn.Module):
    """``language_model`` of the checkpoint: ``model`` (embeddings, layers, norm) and ``lm_head``."""

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, C)
        return self.model.embed_tokens(input_ids)

    def forward(
        self,
        embeds: torch.Tensor,  # (B, T, C)
        position_ids: torch.Tensor,  # (B, T)
        mask: torch.Tensor | Documents | None = None,  # (B, 1, T, S) bool; None = causal without padding
        cache: KVCache | None = None,
        num_logits_to_keep: int = 0,  # 0 = logits at every position
        before_layer: Callable[[int, torch.Tensor], torch.Tensor] | None = None,  # NVLM-X/H cross-attention
        logits_at: torch.Tensor | None = None,  # (B, T) bool: logits at these positions only, as (N, vocab)
    ) -> torch.Tensor:  # (B, T or num_logits_to_keep, vocab), or (N, vocab) with ``logits_at``
        cfg = self.config
        x = embeds
        base = rope_base(cfg, position_ids)
        for i, layer in enumerate(self.model.layers):
            if before_layer is not None:
                x = before_layer(i, x)
            device = next(layer.parameters()).device  # layers may sit on several devices
            x, position_ids = x.to(device), position_ids.to(device)
            cos, sin = rope_cos_sin(position_ids, cfg.head_dim, base, x.dtype)
            x = layer(x, cos, sin, None if mask is None else mask.to(device), cache)
        if cache is not None:
            cache.advance(embeds.shape[1])
        x = self.model.norm(x.to(self.model.norm.weight.device))
        if num_logits_to_keep:
            x = x[:, -num_logits_to_keep:]
        if logits_at is not None:
            x = x[logits_at.to(x.device)]  # (N, C): training needs the supervised positions' logits only
        return self.lm_head(x.to(self.lm_head.weight.device))


def attention_mask_4d(attention_mask: torch.Tensor, num_new: int) -> torch.Tensor:
    """(B, S) mask over cached + new positions -> (B, 1, T, S) causal bool mask for the T new tokens.

    The mask holds 0 for padding and a document id k > 0 for real tokens: a plain batch is all ones, a
    packed row numbers its samples 1, 2, ... and each token attends only earlier tokens of its own
    document. A padded query position may still see itself, so that no row is all-masked (SDPA would give NaN).
    """
    _b, s = attention_mask.shape
    offset = s - num_new
    q_pos = torch.arange(offset, s, device=attention_mask.device)[:, None]  # (T, 1)
    k_pos = torch.arange(s, device=attention_mask.device)[None, :]  # (1, S)
    doc = attention_mask.long()
    same_doc = (doc[:, offset:, None] == doc[:, None, :]) & (doc[:, None, :] > 0)  # (B, T, S)
    allowed = (k_pos <= q_pos)[None] & same_doc
    allowed |= (k_pos == q_pos)[None]
    return allowed[:, None]


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) mask -> (B, S) positions: each token's index among the earlier tokens of its document.

    Left padding is skipped (0 at each row's first real token), and positions restart at every document of
    a packed row (mask values 1, 2, ...). Padding gets position 0.
    """
    doc = attention_mask.long()
    n_docs = max(int(doc.max()), 1) if doc.numel() else 1
    one_hot = doc[..., None] == torch.arange(1, n_docs + 1, device=doc.device)  # (B, S, n_docs)
    counts = one_hot.long().cumsum(1)  # tokens of each document so far
    return ((counts * one_hot).sum(-1) - 1).clamp(min=0)
