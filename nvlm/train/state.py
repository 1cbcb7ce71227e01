"""Training checkpoints that never lose work: safetensors + JSON, written aside then renamed into place.

``step_00001234/`` holds ``model.safetensors`` (the trainable parameters; frozen ones come back from the
starting point), ``optimizer.safetensors`` (AdamW's moments and step counts, flattened by parameter
name), ``rng.safetensors`` (torch's CPU and CUDA generator states) and ``state.json`` (step, data stream
position, hyper-parameters). A directory appears under its final name only once complete, so a run killed
at any moment resumes from the last complete one; the oldest are removed beyond ``keep_last``. Under
FSDP2 the full state is gathered to rank 0, which writes it; on resume it is broadcast back. No pickle.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

PREFIX = "step_"


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint directory under ``root``."""
    done = sorted(p for p in root.glob(f"{PREFIX}*") if p.is_dir() and not p.name.endswith(".tmp"))
    return done[-1] if done else None


def save(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         extra: dict[str, Any], keep_last: int) -> Path:  # fmt: skip
    """Write checkpoint ``step`` (collective under FSDP2: every rank must call it)."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    model_sd = {k: v for k, v in get_model_state_dict(model, options=opts).items() if k in trainable}
    optim_sd = get_optimizer_state_dict(model, optimizer, options=opts)
    final = root / f"{PREFIX}{step:08d}"
    if _rank0():
        tmp = root / f"{final.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in model_sd.items()}, str(tmp / "model.safetensors"))
        tensors, groups = _flatten_optimizer(optim_sd)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(rng, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, "param_groups": groups, **extra}, indent=1))
        for f in tmp.iterdir():  # on disk before the rename makes the checkpoint visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, final)
        for old in sorted(p for p in root.glob(f"{PREFIX}*") if p.is_dir() and not p.name.endswith(".tmp"))[:-keep_last]:
            shutil.rmtree(old)
    if dist.is_initialized():
        dist.barrier()
    return final


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model, optimiser and RNG from ``path``; return the JSON state (step, data position, ...)."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, strict=False)
    model_sd = load_file(str(path / "model.safetensors"))
    set_model_state_dict(model, model_sd, options=opts)
    state = json.loads((path / "state.json").read_text())
    optim_sd = _unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), state["param_groups"])
    set_optimizer_state_dict(model, optimizer, optim_sd, options=StateDictOptions(full_state_dict=True))
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"cuda{i}" in rng:
                torch.cuda.set_rng_state(rng[f"cuda{i}"], i)
    return state


def _flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    tensors = {}
    for name, values in sd.get("state", {}).items():
        for key, value in values.items():
            tensors[f"{name}::{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return tensors, sd.get("param_groups", [])


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> dict[str, Any]:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for flat, value in tensors.items():
        name, key = flat.rsplit("::", 1)
        state.setdefault(name, {})[key] = value
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}
