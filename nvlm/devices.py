"""Placing a model on one device or across several GPUs, the way the NVLM-D-72B card's ``split_model`` does,
and the host allocator setting that returns freed tensor memory.

The card puts the ViT, the projector, the embeddings, the final norm, the LM head and the last decoder
layer on GPU 0 and counts GPU 0 as half a GPU when spreading the decoder layers. Decoder layers move
their input to their own device, so a model split this way runs as one.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable
from typing import Any, Protocol

import torch

from nvlm.config import NVLMConfig

DeviceMap = dict[str, Any]  # module-name prefix -> device (int = CUDA ordinal, or str / torch.device)
DeviceLookup = Callable[[str], torch.device]  # parameter name -> its device


class HasConfig(Protocol):
    """A model as placement reads it: its config (the number of decoder layers, the cross-attention blocks)."""

    config: NVLMConfig


def split_model(num_layers: int, num_gpus: int) -> DeviceMap:
    """The card's ``split_model`` for ``num_layers`` decoder layers over ``num_gpus`` GPUs."""
    if num_gpus < 1:
        raise ValueError("split_model needs at least one GPU")
    per_gpu = math.ceil(num_layers / (num_gpus - 0.5)) if num_gpus > 1 else num_layers
    counts = [per_gpu] * num_gpus
    counts[0] = math.ceil(per_gpu * 0.5) if num_gpus > 1 else num_layers
    device_map: DeviceMap = {}
    layer = 0
    for gpu, count in enumerate(counts):
        for _ in range(count):
            if layer < num_layers:
                device_map[f"language_model.model.layers.{layer}"] = gpu
            layer += 1
    for name in (
        "vision_model",
        "mlp1",
        "language_model.model.embed_tokens",
        "language_model.model.norm",
        "language_model.lm_head",
        f"language_model.model.layers.{num_layers - 1}",
    ):
        device_map[name] = 0
    return device_map


def _as_device(d: Any) -> torch.device:
    return torch.device("cuda", d) if isinstance(d, int) else torch.device(d)


def resolve_device_map(model: HasConfig, device: str | torch.device | DeviceMap | None) -> DeviceLookup:
    """A function from parameter name to its device.

    ``None``/"cpu": everything on the CPU. A device: everything there. "auto": split across all visible
    GPUs with ``split_model`` (one GPU: everything on it; none: the CPU). A dict: longest matching prefix.
    """
    if device == "auto":
        n = torch.cuda.device_count()
        device = split_model(model.config.llm.num_layers, n) if n > 1 else ("cuda:0" if n else "cpu")
    if not isinstance(device, dict):
        single = _as_device(device or "cpu")
        return lambda name: single
    entries = sorted(((k, _as_device(v)) for k, v in device.items()), key=lambda kv: -len(kv[0]))
    if model.config.architecture.cross_attention:  # a cross-attention block sits with the decoder layer it precedes
        layer_device = dict(entries)
        for i, layer in enumerate(model.config.xattn.layer_indices()):
            block, home = f"xattn_layers.{i}", f"language_model.model.layers.{layer}"
            if block not in layer_device and home in layer_device:
                entries.append((block, layer_device[home]))
        entries.sort(key=lambda kv: -len(kv[0]))

    def lookup(name: str) -> torch.device:
        for prefix, dev in entries:
            if not prefix or name == prefix or name.startswith(prefix + "."):  # "" places everything
                return dev
        raise ValueError(f"device map places no prefix of {name!r}")

    return lookup


def return_freed_memory() -> None:
    """On CPU, have glibc give freed tensor memory back to the OS. After freeing a large block glibc raises
    its mmap threshold (up to 32 MiB), so later blocks of that size come from the heap and stay resident
    when freed: the gathered FSDP2 units, gradients and activations of every step pile up there (measured:
    about 1 GiB per rank for a 0.4B model). A fixed threshold (glibc's default 128 KiB) stops the climb."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    m_mmap_threshold = -3  # <malloc.h>
    libc.mallopt(m_mmap_threshold, 128 * 1024)
