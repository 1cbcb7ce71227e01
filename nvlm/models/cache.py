"""What generation keeps between steps, and the row operations continuous batching needs.

``KVCache``: every decoder layer's keys and values, one write position shared by the batch's rows (batches
are left-padded and padding is masked out). ``Memory``: NVLM-X/H's cross-attention memory of a batch (the
crops' tokens, which of them are real, and each block's keys and values once computed), kept in the cache
during generation. Both can select rows, and be stacked from several batches, so that rows can join and
leave a running batch (``nvlm.engine``) and each still computes what it would alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# NVLM-X/H's model inputs that make the memory (the processor's names)
MEMORY_INPUTS = ("memory_pixel_values", "memory_crops", "cross_attention_mask", "memory_tag_ids")


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

    def select(self, rows: torch.Tensor) -> Memory:
        """The memory of these batch rows only, block keys and values included."""
        kv = {i: (k[rows], v[rows]) for i, (k, v) in self.kv.items()}
        return Memory(self.embeds[rows], self.key_mask[rows], self.tokens_per_crop, kv, self.keep_kv)

    @staticmethod
    def concat(memories: list[Memory | None], rows: list[int]) -> Memory:
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

        embeds = torch.cat(
            [pad(None if m is None else m.embeds, r, 1, ref.embeds) for m, r in zip(memories, rows, strict=True)]
        )
        key_mask = torch.cat(
            [pad(None if m is None else m.key_mask, r, 1, ref.key_mask) for m, r in zip(memories, rows, strict=True)]
        )
        kv = {}
        for i in blocks:
            ks = [
                pad(None if m is None else m.kv[i][0], r, 2, ref.kv[i][0]) for m, r in zip(memories, rows, strict=True)
            ]
            vs = [
                pad(None if m is None else m.kv[i][1], r, 2, ref.kv[i][1]) for m, r in zip(memories, rows, strict=True)
            ]
            kv[i] = (torch.cat(ks), torch.cat(vs))
        return Memory(embeds, key_mask, ref.tokens_per_crop, kv, ref.keep_kv)

    def attention_mask(self, cross_attention_mask: torch.Tensor | None, num_new: int) -> torch.Tensor:
        """(B, T, K) crops each new token reads (None: all its row's crops) -> (B, 1, T, K * L) bool."""
        crops = self.crop_mask
        if cross_attention_mask is None:
            cross_attention_mask = crops[:, None, :].expand(-1, num_new, -1)
        elif cross_attention_mask.shape != (crops.shape[0], num_new, crops.shape[1]):
            raise ValueError(
                f"cross_attention_mask has shape {tuple(cross_attention_mask.shape)}; the batch needs "
                f"(B, T, K) = {(crops.shape[0], num_new, crops.shape[1])}"
            )
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


class KVCache:
    """Keys and values of every layer, preallocated to ``max_len`` on first use.

    All rows of a batch share one write position: batches are left-padded, and padding is masked out.
    """

    def __init__(self, num_layers: int, max_len: int) -> None:
        self.max_len = max_len
        self.length = 0  # positions filled so far
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.memory: Memory | None = None  # NVLM-X/H: the cross-attention memory, its K/V computed at prefill

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, H_kv, T, D) at the current position; return everything cached so far for this layer."""
        b, h, t, d = k.shape
        if self.length + t > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {self.length} + {t} do not fit")
        keys, values = self.k[layer], self.v[layer]
        if keys is None or values is None:
            keys = self.k[layer] = k.new_zeros(b, h, self.max_len, d)
            values = self.v[layer] = v.new_zeros(b, h, self.max_len, d)
        end = self.length + t
        keys[:, :, self.length : end] = k
        values[:, :, self.length : end] = v
        return keys[:, :, :end], values[:, :, :end]

    def advance(self, t: int) -> None:
        self.length += t

    # ------------------------------------------------------------- row operations (continuous batching)

    @property
    def rows(self) -> int:
        k = next((k for k in self.k if k is not None), None)
        return 0 if k is None else k.shape[0]

    def select(self, rows: torch.Tensor) -> KVCache:
        """A cache of only these batch rows, in this order (the cross-attention memory too)."""
        out = KVCache(len(self.k), self.max_len)
        out.length = self.length
        out.k = [None if k is None else k[rows] for k in self.k]
        out.v = [None if v is None else v[rows] for v in self.v]
        out.memory = None if self.memory is None else self.memory.select(rows)
        return out

    def realign(self, length: int, max_len: int) -> KVCache:
        """The same rows right-aligned at ``length`` positions (left-padded with zeros, or their oldest
        columns dropped), in a buffer of ``max_len``. Padding columns must be masked out by the caller."""
        out = KVCache(len(self.k), max_len)
        out.length, out.memory = length, self.memory
        keep = min(length, self.length)
        for i, (k, v) in enumerate(zip(self.k, self.v, strict=True)):
            if k is None or v is None:
                continue
            keys = out.k[i] = k.new_zeros(k.shape[0], k.shape[1], max_len, k.shape[3])
            values = out.v[i] = v.new_zeros(v.shape[0], v.shape[1], max_len, v.shape[3])
            keys[:, :, length - keep : length] = k[:, :, self.length - keep : self.length]
            values[:, :, length - keep : length] = v[:, :, self.length - keep : self.length]
        return out

    @staticmethod
    def concat(caches: list[KVCache], max_len: int) -> KVCache:
        """Stack the rows of several caches, right-aligned at the longest one's length."""
        caches = [c for c in caches if c.rows]
        length = max(c.length for c in caches)
        aligned = [c.realign(length, max_len) for c in caches]
        out = KVCache(len(caches[0].k), max_len)
        out.length = length
        out.k = [torch.cat([_written(c.k[i]) for c in aligned]) for i in range(len(out.k))]
        out.v = [torch.cat([_written(c.v[i]) for c in aligned]) for i in range(len(out.v))]
        if any(c.memory is not None for c in caches):
            out.memory = Memory.concat([c.memory for c in caches], [c.rows for c in caches])
        return out


def _written(t: torch.Tensor | None) -> torch.Tensor:
    """A layer's keys or values of a cache with rows: every forward writes every layer."""
    if t is None:
        raise ValueError("a KV cache with rows has a layer that was never written")
    return t
