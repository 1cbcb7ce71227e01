"""InternViT as NVLM uses it (InternViT-6B-448px-V1-5).

Patch conv with bias, a class token and absolute positions; pre-norm blocks with RMSNorm, QK-norm over
the whole width (all heads at once, not per head) and per-channel layer scale; no final norm. NVLM reads
the output of ``select_layer`` and drops the class token. Module and parameter names follow the released
checkpoint (``vision_model.*``). The released weights pad attention with 7 all-zero dummy heads; this
module holds only the real heads: ``nvlm.checkpoint`` strips and re-adds the padding.
Spec: NVLM_SPEC.md section 2.2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nvlm.config import VisionConfig


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, as InternViT and Qwen2 both do."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.hidden_size))

    def reset_parameters(self) -> None:  # the class token and positions start at zero (the patch conv has its own)
        nn.init.zeros_(self.class_embedding)
        nn.init.zeros_(self.position_embedding)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (N, 3, S, S) -> (N, 1 + P, C)
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (N, C, S/p, S/p)
        x = x.flatten(2).transpose(1, 2)  # (N, P, C), patches row-major
        cls = self.class_embedding.expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        width = cfg.hidden_size
        self.qkv = nn.Linear(width, 3 * width, bias=cfg.qkv_bias)  # rows laid out [q | k | v][head][head_dim]
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(width, cfg.norm_eps)
            self.k_norm = RMSNorm(width, cfg.norm_eps)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, L, C)
        n, length, width = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # each (N, L, C)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)  # over the whole width, all heads together
        q, k, v = (t.view(n, length, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # (N, H, L, D), not causal
        return self.proj(out.transpose(1, 2).reshape(n, length, width))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionBlock(nn.Module):
    """x += ls1 * Attn(norm1(x)); x += ls2 * MLP(norm2(x))."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = VisionAttention(cfg)
        self.ls1 = nn.Parameter(torch.full((cfg.hidden_size,), cfg.layer_scale_init))
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = VisionMLP(cfg)
        self.ls2 = nn.Parameter(torch.full((cfg.hidden_size,), cfg.layer_scale_init))
        self.layer_scale_init = cfg.layer_scale_init

    def reset_parameters(self) -> None:  # the layer scales only (the norms, attention and MLP have their own)
        nn.init.constant_(self.ls1, self.layer_scale_init)
        nn.init.constant_(self.ls2, self.layer_scale_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_layers))


class InternViT(nn.Module):
    def __init__(self, cfg: VisionConfig, select_layer: int = -1) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionEncoder(cfg)
        # hidden_states[select_layer] in HF terms, where index 0 is the embeddings: run only what is read.
        self.num_layers_run = select_layer if select_layer >= 0 else cfg.num_layers + 1 + select_layer

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (N, 3, S, S) -> (N, P, C)
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers[: self.num_layers_run]:
            x = layer(x)
        return x[:, 1:]  # drop the class token
