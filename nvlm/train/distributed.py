"""One process or many under ``torchrun``: process group, device mesh, and the plan that spreads a model.

``parallelize`` is applied to a model on the meta device, before any weight exists (torchtitan's order):
activation checkpointing, then ``torch.compile`` per block, then FSDP2. FSDP2 units: every ViT layer, every
decoder layer, every cross-attention block, the projector, the token embeddings, the final norm with the LM
head, then the root (the ViT's patch and position embeddings). FSDP2 shards per parameter, so frozen and
trained parameters share a unit. On GPU ``MixedPrecisionPolicy`` computes in bf16 and reduces gradients in
fp32 over the fp32 master copies of the trained parameters; on CPU (gloo) everything is fp32. A 2-D mesh
(``shard_size`` < world size) gives HSDP: replicas across groups of ``shard_size`` ranks (a node), shards
within each. Without FSDP the ranks hold whole copies and average their gradients (plain data parallelism).
"""

from __future__ import annotations

import os
import resource
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

if TYPE_CHECKING:
    from nvlm.models.nvlm import NVLMModel


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


def teardown() -> None:
    """End the process group (every rank together): a gloo group left to the interpreter's exit can abort it."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def device_mesh(device: torch.device, shard_size: int | None):
    """The FSDP mesh: 1-D over all ranks, or 2-D (replicate, shard) for HSDP when ``shard_size`` is smaller."""
    world = dist.get_world_size()
    shard = shard_size or world
    if shard < 1 or world % shard:
        raise ValueError(f"shard_size {shard_size} must divide the world size {world}")
    if shard == world:
        return init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    return init_device_mesh(device.type, (world // shard, shard), mesh_dim_names=("replicate", "shard"))


def blocks(model: NVLMModel) -> list[nn.Module]:
    """The repeated blocks: the units of sharding, activation checkpointing and compilation."""
    out = list(model.vision_model.encoder.layers) + list(model.language_model.model.layers)
    return out + list(getattr(model, "xattn_layers", []))


def parallelize(
    model: NVLMModel, mesh, compute_dtype: torch.dtype | None, activation_checkpointing: bool, compile_blocks: bool
) -> None:
    """Activation checkpointing, ``torch.compile`` per block, then FSDP2 (``mesh`` None: one process, no FSDP)."""
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile_blocks:
        for block in blocks(model):
            block.compile()
    if mesh is None:
        return

    mp = (
        MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        if compute_dtype
        else MixedPrecisionPolicy()
    )
    for unit in units(model):
        fully_shard(unit, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)  # the root: what no unit holds


def units(model: NVLMModel) -> list[list[nn.Module]]:
    """The FSDP2 units below the root, in order: each block, the projector, the token embeddings, and the
    final norm with the LM head (with the embeddings too when they share a weight)."""
    llm = model.language_model
    head = [llm.model.norm, llm.lm_head]
    if llm.config.tie_word_embeddings:
        return [[b] for b in blocks(model)] + [[model.mlp1], [llm.model.embed_tokens, *head]]
    return [[b] for b in blocks(model)] + [[model.mlp1], [llm.model.embed_tokens], head]


def apply_activation_checkpointing(model: NVLMModel) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them (the composable
    ``checkpoint``: module hooks, so names, ``forward`` and FSDP2 units are untouched)."""
    for block in blocks(model):
        checkpoint(block)


def average_gradients(params: list[nn.Parameter]) -> None:
    """Plain data parallelism: every rank ends with the mean of the ranks' gradients."""
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def all_sum(x: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t)


def peak_memory_gib(device: torch.device) -> list[float]:
    """Every rank's peak memory so far, in GiB: ``max_memory_allocated`` on GPU, peak RSS on CPU."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    t = torch.tensor([peak / 2**30], dtype=torch.float64, device=device)
    if not dist.is_initialized():
        return [float(t)]
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [float(x) for x in out]
