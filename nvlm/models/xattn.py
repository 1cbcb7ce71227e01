"""Gated cross-attention, NVLM-X's and NVLM-H's way of reading image tokens (spec sections 5 and 6).

Before every k-th decoder layer, a Flamingo-style GATED XATTN-DENSE block:

    h = h + tanh(a) * XAttn(norm(h), memory)
    h = h + tanh(b) * FFN(norm(h))            a = b = 0 at init: a fresh model is exactly its text LLM.

The memory of a row is its crops side by side, L tokens each (NVLM-X: 256 projected tokens per tile and
thumbnail; NVLM-H: a tile's ``<tile_k>`` tag embeddings, then its 256 tokens). A cross-attention mask at
crop granularity says which crops each text token reads. A token that reads no crop (text before any
image, padding) gets exactly zero from the whole block, FFN included: text-only data passes through
unchanged whatever the gates. Choices where the paper is silent are listed on ``CrossAttentionConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from nvlm.config import CrossAttentionConfig, LLMConfig
from nvlm.models.llm import MLP
from nvlm.models.vision import RMSNorm


@dataclass
class Memory:
    """The cross-attention memory of a batch, and each block's keys and values once computed."""

    embeds: torch.Tensor  # (B, K * L, C): K crops per row (padded), L tokens per crop
    key_mask: torch.Tensor  # (B, K * L) bool: real tokens (not tag padding, not missing crops)
    tokens_per_crop: int  # L
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # block -> (B, Hkv, K*L, D)
    keep_kv: bool = False  # a generation cache's memory keeps each block's keys and values

    @property
    def crop_mask(self) -> torch.Tensor:  # (B, K) bool: the crops each row has
        b = self.key_mask.shape[0]
        return self.key_mask.view(b, -1, self.tokens_per_crop).any(-1)

    def select(self, rows: torch.Tensor) -> "Memory":
        """The memory of these batch rows only, block keys and values included."""
        kv = {i: (k[rows], v[rows]) for i, (k, v) in self.kv.items()}
        return Memory(self.embeds[rows], self.key_mask[rows], self.tokens_per_crop, kv, self.keep_kv)

    @staticmethod
    def concat(memories: "list[Memory | None]", rows: list[int]) -> "Memory":
        """Stack rows of several batches (``None``: rows without images), padding to the most crops."""
        ref = next(m for m in memories if m is not None)
        size = max(m.key_mask.shape[1] for m in memories if m is not None)
        blocks = [i for i in ref.kv if all(m is None or i in m.kv for m in memories)]

        def pad(x: torch.Tensor | None, n: int, dim: int, like: torch.Tensor) -> torch.Tensor:
            if x is None:  # a batch without memory: all padding
                shape = list(like.shape)
                shape[0], shape[dim] = n, size
                return like.new_zeros(shape)
            widths = [0, 0] * (x.dim() - dim - 1) + [0, size - x.shape[dim]]
            return torch.nn.functional.pad(x, widths)

        embeds = torch.cat([pad(m and m.embeds, r, 1, ref.embeds) for m, r in zip(memories, rows)])
        key_mask = torch.cat([pad(m and m.key_mask, r, 1, ref.key_mask) for m, r in zip(memories, rows)])
        kv = {}
        for i in blocks:
            ks = [pad(m and m.kv[i][0], r, 2, ref.kv[i][0]) for m, r in zip(memories, rows)]
            vs = [pad(m and m.kv[i][1], r, 2, ref.kv[i][1]) for m, r in zip(memories, rows)]
            kv[i] = (torch.cat(ks), torch.cat(vs))
        return Memory(embeds, key_mask, ref.tokens_per_crop, kv, ref.keep_kv)

    def attention_mask(self, cross_attention_mask: torch.Tensor | None, num_new: int) -> torch.Tensor:
        """(B, T, K) crops each new token reads (None: all its row's crops) -> (B, 1, T, K * L) bool."""
        crops = self.crop_mask
        if cross_attention_mask is None:
            cross_attention_mask = crops[:, None, :].expand(-1, num_new, -1)
        elif cross_attention_mask.shape != (crops.shape[0], num_new, crops.shape[1]):
            raise ValueError(f"cross_attention_mask has shape {tuple(cross_attention_mask.shape)}; the batch needs "
                             f"(B, T, K) = {(crops.shape[0], num_new, crops.shape[1])}")  # fmt: skip
        tokens = cross_attention_mask.to(crops.device).bool().repeat_interleave(self.tokens_per_crop, dim=-1)
        return (tokens & self.key_mask[:, None, :])[:, None]


def assemble_memory(feats: torch.Tensor, valid: torch.Tensor, crops_per_row: torch.Tensor) -> Memory | None:
    """Per-crop tokens (N, L, C) with their validity (N, L), taken row by row -> a padded (B, K*L, C) memory."""
    counts = crops_per_row.to(feats.device).long()
    n, length, c = feats.shape
    if int(counts.sum()) != n:
        raise ValueError(f"memory_crops sums to {int(counts.sum())} but {n} memory crops were given")
    b, k = counts.numel(), int(counts.max()) if counts.numel() else 0
    if k == 0:
        return None
    row = torch.repeat_interleave(torch.arange(b, device=feats.device), counts)  # (N,)
    slot = torch.arange(n, device=feats.device) - (counts.cumsum(0) - counts)[row]  # index within its row
    embeds = feats.new_zeros(b, k, length, c)
    embeds[row, slot] = feats
    key_mask = torch.zeros(b, k, length, dtype=torch.bool, device=feats.device)
    key_mask[row, slot] = valid.to(feats.device)
    return Memory(embeds.view(b, k * length, c), key_mask.view(b, k * length), length)


class CrossAttention(nn.Module):
    """Queries from the text, keys and values from the memory; the LLM's heads and GQA groups, no RoPE."""

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, M, C) -> keys and values (B, Hkv, M, D)."""
        b, m, _ = memory.shape
        memory = memory.to(self.k_proj.weight.dtype)
        k = self.k_proj(memory).view(b, m, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(memory).view(b, m, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return k.contiguous(), v.contiguous()  # not views: the block returns them (FSDP2 hooks its outputs)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, C), k/v (B, Hkv, M, D), mask (B, 1, T, M) with no all-False row -> (B, T, C)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        gqa = self.num_heads != self.num_kv_heads
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class GatedCrossAttentionBlock(nn.Module):
    """``xattn_layers.{i}``: gated cross-attention, then a gated FFN; RMSNorm before each."""

    def __init__(self, cfg: LLMConfig, xcfg: CrossAttentionConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = CrossAttention(cfg)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn = MLP(cfg, xcfg.intermediate_size)
        self.ffn_gate = nn.Parameter(torch.zeros(1))

    def reset_parameters(self) -> None:
        """Gates closed: the block adds nothing until training opens them."""
        nn.init.zeros_(self.attn_gate)
        nn.init.zeros_(self.ffn_gate)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C)
        memory: torch.Tensor,  # (B, M, C) memory tokens
        mask: torch.Tensor,  # (B, 1, T, M) bool
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,  # this block's keys/values of ``memory``, if computed
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """-> the new hidden states (B, T, C) and the keys/values (B, Hkv, M, D), kept by a generation cache.

        The keys and values are computed here, inside the block's ``forward``, so that a sharded (FSDP2) or
        checkpointed block has its weights gathered whenever they are used."""
        k, v = kv if kv is not None else self.attn.keys_values(memory)
        reads = mask.any(-1, keepdim=True)  # (B, 1, T, 1): tokens that read some memory
        safe = mask | ~reads  # a token that reads nothing attends everything, then is zeroed (SDPA: no NaN)
        keep = reads[:, 0].to(x.dtype)  # (B, T, 1)
        x = x + self.attn_gate.tanh().to(x.dtype) * keep * self.attn(self.attn_norm(x), k, v, safe)
        return x + self.ffn_gate.tanh().to(x.dtype) * keep * self.ffn(self.ffn_norm(x)), (k, v)
