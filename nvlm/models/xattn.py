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

from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from nvlm.config import CrossAttentionConfig, LLMConfig
from nvlm.models.llm import MLP, Documents
from nvlm.models.vision import RMSNorm

Block = tuple[int, int, int, int]  # tokens [s, e) of a row read only memory [m0, m1) of it (m0 == m1: none)


def memory_blocks(docs: Documents, mask: torch.Tensor) -> tuple[tuple[Block, ...], ...] | None:
    """Each document's tokens and the memory span they read, from the rows' runs and the (B, 1, T, M)
    cross-attention mask: a packed row's examples read their own crops only, so the cross-attention of a
    row is one small block per example instead of T x M. None where two documents' spans overlap, or where
    no token reads any memory (a sharded rank's blank memory): the full mask then runs the block's keys and
    values, so that every rank has their gradients to reduce."""
    reads = mask[:, 0].cpu()  # (B, T, M)
    rows = []
    for b, runs in enumerate(docs.runs):
        blocks = []
        for s, e, _ in runs:
            cols = torch.nonzero(reads[b, s:e].any(0)).squeeze(1).tolist()
            m0, m1 = (cols[0], cols[-1] + 1) if cols else (0, 0)
            blocks.append((s, e, m0, m1))
        spans = sorted((m0, m1) for _, _, m0, m1 in blocks if m1 > m0)
        if any(a[1] > c[0] for a, c in pairwise(spans)):
            return None
        rows.append(tuple(blocks))
    if all(m1 == m0 for row in rows for _, _, m0, m1 in row):
        return None
    return tuple(rows)


@torch.compiler.disable  # its loop follows each batch's documents: under torch.compile a graph break, not a recompile
def blockwise_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, blocks: tuple[tuple[Block, ...], ...]
) -> torch.Tensor:
    """Masked attention block by block: q (B, H, T, D), k and v (B, Hkv, M, D), mask (B, 1, T, M) -> (B, H, T, D),
    zero for tokens that read no memory. Rows and memory are split (one ``cat`` in the backward), not sliced."""
    gqa = q.shape[1] != k.shape[1]
    m = k.shape[2]
    rows = []
    for row, qr, kr, vr, mr in zip(blocks, q.unbind(0), k.unbind(0), v.unbind(0), mask.unbind(0), strict=True):
        cuts = sorted({0, m} | {x for _, _, m0, m1 in row if m1 > m0 for x in (m0, m1)})
        sizes = [c - a for a, c in pairwise(cuts)]
        piece = {a: i for i, a in enumerate(cuts[:-1])}
        ks, vs = kr.split(sizes, 1), vr.split(sizes, 1)
        out = []
        for (s, e, m0, m1), qd in zip(row, qr.split([e - s for s, e, _, _ in row], 1), strict=True):
            if m1 == m0:
                out.append(torch.zeros_like(qd))
                continue
            j = piece[m0]
            attn_mask = mr[:, s:e, m0:m1][None]
            out.append(F.scaled_dot_product_attention(qd[None], ks[j][None], vs[j][None], attn_mask, enable_gqa=gqa)[0])
        rows.append(torch.cat(out, dim=1))
    return torch.stack(rows)


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

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C)
        k: torch.Tensor,  # (B, Hkv, M, D), and v
        v: torch.Tensor,
        mask: torch.Tensor,  # (B, 1, T, M) with no all-False row
        blocks: tuple[tuple[Block, ...], ...] | None = None,  # each document's block of the mask (``memory_blocks``)
    ) -> torch.Tensor:  # (B, T, C)
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        if blocks is not None:
            out = blockwise_attention(q, k, v, mask, blocks)
        else:
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
        blocks: tuple[tuple[Block, ...], ...] | None = None,  # packed rows: each document's block of ``mask``
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """-> the new hidden states (B, T, C) and the keys/values (B, Hkv, M, D), kept by a generation cache.

        The keys and values are computed here, inside the block's ``forward``, so that a sharded (FSDP2) or
        checkpointed block has its weights gathered whenever they are used."""
        k, v = kv if kv is not None else self.attn.keys_values(memory)
        reads = mask.any(-1, keepdim=True)  # (B, 1, T, 1): tokens that read some memory
        safe = mask | ~reads  # a token that reads nothing attends everything, then is zeroed (SDPA: no NaN)
        keep = reads[:, 0].to(x.dtype)  # (B, T, 1)
        x = x + self.attn_gate.tanh().to(x.dtype) * keep * self.attn(self.attn_norm(x), k, v, safe, blocks)
        return x + self.ffn_gate.tanh().to(x.dtype) * keep * self.ffn(self.ffn_norm(x)), (k, v)
