"""Sharded safetensors written as the tensors are made: only the tensors being written are ever held.

The shapes and dtypes are known before any data is read (from the rank files' pickles), so each shard's header
is written first and every tensor's bytes follow as soon as they are merged. The files are those of
``nvlm.checkpoint.save_pretrained``: ``model-0000k-of-0000n.safetensors`` (``model.safetensors`` when one) and
``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from nvlm.checkpoint import INDEX_FILE, SINGLE_FILE

DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}

# A group: the (name, shape, dtype) of the tensors one producer makes, and the producer.
Group = tuple[Sequence[tuple[str, tuple[int, ...], torch.dtype]], Callable[[], Sequence[torch.Tensor]]]


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


def write_sharded(groups: Sequence[Group], path: Path, max_shard_size: int) -> None:
    """Write the groups' tensors in order into shards of at most ``max_shard_size`` bytes (a group is never
    split across shards), then the index. A producer's tensors must have the announced shapes and dtypes."""
    shards: list[list[Group]] = [[]]
    size = 0
    for g in groups:
        n = sum(_nbytes(s, d) for _, s, d in g[0])
        if shards[-1] and size + n > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(g)
        size += n
    weight_map: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(shards, start=1):
        fname = SINGLE_FILE if len(shards) == 1 else f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for specs, _ in shard:
            for name, shape, dtype in specs:
                n = _nbytes(shape, dtype)
                header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
                offset += n
                weight_map[name] = fname
        total += offset
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(path / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for specs, make in shard:
                tensors = make()
                for (name, shape, dtype), t in zip(specs, tensors, strict=True):
                    if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                        raise ValueError(f"{name}: made {tuple(t.shape)} {t.dtype}, announced {shape} {dtype}")
                    f.write(t.contiguous().view(-1).view(torch.uint8).numpy().data)
                del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
