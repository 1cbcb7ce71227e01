"""What each stage trains, per architecture (paper Tables 10 and 11), and the paper's optimiser settings.

Stage 1 (pretraining): ViT and LLM frozen; D trains the projector ``mlp1``, X the cross-attention layers,
H both. X's one-layer projector is new and feeds only the cross-attention: we count it as part of the
"X-attn" module of Table 10 (a frozen random projector could not align anything). Stage 2 (SFT): the ViT
stays frozen, everything else trains.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nvlm.models.nvlm import NVLMModel

TRAINABLE = {
    ("D", 1): ("mlp1.",),
    ("X", 1): ("xattn_layers.", "mlp1."),
    ("H", 1): ("xattn_layers.", "mlp1."),
    ("D", 2): ("mlp1.", "language_model."),
    ("X", 2): ("xattn_layers.", "mlp1.", "language_model."),
    ("H", 2): ("xattn_layers.", "mlp1.", "language_model."),
}

# Paper Tables 10 (stage 1) and 11 (stage 2), 72B column: the recipe defaults.
PAPER = {
    ("D", 1): dict(
        lr=1e-4,
        min_lr=2.5e-5,
        warmup_steps=500,
        betas=(0.9, 0.95),
        weight_decay=0.1,
        grad_clip=10.0,
        seq_len=512,
        max_tiles=1,
        global_batch=2048,
        steps=20_000,
    ),
    ("X", 1): dict(
        lr=1e-4,
        min_lr=1e-5,
        warmup_steps=1000,
        betas=(0.9, 0.95),
        weight_decay=0.05,
        grad_clip=1.0,
        seq_len=512,
        max_tiles=1,
        global_batch=2048,
        steps=20_000,
    ),
    ("H", 1): dict(
        lr=1e-4,
        min_lr=1e-5,
        warmup_steps=1000,
        betas=(0.9, 0.98),
        weight_decay=0.05,
        grad_clip=1.0,
        seq_len=512,
        max_tiles=6,
        global_batch=2048,
        steps=20_000,
    ),
    ("D", 2): dict(
        lr=2e-6,
        min_lr=2.5e-7,
        warmup_steps=1000,
        betas=(0.9, 0.98),
        weight_decay=0.1,
        grad_clip=10.0,
        seq_len=3200,
        max_tiles=6,
        global_batch=128,
        steps=40_000,
    ),
    ("X", 2): dict(
        lr=1e-5,
        min_lr=1e-7,
        warmup_steps=500,
        betas=(0.9, 0.98),
        weight_decay=0.05,
        grad_clip=1.0,
        seq_len=1024,
        max_tiles=6,
        global_batch=256,
        steps=20_000,
    ),
    ("H", 2): dict(
        lr=1e-5,
        min_lr=1e-7,
        warmup_steps=1000,
        betas=(0.9, 0.98),
        weight_decay=0.05,
        grad_clip=1.0,
        seq_len=1280,
        max_tiles=6,
        global_batch=256,
        steps=40_000,
    ),
}


def set_trainable(model: NVLMModel, stage: int, prefixes: Sequence[str] | None = None) -> list[str]:
    """Freeze everything but the stage's modules (or the parameters named from ``prefixes``); return the
    names of the trainable parameters."""
    key = (model.config.arch, stage)
    if key not in TRAINABLE:
        raise ValueError(f"stage must be 1 or 2, not {stage!r}")
    prefixes = tuple(prefixes) if prefixes is not None else TRAINABLE[key]
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefixes))
        if p.requires_grad:
            names.append(name)
    if not names:
        raise ValueError(f"no parameter name starts with {', '.join(prefixes)}: nothing would train")
    return names
