"""One process or many under ``torchrun``: process group, device, and the FSDP2 sharding plan.

FSDP2 (``fully_shard``) wraps every decoder layer, every ViT layer and every cross-attention block, then
the whole model; frozen and trainable parameters sit side by side in one unit (FSDP2 shards per
parameter). Without FSDP the ranks hold whole copies and average their gradients (plain data parallelism).
FSDP2 runs on CPU with the gloo backend too, which is how the tests drive it.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint


def setup(device: str | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device); starts the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() and device != "cpu" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return rank, world, dev


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks: the units of sharding and of activation checkpointing."""
    out = list(model.vision_model.encoder.layers) + list(model.language_model.model.layers)
    return out + list(getattr(model, "xattn_layers", []))


def shard(model: nn.Module) -> None:
    """FSDP2: one unit per block, then the root (the embeddings, projector, norms and head)."""
    from torch.distributed.fsdp import fully_shard

    for block in blocks(model):
        fully_shard(block)
    fully_shard(model)


def average_gradients(params: list[nn.Parameter]) -> None:
    """Plain data parallelism: every rank ends with the mean of the ranks' gradients."""
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def checkpoint_activations(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them."""
    for block in blocks(model):
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def all_sum(x: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t)
