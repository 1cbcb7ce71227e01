"""Training checkpoints through ``torch.distributed.checkpoint`` (DCP): every rank writes its own part.

``step_00001234/`` holds one safetensors file per rank (``shard-0000r-model-00001-of-00001.safetensors``,
DCP's Hugging Face storage: each file carries its shards' offsets in its JSON header, so nothing is ever
unpickled) with that rank's rows of the trained parameters (``model.*``; frozen ones come back from the
starting point) and of AdamW's moments (``optim.<param>.exp_avg`` ...); ``rank_0000r.json`` with that rank's
RNG states and data-stream position; ``state.json`` (rank 0: step, optimiser hyper-parameters, world size,
the run's settings). Nothing is gathered. Every rank writes into ``step_….tmp/`` and syncs its files; after
a barrier rank 0 writes ``state.json`` and renames the directory into place, so a checkpoint is visible only
once every rank's part is complete: a run killed at any moment resumes from the last complete one. The
oldest are removed beyond ``keep_last``. With ``async_save`` the tensors are copied to CPU memory and
written by a thread during the next steps (DCP's ``async_save``); the checkpoint is committed the same way
before the next save and at the end.

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
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

PREFIX = "step_"


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint directory under ``root``."""
    done = sorted(p for p in root.glob(f"{PREFIX}*") if p.is_dir() and not p.name.endswith(".tmp"))
    return done[-1] if done else None


def _tensors(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The flat tensor state DCP saves and loads in place (DTensors under FSDP2), and the optimiser's groups."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    flat: dict[str, Any] = {f"model.{k}": v for k, v in get_model_state_dict(model).items() if k in trainable}
    osd: Any = get_optimizer_state_dict(model, optimizer)  # creates AdamW's state on a fresh optimiser
    for name, values in osd["state"].items():
        for key, value in values.items():
            flat[f"optim.{name}.{key}"] = value
    return flat, osd


class Pending:
    """A checkpoint whose files are being written in the background (``save(..., background=True)``); it is
    made visible by ``commit``, which every rank calls before the next save and at the end of the run. The
    model, optimiser, RNG and data states are those of the step it was started at."""

    def __init__(
        self,
        tmp: Path,
        final: Path,
        step: int,
        rank_json: dict[str, Any],
        state_json: dict[str, Any],
        keep_last: int,
        future: Any = None,
    ) -> None:
        self.tmp, self.final, self.step, self.keep_last = tmp, final, step, keep_last
        self.rank_json, self.state_json, self.future = rank_json, state_json, future
        self.done = False

    def commit(self) -> Path:
        """Wait for this rank's files, then (after every rank's) make the checkpoint visible: collective; once
        done, a further call returns at once."""
        if self.done:
            return self.final
        if self.future is not None:
            self.future.result()  # raises what the writer thread raised
            self.future = None
        rank, _ = _rank_world()
        _write_synced(self.tmp / f"rank_{rank:05d}.json", self.rank_json)
        _barrier()
        if rank == 0:
            _write_synced(self.tmp / "state.json", self.state_json)
            _fsync_dir(self.tmp)
            os.replace(self.tmp, self.final)
            _fsync_dir(self.final.parent)
            root = self.final.parent
            for old in sorted(p for p in root.glob(f"{PREFIX}*") if p.is_dir() and not p.name.endswith(".tmp"))[
                : -self.keep_last
            ]:
                shutil.rmtree(old)
        _barrier()
        self.done = True
        return self.final


def save(
    root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    rank_state: dict[str, Any],
    extra: dict[str, Any],
    keep_last: int,
    background: Any = None,
) -> Pending:
    """Write checkpoint ``step``; collective: every rank calls it with its own ``rank_state`` (data position).

    Without ``background`` the checkpoint is complete and visible on return (committed). With ``background``
    (a process group of its own, from ``background_group``), DCP's ``async_save`` copies this rank's tensors to
    CPU memory, returns, and writes them from a thread while training goes on; call ``commit()`` on the result
    before the next save. Until then the previous checkpoint is the newest."""
    rank, world = _rank_world()
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f"{final.name}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    flat, osd = _tensors(model, optimizer)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in osd["param_groups"]]
    pending = Pending(
        tmp,
        final,
        step,
        {"rng": _rng_state(), **rank_state},
        {"step": step, "world_size": world, "param_groups": groups, **extra},
        keep_last,
    )
    writer = HuggingFaceStorageWriter(str(tmp), save_distributed=True)
    with warnings.catch_warnings():  # one process: DCP says it assumes so
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        if background is None:
            dcp.save(flat, storage_writer=writer, no_dist=world == 1)
        else:
            pending.future = dcp.async_save(
                flat, storage_writer=writer, no_dist=world == 1, process_group=None if world == 1 else background
            )
            return pending
    pending.commit()
    return pending


def background_group() -> Any:
    """The process group that background saves synchronise on (collective to create): the writer thread's
    collectives must not interleave with training's on the default group. ``True`` in one process."""
    return dist.new_group(backend="gloo") if dist.is_initialized() else True


def load(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
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
    for group, saved in zip(osd["param_groups"], state["param_groups"], strict=True):
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
