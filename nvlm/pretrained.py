"""``NVLM``, the public model: the network (``nvlm.models.nvlm.NVLMModel``) with its checkpoints and ``generate``.

This module sits above the model, the engine and the checkpoint I/O: it imports them, and nothing below it
imports it. ``NVLM.from_pretrained`` (``load_pretrained``) reads the NVLM-D-72B layout (``nvlm.checkpoint``) or a
Megatron-Core directory (``nvlm.mcore``) and returns an ``NVLM``; ``save_pretrained`` writes the layout back;
``generate`` runs the engine (``nvlm.generation``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from nvlm.checkpoint import (
    INDEX_FILE,
    SIDE_FILES,
    SINGLE_FILE,
    CheckpointError,
    build_empty,
    finish,
    hf_tensors,
    iter_shard_tensors,
    place,
    read_config,
    resolve_dtype,
)
from nvlm.config import NVLMConfig
from nvlm.generation import generate
from nvlm.hf_config import to_hf
from nvlm.mcore.layout import is_mcore
from nvlm.mcore.read import McoreCheckpoint, prepare_tokenizer
from nvlm.models.nvlm import NVLMModel
from nvlm.processor import Processor
from nvlm.quant import QuantConfig, Quantizer, as_config


class NVLM(NVLMModel):
    """NVLM-D, -X or -H: the network, loaded from and saved to checkpoint directories, and ``generate``."""

    def __init__(self, config: NVLMConfig) -> None:
        super().__init__(config)
        self.name_or_path: str | None = None  # the directory it was loaded from, if any
        self.quantization: QuantConfig | None = None  # set when loaded with ``quantize=`` (nvlm.quant)

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **sampling: Any,
    ) -> torch.Tensor:
        """New token ids only, (B, n); finished rows are padded. See ``nvlm.generation.generate``."""
        return generate(self, input_ids, pixel_values, attention_mask, **sampling)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | dict[str, Any] | None = None,
        arch: str | None = None,
        quantize: str | QuantConfig | None = None,
        tokenizer: str | Path | None = None,
        config: Any = None,
    ) -> NVLM:
        """Load a directory in the NVLM-D-72B layout (config.json + sharded safetensors; ours for X and H).

        ``arch="X"`` or ``"H"`` on an NVLM-D checkpoint builds that architecture from it, new modules fresh.
        ``quantize="int8"``, ``"int4"`` or ``"fp8"`` (torchao, the ``quant`` extra) quantizes the decoder's and
        cross-attention blocks' linears as they load; see ``nvlm.quant`` for what and where.
        A Megatron-Core checkpoint directory loads too, with ``tokenizer`` (a directory) and ``config`` (its
        ViT: a preset name or config.json, default ``nvlm-d-72b``): see ``nvlm.mcore``.
        """
        return load_pretrained(
            path, dtype=dtype, device=device, arch=arch, quantize=quantize, tokenizer=tokenizer, config=config
        )

    def save_pretrained(self, path: str | Path, processor: Processor | None = None, **kwargs: Any) -> None:
        """Write the NVLM-D-72B layout (``architectures: ["NVLM_X"]``/``["NVLM_H"]`` for X and H), with the
        tokenizer and processor files beside it."""
        save_pretrained(self, path, processor=processor, **kwargs)


def load_pretrained(
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | dict[str, Any] | None = None,
    arch: str | None = None,
    quantize: str | QuantConfig | None = None,
    tokenizer: str | Path | None = None,
    config: Any = None,
) -> NVLM:
    """Build the model on the meta device, then stream each tensor into place (cast and moved once).

    ``quantize`` ("int8", "int4", "fp8" or a ``nvlm.quant.QuantConfig``) quantizes each selected linear as
    its weight arrives (default dtype then bfloat16): peak memory stays near the quantized model plus one
    shard. Whether the format runs on the target devices is checked before any tensor is read.

    ``arch`` ("D", "X" or "H") different from the checkpoint's builds that architecture from it: the ViT and
    the LLM (and the two-layer projector between D and H) are copied, the modules the checkpoint lacks are
    freshly initialised (cross-attention gates at 0), and what the new architecture has no use for is left
    out. That is how an NVLM-X or NVLM-H starts stage 1 from an NVLM-D.
    A Megatron-Core checkpoint (``nvidia/NVLM-D-72B-mcore``) is read by ``load_mcore``, with the
    ``tokenizer`` directory and the ``config`` (preset or config.json) that give what its files lack.
    """
    if is_mcore(path):
        if quantize is not None:
            raise ValueError(
                f"{path}: a Megatron-Core checkpoint loads unquantized; convert it (nvlm convert) and "
                "load the result with quantize="
            )
        return load_mcore(path, tokenizer, config, dtype, device, arch)
    if tokenizer is not None or config is not None:
        raise ValueError(f"{path}: tokenizer= and config= are for a Megatron-Core checkpoint, which this is not")
    path, cfg = read_config(path)
    fresh: tuple[str, ...] = ()
    if arch is not None and arch != cfg.arch:
        new = cfg.with_arch(arch)  # type: ignore[arg-type]
        fresh = ("xattn_layers.",) + (("mlp1.",) if new.projector != cfg.projector else ())
        cfg = new
    qconfig = as_config(quantize)
    torch_dtype = resolve_dtype(torch.bfloat16 if dtype is None and qconfig else dtype, cfg)
    model, device_map, params = build_empty(NVLM, cfg, device)
    quantizer = Quantizer(model, qconfig, device_map, torch_dtype) if qconfig else None
    loaded: set[str] = set()
    for file, name, tensor in iter_shard_tensors(path):
        if name.startswith(fresh) or (fresh and name not in params):
            continue  # converting architectures: replaced, or not used by the new one
        if name not in params:
            raise CheckpointError(
                f"{path}: unexpected tensor {name!r} {tuple(tensor.shape)} for an NVLM-{cfg.arch} model"
            )
        place(model, params[name], name, tensor, device_map(name), torch_dtype, file)
        loaded.add(name)
        if quantizer:
            quantizer.placed(name)
    finish(model, params, loaded, fresh, device_map, torch_dtype, path)
    if quantizer:
        quantizer.finish()
        model.quantization = qconfig
    model.name_or_path = str(path)
    return model.eval()


def load_mcore(
    path: str | Path,
    tokenizer: str | Path | None = None,
    config: str | Path | NVLMConfig | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | dict[str, Any] | None = None,
    arch: str | None = None,
) -> NVLM:
    """An ``NVLM`` built from a Megatron-Core checkpoint in memory (tensor by tensor into a meta-device model).
    ``tokenizer`` (a directory) sets the image token's id as ``convert_to_hf`` would write it."""
    ckpt = McoreCheckpoint(path, config)
    try:
        if arch is not None and arch != ckpt.config.arch:
            raise CheckpointError(
                f"{path}: a Megatron-Core NVLM is an NVLM-{ckpt.config.arch}; convert it, then load "
                f"it with arch={arch!r}"
            )
        cfg = ckpt.config if tokenizer is None else prepare_tokenizer(tokenizer, ckpt.config)[1]
        torch_dtype = resolve_dtype(dtype, cfg)
        model, device_map, params = build_empty(NVLM, cfg, device)
        loaded: set[str] = set()
        for rule, tensors in ckpt.tensors():
            for name, t in zip(rule.ours, tensors, strict=True):
                place(model, params[name], name, t, device_map(name), torch_dtype, ckpt.layout.root)
                loaded.add(name)
        finish(model, params, loaded, (), device_map, torch_dtype, ckpt.layout.root)
    finally:
        ckpt.close()
    model.name_or_path = str(path)
    return model.eval()


def load_parts(
    config: NVLMConfig,
    vit: str | Path,
    llm: str | Path,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | dict[str, Any] | None = None,
) -> NVLM:
    """An NVLM of ``config`` from a ViT checkpoint (InternViT's HF layout: ``embeddings.*``, ``encoder.*``)
    and an LLM checkpoint (HF Qwen2 / Llama: ``model.*``, ``lm_head.*``), sharded or not. The projector and
    the cross-attention blocks start fresh (gates closed): the starting point of stage 1."""
    torch_dtype = resolve_dtype(dtype, config)
    model, device_map, params = build_empty(NVLM, config, device)
    loaded: set[str] = set()
    for prefix, path in (("vision_model.", Path(vit)), ("language_model.", Path(llm))):
        for file, name, tensor in iter_shard_tensors(path):
            full = prefix + name
            if full not in params:
                if prefix == "vision_model.":
                    continue  # InternViT repos carry more than the encoder NVLM uses (e.g. heads, extra layers)
                raise CheckpointError(f"{path}: unexpected tensor {name!r} for the LLM of this config")
            place(model, params[full], full, tensor, device_map(full), torch_dtype, file)
            loaded.add(full)
    fresh = ("mlp1.", "xattn_layers.")
    finish(model, params, loaded, fresh, device_map, torch_dtype, Path(llm))
    return model.eval()


def save_pretrained(
    model: NVLM,
    path: str | Path,
    processor: Processor | None = None,
    max_shard_size: int = 5 * 1024**3,
    dtype: torch.dtype | None = None,
) -> None:
    """Write config.json, ``model-0000k-of-0000n.safetensors`` shards and their index, and side files.

    Tensors stream one at a time into the shard being filled (written once it reaches ``max_shard_size``),
    so at most one shard is held. A model sharded with FSDP2 is written the same way: every rank gathers
    each tensor in turn (collective: every rank calls this) and rank 0 writes. ``dtype`` casts the floating
    tensors (default: each as it is).
    """
    if getattr(model, "quantization", None) is not None:
        raise CheckpointError("a quantized model is not saved: save the bfloat16 model and quantize it when loading")
    writer = not dist.is_initialized() or dist.get_rank() == 0
    path = Path(path)
    cfg: NVLMConfig = model.config
    if writer:
        path.mkdir(parents=True, exist_ok=True)
        for old in path.glob("model*.safetensors"):
            old.unlink()
    files: list[list[str]] = []  # tensor names per shard file, in order
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        if shard:
            if writer:
                save_file(shard, str(path / f"part-{len(files):05d}.tmp"), metadata={"format": "pt"})
            files.append(list(shard))
            shard.clear()

    for name, tensor in hf_tensors(model, dtype):
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_size:
            flush()
            size = 0
        if writer:
            shard[name] = tensor.contiguous()
        else:
            shard[name] = tensor.new_empty(0)  # names only: rank 0 holds the data
        size += nbytes
        total += nbytes
    flush()
    if writer:
        weight_map = {}
        for i, names in enumerate(files, start=1):
            fname = SINGLE_FILE if len(files) == 1 else f"model-{i:05d}-of-{len(files):05d}.safetensors"
            (path / f"part-{i - 1:05d}.tmp").replace(path / fname)
            weight_map.update({k: fname for k in names})
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        hf = to_hf(cfg)
        hf["torch_dtype"] = str(dtype or model.dtype).removeprefix("torch.")
        (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        if processor is not None:
            processor.save_pretrained(path)
        elif model.name_or_path and Path(model.name_or_path).resolve() != path.resolve():
            src = Path(model.name_or_path)
            for name in SIDE_FILES + tuple(p.name for p in src.glob("*.py")):
                if (src / name).is_file():
                    shutil.copy2(src / name, path / name)
    if dist.is_initialized():
        dist.barrier()
