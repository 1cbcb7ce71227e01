"""A training run's starting weights, filled into a model that was built on the meta device and sharded.

The model never exists whole in any process: it is built on ``meta``, its dtypes are set (trained parameters
fp32, frozen ones in the checkpoint's dtype on GPU), the sharding plan is applied, and ``to_empty`` allocates
only this rank's shards. Each rank then fills its own rows:

- from checkpoint tensors (an NVLM checkpoint in the NVLM-D-72B layout or ours, or a ViT + LLM pair), read
  as safetensors slices: every rank opens the files itself and reads only its rows, so no rank reads, holds
  or sends what another needs (a single streaming reader would push every byte through one process and its
  network link). The ViT's padded attention tensors are read whole, one at a time, to drop the dummy heads;
- for new modules (projector, cross-attention blocks, or everything from a preset), from a seeded draw per
  module: each module's full-size weights are drawn on the CPU with a seed made of the run's seed and the
  module's name, and each rank keeps its rows. The result is the same for every world size, and one
  module's draw is the largest transient (a cross-attention FFN matrix for the 72B).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from nvlm.checkpoint import VIT_ATTENTION, CheckpointError, read_config, tensor_index, unpad_vit_attention
from nvlm.config import NVLMConfig
from nvlm.presets import preset
from nvlm.pretrained import NVLM
from nvlm.tokenizer import Tokenizer
from nvlm.train.config import TrainConfig


@dataclass
class StartingPoint:
    """Where each parameter's first value comes from."""

    config: NVLMConfig
    tokenizer: Tokenizer
    tensors: dict[str, tuple[Path, str, tuple[int, ...]]] = field(default_factory=dict)  # param -> (file, key, shape)
    fresh: tuple[str, ...] = ()  # module-name prefixes drawn fresh ("" = everything)
    from_scratch: bool = False  # no checkpoint: the LLM is drawn as transformers draws it (std 0.02)


def starting_point(cfg: TrainConfig) -> StartingPoint:
    """An NVLM checkpoint (``init``, converted to ``arch`` if asked), a preset with a ViT and an LLM checkpoint,
    or a preset from random weights. Reads config and safetensors headers only."""
    if cfg.init:
        path, config = read_config(cfg.init)
        fresh: tuple[str, ...] = ()
        if cfg.arch and cfg.arch != config.arch:
            new = config.with_arch(cfg.arch)  # type: ignore[arg-type]
            fresh = ("xattn_layers",) + (("mlp1",) if new.projector != config.projector else ())
            config = new
        point = StartingPoint(config, Tokenizer.from_pretrained(cfg.tokenizer or path), fresh=fresh)
        _add_tensors(point, path, "", skip_unknown=bool(fresh))
        return _checked(point, path)
    if not cfg.preset:
        raise ValueError("say where training starts: init (an NVLM checkpoint) or preset (+ vit and llm)")
    config = preset(cfg.preset)
    if cfg.arch:
        config = config.with_arch(cfg.arch)  # type: ignore[arg-type]
    tok_dir = cfg.tokenizer or cfg.llm
    if tok_dir is None:
        raise ValueError("a preset needs a tokenizer directory (tokenizer: DIR)")
    tokenizer = Tokenizer.from_pretrained(tok_dir)
    if tokenizer.vocab_size > config.llm.vocab_size:
        raise ValueError(f"{tok_dir}: {tokenizer.vocab_size} tokens do not fit the preset's {config.llm.vocab_size}")
    llm = replace(config.llm, eos_token_id=tokenizer.eos_token_id or config.llm.eos_token_id)
    config = replace(config, llm=llm, image_token_id=tokenizer.token_to_id(config.image_token), torch_dtype="float32")
    if bool(cfg.vit) != bool(cfg.llm):
        raise ValueError("give both vit and llm checkpoints, or neither")
    if not cfg.vit or not cfg.llm:
        return StartingPoint(config, tokenizer, fresh=("",), from_scratch=True)
    point = StartingPoint(config, tokenizer, fresh=("mlp1", "xattn_layers"))
    _add_tensors(point, Path(cfg.vit), "vision_model.", skip_unknown=True)  # InternViT repos carry heads etc.
    _add_tensors(point, Path(cfg.llm), "language_model.", skip_unknown=False)
    return _checked(point, Path(cfg.llm))


def _parameter_shapes(config: NVLMConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = NVLM(config)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}  # tied weights appear once


def _add_tensors(point: StartingPoint, path: Path, prefix: str, skip_unknown: bool) -> None:
    shapes = _parameter_shapes(point.config)
    for key, (file, shape) in tensor_index(path).items():
        name = prefix + key
        if name.startswith(tuple(p + "." for p in point.fresh)):
            continue  # converting architectures: replaced by a fresh module
        if name not in shapes:
            if skip_unknown or (point.config.llm.tie_word_embeddings and name == "language_model.lm_head.weight"):
                continue
            raise CheckpointError(f"{path}: unexpected tensor {key!r} {shape} for an NVLM-{point.config.arch} model")
        if shape != shapes[name] and not VIT_ATTENTION.match(name):
            raise CheckpointError(f"{file}: tensor {key!r} has shape {shape}, the config asks for {shapes[name]}")
        point.tensors[name] = (file, key, shape)


def _checked(point: StartingPoint, path: Path) -> StartingPoint:
    fresh = tuple(p + "." for p in point.fresh)
    missing = sorted(n for n in _parameter_shapes(point.config) if n not in point.tensors and not n.startswith(fresh))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{path}: missing tensors: {shown}")
    return point


# ------------------------------------------------------------------------------------------- dtypes


def set_dtypes(model: nn.Module, frozen: torch.dtype) -> None:
    """Trained parameters in fp32 (the optimiser's master copy), frozen ones in ``frozen``; on meta, before
    sharding, so that each rank allocates only its shards in their final dtype."""
    for p in model.parameters():
        p.data = p.data.to(torch.float32 if p.requires_grad else frozen)


# ------------------------------------------------------------------------------------------- filling


def _rows(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The tensor this rank fills and the first global row it holds (FSDP2 shards dim 0 in ceil-sized chunks)."""
    if not isinstance(param, DTensor):
        return param.data, 0
    local, start = param.to_local(), 0
    for mesh_dim, placement in enumerate(param.placements):
        if isinstance(placement, Shard):
            if placement.dim != 0:
                raise NotImplementedError(f"sharding on dim {placement.dim}: only dim-0 (FSDP) shards are filled")
            chunk = math.ceil(param.shape[0] / param.device_mesh.size(mesh_dim))
            start = param.device_mesh.get_local_rank(mesh_dim) * chunk
    return local, start


def _module_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


@torch.no_grad()
def fill(model: NVLM, point: StartingPoint, seed: int) -> None:
    """Fill this rank's part of every parameter of ``model`` (materialised with ``to_empty``)."""
    params = dict(model.named_parameters())
    for name, (file, key, shape) in point.tensors.items():
        local, start = _rows(params[name])
        if local.shape[0] == 0:
            continue  # this rank holds no row of this parameter
        with safe_open(str(file), framework="pt", device="cpu") as f:
            if VIT_ATTENTION.match(name) and shape != tuple(params[name].shape):
                full = unpad_vit_attention(
                    name, f.get_tensor(key), model.config.vision.hidden_size, model.config.vision.head_dim
                )
                rows = full[start : start + local.shape[0]]
            else:
                rows = f.get_slice(key)[start : start + local.shape[0]]
        if tuple(rows.shape) != tuple(local.shape):
            raise CheckpointError(f"{file}: tensor {key!r} does not fit parameter {name} {tuple(params[name].shape)}")
        local.copy_(rows)
    if point.fresh:
        _draw_fresh(model, point, params, seed)
    if model.config.llm.tie_word_embeddings:
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight


def _draw_fresh(model: NVLM, point: StartingPoint, params: Mapping[str, torch.Tensor], seed: int) -> None:
    """Each fresh module's weights drawn full-size on the CPU (a meta twin of the model gives the shapes and
    each module's ``reset_parameters``), seeded by name; this rank keeps its rows."""
    with torch.device("meta"):
        twin = NVLM(model.config)
    done: set[int] = set()
    for module_name, module in twin.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in done]
        if not own or not any(module_name == p or module_name.startswith(p + ".") or not p for p in point.fresh):
            continue
        module.to_empty(device="cpu", recurse=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_module_seed(seed, module_name))
            module.reset_parameters()
            if (
                point.from_scratch
                and module_name.startswith("language_model.")
                and isinstance(module, (nn.Linear, nn.Embedding))
            ):
                nn.init.normal_(module.weight, std=0.02)  # transformers' initializer_range for Qwen2 / Llama
                bias = getattr(module, "bias", None)
                if bias is not None:
                    nn.init.zeros_(bias)
        for pname, p in module.named_parameters(recurse=False):
            done.add(id(p))
            local, start = _rows(params[f"{module_name}.{pname}"])
            if local.shape[0]:
                local.copy_(p.data[start : start + local.shape[0]])
        module.to_empty(device="meta", recurse=False)
