"""NVLM-D: image tokens in the decoder sequence.

``vit_embeds = mlp1(pixel_shuffle(InternViT(pixel_values)))`` gives 256 tokens per crop; they replace,
in order, the ``<|vision_pad|>`` positions of the prompt, and the LLM runs over the whole sequence with
ordinary 1-D positions. Spec: NVLM_SPEC.md section 4.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from nvlm.config import NVLMConfig
from nvlm.models.llm import KVCache, LanguageModel, attention_mask_4d, position_ids_from_mask
from nvlm.models.projector import Projector, pixel_shuffle
from nvlm.models.vision import InternViT

if TYPE_CHECKING:
    from nvlm.processor import Processor


class ImageTokenMismatch(ValueError):
    """The prompt's image placeholder tokens and the image features differ in number."""


@dataclass
class NVLMOutput:
    logits: torch.Tensor  # (B, T, vocab)


class NVLM(nn.Module):
    def __init__(self, config: NVLMConfig) -> None:
        super().__init__()
        if config.arch != "D":
            raise NotImplementedError(f"NVLM-{config.arch} is not implemented yet; only NVLM-D")
        self.config = config.validate()
        self.vision_model = InternViT(config.vision, config.select_layer)
        self.mlp1 = Projector(config.projector)
        self.language_model = LanguageModel(config.llm)
        self.name_or_path: str | None = None  # the directory it was loaded from, if any

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
        x = x.to(self.mlp1[0].weight.device)
        return self.mlp1(x.to(self.mlp1[0].weight.dtype))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the image features scattered into the image-token positions."""
        input_ids = input_ids.to(self.device)
        embeds = self.language_model.embed(input_ids)  # (B, T, C)
        slots = input_ids == self.config.image_token_id
        n_slots = int(slots.sum())
        if pixel_values is None:
            if n_slots:
                raise ImageTokenMismatch(f"the prompt has {n_slots} image tokens but no pixel_values were given")
            return embeds
        feats = self.extract_features(pixel_values)  # (N, tokens_per_tile, C)
        if n_slots != feats.shape[0] * feats.shape[1]:
            raise ImageTokenMismatch(
                f"the prompt has {n_slots} image tokens ({self.config.image_token!r}) but {feats.shape[0]} crops "
                f"give {feats.shape[0] * feats.shape[1]} features ({feats.shape[1]} per crop)"
            )
        return embeds.masked_scatter(slots[..., None], feats.to(embeds.device, embeds.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        pixel_values: torch.Tensor | None = None,  # (N crops, 3, S, S)
        attention_mask: torch.Tensor | None = None,  # (B, T), or (B, S) over cached + new tokens
        position_ids: torch.Tensor | None = None,  # (B, T)
        cache: KVCache | None = None,
        num_logits_to_keep: int = 0,
    ) -> NVLMOutput:
        embeds = self.embed(input_ids, pixel_values)
        t = input_ids.shape[1]
        if attention_mask is None and cache is None:
            mask = None  # plain causal attention
            if position_ids is None:
                position_ids = torch.arange(t, device=embeds.device).expand(input_ids.shape[0], t)
        else:
            if attention_mask is None:
                attention_mask = torch.ones(input_ids.shape[0], cache.length + t, device=embeds.device)
            attention_mask = attention_mask.to(embeds.device)
            mask = attention_mask_4d(attention_mask, t)
            if position_ids is None:
                position_ids = position_ids_from_mask(attention_mask)[:, -t:]
        logits = self.language_model(embeds, position_ids, mask, cache, num_logits_to_keep)
        return NVLMOutput(logits=logits)

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **sampling: Any,
    ) -> torch.Tensor:
        """New token ids only, (B, n); finished rows are padded. See ``nvlm.generation.generate``."""
        from nvlm.generation import generate

        return generate(self, input_ids, pixel_values, attention_mask, **sampling)

    # ----------------------------------------------------------------------------- checkpoints

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | dict[str, Any] | None = None,
    ) -> "NVLM":
        """Load a directory in the NVLM-D-72B layout (config.json + sharded safetensors)."""
        from nvlm.checkpoint import load_pretrained

        return load_pretrained(path, dtype=dtype, device=device)

    def save_pretrained(self, path: str | Path, processor: "Processor | None" = None, **kwargs: Any) -> None:
        """Write the NVLM-D-72B layout, with the tokenizer and processor files beside it."""
        from nvlm.checkpoint import save_pretrained

        save_pretrained(self, path, processor=processor, **kwargs)
