"""NVLM-D, -X and -H: one vision path, three ways for the LLM to read it.

``mlp1(pixel_shuffle(InternViT(crops)))`` gives 256 tokens per crop (spec sections 2-4). Then:
- NVLM-D: the tokens of every crop replace, in order, the ``<|vision_pad|>`` positions of the prompt and
  the LLM runs over the whole sequence with ordinary 1-D positions.
- NVLM-X: every crop goes into the cross-attention memory; the decoder sequence holds only text, the tile
  tags included, and gated cross-attention blocks (``xattn_layers``) read the memory (section 5).
- NVLM-H: the thumbnail goes into the sequence as in NVLM-D; the regular tiles, each preceded by the
  embeddings of its ``<tile_k>`` tag, go into the cross-attention memory (section 6).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from nvlm.arch import Architecture
from nvlm.config import NVLMConfig
from nvlm.models.cache import KVCache, Memory, assemble_memory
from nvlm.models.llm import Documents, LanguageModel, attention_mask_4d, documents, position_ids_from_mask
from nvlm.models.projector import Projector, pixel_shuffle
from nvlm.models.vision import InternViT
from nvlm.models.xattn import Block, GatedCrossAttentionBlock, memory_blocks


class ImageTokenMismatch(ValueError):
    """The prompt's image placeholder tokens and the image features differ in number."""


@dataclass
class NVLMOutput:
    logits: torch.Tensor  # (B, T, vocab)


class NVLMModel(nn.Module):
    """The network: the vision path, the LLM and (X, H) the cross-attention blocks, under the released
    checkpoint's module names. Its public face, with ``from_pretrained`` and ``generate``, is ``nvlm.NVLM``
    (``nvlm.pretrained``), a subclass; this module imports nothing above the model."""

    def __init__(self, config: NVLMConfig) -> None:
        super().__init__()
        self.config = config.validate()
        self.vision_model = InternViT(config.vision, config.select_layer)
        self.mlp1 = Projector(config.projector)
        self.language_model = LanguageModel(config.llm)
        if config.architecture.cross_attention:
            blocks = config.xattn.layer_indices()
            self.xattn_layers = nn.ModuleList(GatedCrossAttentionBlock(config.llm, config.xattn) for _ in blocks)
            self._block_before = {layer: i for i, layer in enumerate(blocks)}  # decoder layer -> block
        # Training under FSDP2: every rank must run every sharded module in every step, or the ranks' gathers
        # fall out of step. Then a batch without images runs the vision path on one blank crop whose result
        # nothing reads (NVLM-D: weighted by zero; X/H: a memory no token attends), and NVLM-H's thumbnails
        # and tiles go through the ViT together in one pass (as they always do).
        self.run_every_module = False

    @property
    def architecture(self) -> Architecture:
        """What this model's architecture does with an image (``nvlm.arch``)."""
        return self.config.architecture

    @property
    def device(self) -> torch.device:
        return self.language_model.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.model.embed_tokens.weight.dtype

    def extract_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N crops, 3, S, S) -> (N, tokens_per_tile, LLM width)."""
        dev = self.vision_model.embeddings.patch_embedding.weight.device
        x = self.vision_model(pixel_values.to(dev))  # (N, P, C_vit)
        x = pixel_shuffle(x, self.config.downsample_ratio)  # (N, P/4, 4 C_vit)
        first = next(self.mlp1.parameters())  # the projector's input norm's weight
        return self.mlp1(x.to(first.device, first.dtype))

    def embed(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, feats: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token embeddings with the image features (of ``pixel_values``, or given) scattered into the
        image-token positions."""
        input_ids = input_ids.to(self.device)
        embeds = self.language_model.embed(input_ids)  # (B, T, C)
        slots = input_ids == self.config.image_token_id
        n_slots = int(slots.sum())
        if feats is None and pixel_values is not None:
            feats = self.extract_features(pixel_values)  # (N, tokens_per_tile, C)
        if feats is None:
            if n_slots:
                raise ImageTokenMismatch(f"the prompt has {n_slots} image tokens but no pixel_values were given")
            return embeds
        if n_slots != feats.shape[0] * feats.shape[1]:
            raise ImageTokenMismatch(
                f"the prompt has {n_slots} image tokens ({self.config.image_token!r}) but {feats.shape[0]} crops "
                f"give {feats.shape[0] * feats.shape[1]} features ({feats.shape[1]} per crop)"
            )
        return embeds.masked_scatter(slots[..., None], feats.to(embeds.device, embeds.dtype))

    def image_features(
        self, pixel_values: torch.Tensor | None, memory_pixel_values: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One ViT pass over every crop of the batch -> (the sequence's crops' features, the memory's)."""
        parts = [p for p in (pixel_values, memory_pixel_values) if p is not None]
        if not parts:
            return None, None
        feats = self.extract_features(torch.cat(parts) if len(parts) > 1 else parts[0])  # (N, 256, C)
        n = 0 if pixel_values is None else pixel_values.shape[0]
        return (feats[:n] if pixel_values is not None else None), (
            feats[n:] if memory_pixel_values is not None else None
        )

    def _blank_crop(self) -> torch.Tensor:  # (1, 3, S, S)
        size = self.config.vision.image_size
        return torch.zeros(1, 3, size, size, device=self.vision_model.embeddings.patch_embedding.weight.device)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        pixel_values: torch.Tensor | None = None,  # (N crops, 3, S, S)
        attention_mask: torch.Tensor | None = None,  # (B, T), or (B, S) over cached + new tokens
        position_ids: torch.Tensor | None = None,  # (B, T)
        cache: KVCache | None = None,
        num_logits_to_keep: int = 0,
        memory_pixel_values: torch.Tensor | None = None,  # X/H: (N_mem, 3, S, S) crops read by cross-attention
        memory_crops: torch.Tensor | None = None,  # X/H: (B,) memory crops per row, rows in order
        cross_attention_mask: torch.Tensor | None = None,  # X/H: (B, T, K) bool, token t reads crop k
        memory_tag_ids: torch.Tensor | None = None,  # H: (N_mem, L_tag) tag token ids, -1 = padding
        logits_at: torch.Tensor | None = None,  # (B, T) bool: logits (N, vocab) at these positions only
    ) -> NVLMOutput:
        b, t = input_ids.shape
        arch = self.architecture
        if not arch.sequence_images and pixel_values is not None:
            raise ImageTokenMismatch("NVLM-X puts no image in its sequence: pass crops as memory_pixel_values")
        blank = self.run_every_module and cache is None
        if blank and arch.cross_attention and memory_pixel_values is None:  # X/H: a memory no token reads
            memory_pixel_values, memory_crops = self._blank_crop(), torch.tensor([1] + [0] * (b - 1))
            memory_tag_ids = torch.full((1, 1), -1) if arch.tags_in_memory else None
            cross_attention_mask = torch.zeros(b, t, 1, dtype=torch.bool)
        if blank and not arch.cross_attention and pixel_values is None:  # D: features weighted by zero
            seq_feats, mem_feats = None, None
            unread = self.extract_features(self._blank_crop())  # first, as with images: FSDP2 gathers in call order
            embeds = self.embed(input_ids) + 0 * unread.sum().to(self.device)
        else:
            seq_feats, mem_feats = self.image_features(pixel_values, memory_pixel_values)
            embeds = self.embed(input_ids, feats=seq_feats)
        if attention_mask is None and cache is None:
            mask: torch.Tensor | Documents | None = None  # plain causal attention
            if position_ids is None:
                position_ids = torch.arange(t, device=embeds.device).expand(b, t)
        else:
            if attention_mask is None:
                past = cache.length if cache is not None else 0
                attention_mask = torch.ones(b, past + t, device=embeds.device)
            attention_mask = attention_mask.to(embeds.device)
            docs = documents(attention_mask) if cache is None else None  # training, scoring: no cache
            mask = docs.to(embeds.device) if docs is not None else attention_mask_4d(attention_mask, t)
            if position_ids is None:
                position_ids = position_ids_from_mask(attention_mask)[:, -t:]
        cross_attend = None
        if arch.cross_attention:
            memory = self.memory(mem_feats, memory_crops, memory_tag_ids, cache)
            if memory is not None:
                if cross_attention_mask is None and (cache is None or mem_feats is not None):
                    raise ValueError("memory_pixel_values need a cross_attention_mask (the processor makes one)")
                xmask = memory.attention_mask(cross_attention_mask, t)
                blocks = memory_blocks(mask, xmask) if isinstance(mask, Documents) else None
                cross_attend = partial(self._before_layer, memory, xmask, blocks)
        logits = self.language_model(embeds, position_ids, mask, cache, num_logits_to_keep, cross_attend, logits_at)
        return NVLMOutput(logits=logits)

    # ------------------------------------------------------------------------- cross-attention (X, H)

    def memory(
        self,
        feats: torch.Tensor | None,  # (N_mem, 256, C) the memory crops' features
        memory_crops: torch.Tensor | None,
        memory_tag_ids: torch.Tensor | None,
        cache: KVCache | None = None,
    ) -> Memory | None:
        """The batch's cross-attention memory: built from the crops' features (kept in the cache), or the cached one."""
        if feats is None:
            return cache.memory if cache is not None else None
        if memory_crops is None:
            raise ValueError("memory_pixel_values need memory_crops (the number of memory crops of each row)")
        valid = torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
        if self.architecture.tags_in_memory:  # each tile is preceded by its tag's text embeddings
            if memory_tag_ids is None:
                raise ValueError("NVLM-H needs memory_tag_ids (each tile's tag tokens) with memory_pixel_values")
            tags = memory_tag_ids.to(self.device)
            tag_embeds = self.language_model.embed(tags.clamp(min=0)).to(feats.device, feats.dtype)
            feats = torch.cat([tag_embeds, feats], dim=1)  # (N, L_tag + 256, C)
            valid = torch.cat([tags.to(valid.device) >= 0, valid], dim=1)
        memory = assemble_memory(feats, valid, memory_crops)
        if cache is not None and memory is not None:
            memory.keep_kv = True
            cache.memory = memory
        return memory

    def _before_layer(
        self,
        memory: Memory,
        mask: torch.Tensor,
        blocks: tuple[tuple[Block, ...], ...] | None,
        layer: int,
        x: torch.Tensor,
    ) -> torch.Tensor:
        """The hook the decoder calls before each layer: the cross-attention block placed there, if any."""
        i = self._block_before.get(layer)
        return x if i is None else self.cross_attend(i, x, memory, mask, blocks)

    def cross_attend(
        self,
        i: int,
        x: torch.Tensor,
        memory: Memory,
        mask: torch.Tensor,
        blocks: tuple[tuple[Block, ...], ...] | None = None,
    ) -> torch.Tensor:
        """Block i on hidden states x (B, T, C); a generation cache keeps its keys and values of the memory."""
        block = self.xattn_layers[i]
        assert isinstance(block, GatedCrossAttentionBlock)  # xattn_layers holds only these
        device = block.attn_norm.weight.device
        x, (k, v) = block(x.to(device), memory.embeds.to(device), mask.to(device), memory.kv.get(i), blocks)
        if memory.keep_kv:
            memory.kv[i] = (k, v)
        return x
