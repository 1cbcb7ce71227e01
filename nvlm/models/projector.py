"""Pixel shuffle v2 (1024 -> 256 tokens per tile) and the projector ``mlp1`` (two layers; one for NVLM-X).

Spec: NVLM_SPEC.md sections 2.3 and 2.4.
"""

from __future__ import annotations

import torch
from torch import nn

from nvlm.config import ProjectorConfig


def pixel_shuffle(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """Merge each 2x2 block of patches into one token, as InternVL's ``pixel_shuffle`` (ps_version v2).

    (N, P, C) -> (N, P * ratio^2, C / ratio^2). Output token i*side/2 + j (row-major over blocks) holds,
    in this channel order, patches (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1).
    """
    n, p, c = x.shape
    side = int(p**0.5)
    scale = round(1 / ratio)
    x = x.reshape(n, side, side // scale, c * scale)  # (N, rows, cols/2, 2C): pairs of columns
    x = x.permute(0, 2, 1, 3)  # (N, cols/2, rows, 2C)
    x = x.reshape(n, side // scale, side // scale, c * scale * scale)  # (N, cols/2, rows/2, 4C): pairs of rows
    x = x.permute(0, 2, 1, 3)  # v2: back to (N, rows/2, cols/2, 4C)
    return x.reshape(n, -1, c * scale * scale)


class Projector(nn.Sequential):
    """``mlp1``: LayerNorm -> Linear (no bias) -> GELU -> Linear (no bias); keys 0, 1, 3 as released.

    With one layer (NVLM-X, "1-layer MLP 12800 -> 8192"): LayerNorm -> Linear, keys 0, 1. We keep the
    LayerNorm: the pixel-shuffled ViT features are far from unit scale.
    """

    def __init__(self, cfg: ProjectorConfig) -> None:
        norm = nn.LayerNorm(cfg.input_size, eps=cfg.norm_eps)
        if cfg.num_layers == 1:
            super().__init__(norm, nn.Linear(cfg.input_size, cfg.output_size, bias=False))
        else:
            super().__init__(
                norm,
                nn.Linear(cfg.input_size, cfg.hidden_size, bias=False),
                nn.GELU(),
                nn.Linear(cfg.hidden_size, cfg.output_size, bias=False),
            )
