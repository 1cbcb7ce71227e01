"""Training checkpoints through ``torch.distributed.checkpoint`` (DCP): every rank writes its own part.

``step_00001234/`` holds one safetensors file per rank (``shard-0000r-model-00001-of-00001.safetensors``,
DCP's Hugging Face storage: each file carries its shards' offsets in its JSON header, so nothing is ever
unpickled) with that rank's rows of the trained parameters (``model.*``; frozen ones come back from the
starting point) and of AdamW's moments (``optim.<param>.exp_avg`` ...); ``rank_0000r.json`` with that rank's
RNG states and data-stream position; ``state.json`` (rank 0: step, optimiser hyper-parameters, world size,
the run's settings). Nothing is gathered. Every rank writes into ``step_….tmp/`` and syncs its files; after
a barrier rank 0 writes ``state.json`` and renames the directory into place, so a checkpoint is visible only
once every rank's part is complete: a run killed at any moment resumes from the last complete one. The
oldest are removed beyond ``keep_last``.

Resuming on another world size reshards: DCP reads each rank's rows of every tensor from whatever files hold
them, so parameters and optimiser state come back bit for bit; the data positions follow
``nvlm.data.loader.reshard``.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict, set_optimizer_state_dict

PREFIX = "step_"


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint directory under ``root``."""
    done = sorted(p for p in root.glob(f"{PREFIX}*") if p.is_dir() and not p.name.endswith(".tmp"))
    return done[-1] if done else None


def _tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The flat tensor state DCP saves and loads in place (DTensors under FSDP2), and the optimiser's groups."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    flat = {f"model.{k}": v for k, v in get_model_state_dict(model).items() if k in trainable}
    osd = get_optimizer_state_dict(model, optimizer)  # creates AdamW's state on a fresh optimiser
    for name, values in osd["state"].items():
        for key, value in values.items():
            flat[f"optim.{name}.{key}"] = value
    return flat, osd


def save(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         rank_state: dict[str, Any], extra: dict[str, Any], keep_last: int) -> Path:  # fmt: skip
    """Write checkpoint ``step``; collective: every rank calls it with its own ``rank_state`` (data position)."""
    rank, world = _rank_world()
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f"{final.name}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    flat, osd = _tensors(model, optimizer)
    with warnings.catch_warnings():  # one process: DCP says it assumes so
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.save(flat, storage_writer=HuggingFaceStorageWriter(str(tmp), save_distributed=True), no_dist=world == 1)
    _write_synced(tmp / f"rank_{rank:05d}.json", {"rng": _rng_state(), **rank_state})
    _barrier()
    if rank == 0:
        groups = [{k: v for k, v in g.items() if k != "params"} for g in osd["param_groups"]]
        _write_synced(tmp / "state.json", {"step": step, "world_size": world, "param_groups": groups, **extra})
        _fsync_dir(tmp)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in sorted(p for p in root.glob(f"{PREFIX}*") if p.is_dir() and not p.name.endswith(".tmp"))[:-keep_last]:
            shutil.rmtree(old)
    _barrier()
    return final


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Restore the trained parameters, AdamW's state and this rank's RNG from ``path``; return ``state.json``
    and every saved rank's state (its data position), in rank order."""
    rank, world = _rank_world()
    state = json.loads((path / "state.json").read_text())
    flat, osd = _tensors(model, optimizer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(path)), no_dist=world == 1)
    for name, values in osd["state"].items():
        for key in values:
            values[key] = flat[f"optim.{name}.{key}"]
    for group, saved in zip(osd["param_groups"], state["param_groups"]):
        group.update({k: tuple(v) if k == "betas" else v for k, v in saved.items()})
    set_optimizer_state_dict(model, optimizer, osd)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for key, value in flat.items():
            if key.startswith("model."):
                params[key.removeprefix("model.")].copy_(value)
    ranks = [json.loads((path / f"rank_{r:05d}.json").read_text()) for r in range(int(state["world_size"]))]
    _set_rng_state(ranks[rank]["rng"] if rank < len(ranks) else None)
    return state, ranks


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _write_synced(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(data, indent=1))
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rng_state() -> dict[str, str]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return {k: base64.b64encode(v.numpy().tobytes()).decode() for k, v in states.items()}


def _set_rng_state(states: dict[str, str] | None) -> None:
    """This rank's saved generators; a rank the checkpoint did not have keeps its seeded ones."""
    if states is None:
        return
    decoded = {k: torch.frombuffer(bytearray(base64.b64decode(v)), dtype=torch.uint8) for k, v in states.items()}
    torch.set_rng_state(decoded["cpu"])
    if torch.cuda.is_available() and "cuda" in decoded:
        torch.cuda.set_rng_state(decoded["cuda"])
