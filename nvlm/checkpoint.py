"""Checkpoints in the ``nvidia/NVLM-D-72B`` layout: sharded safetensors + index + ``config.json``.

Our module names are the released keys (``vision_model.*``, ``mlp1.*``, ``language_model.*``), so the
only translation is the ViT's attention padding: the release pads InternViT's 25 heads with 7 all-zero
"dummy" heads (qkv [3*32*128, C], q/k-norm [4096], proj [C, 4096]) for tensor parallelism 8. We load
padded or unpadded checkpoints, telling them apart from the tensor shapes, and always write the padded
form that vLLM's ``NVLM_D`` and the HF remote code (both hard-code 7 dummy heads) expect.
Loading streams one tensor at a time into a model built on the meta device: peak memory stays near one
copy of the weights. Spec: NVLM_SPEC.md sections 2.2 and 9.

This module reads and checks the files and places tensors into a network (``nvlm.models.nvlm.NVLMModel``);
``nvlm.pretrained`` builds the public ``NVLM`` with these pieces (``load_pretrained``, ``save_pretrained``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open

from nvlm.config import ConfigError, NVLMConfig
from nvlm.devices import DeviceLookup, resolve_device_map
from nvlm.hf_config import CheckpointError, from_json_file, model_dir
from nvlm.models.nvlm import NVLMModel
from nvlm.tokenizer import TokenizerError

M = TypeVar("M", bound=NVLMModel)

NUM_DUMMY_HEADS = 7
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files that make a checkpoint directory stand alone, copied from the source directory on save.
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
)
VIT_ATTENTION = re.compile(
    r"^vision_model\.encoder\.layers\.\d+\.attn\.(qkv\.weight|qkv\.bias|q_norm\.weight|k_norm\.weight|proj\.weight)$"
)


# ------------------------------------------------------------------------------------ dummy heads


def _attention_kind(name: str) -> str:
    """What a ViT attention tensor is (``qkv.weight``, ``proj.weight``, a q/k norm), from its name."""
    m = VIT_ATTENTION.match(name)
    if m is None:
        raise CheckpointError(f"{name}: not a ViT attention tensor")
    return m.group(1)


def unpad_vit_attention(name: str, tensor: torch.Tensor, width: int, head_dim: int) -> torch.Tensor:
    """Drop dummy heads (appended after the real ones) from a padded ViT attention tensor, if padded.

    The dummy heads of qkv and proj must be all zero, as released: dropping non-zero ones would change the
    model's output, so that is a ``CheckpointError`` naming the tensor. The q/k-norm weights of dummy heads
    scale channels that are zero and are dropped whatever they hold."""
    kind = _attention_kind(name)
    if kind.startswith("qkv"):
        padded = tensor.shape[0] // 3
        if tensor.shape[0] % 3 or padded % head_dim or padded < width:
            raise CheckpointError(f"{name}: shape {tuple(tensor.shape)} fits no qkv layout of width {width}")
        parts = tensor.split(padded, dim=0)
        dummy = [part[width:] for part in parts]
        kept = torch.cat([part[:width] for part in parts], dim=0)
    elif kind == "proj.weight":
        dummy, kept = [tensor[:, width:]], tensor[:, :width]
    else:
        return tensor[:width]  # q_norm / k_norm
    if any(d.numel() and bool(d.ne(0).any()) for d in dummy):
        raise CheckpointError(
            f"{name}: its dummy heads (after the {width} real channels) are not all zero; "
            "this model has no place for them"
        )
    return kept


def pad_vit_attention(name: str, tensor: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Append ``NUM_DUMMY_HEADS`` all-zero heads, as in the released checkpoint."""
    kind = _attention_kind(name)
    extra = NUM_DUMMY_HEADS * head_dim
    if kind.startswith("qkv"):
        parts = tensor.chunk(3, dim=0)
        zeros = tensor.new_zeros(extra, *tensor.shape[1:])
        return torch.cat([t for part in parts for t in (part, zeros)], dim=0)
    if kind == "proj.weight":
        return torch.cat([tensor, tensor.new_zeros(tensor.shape[0], extra)], dim=1)
    # q/k-norm: dummy channels of q and k are zero whatever their norm weight; write zeros.
    return torch.cat([tensor, tensor.new_zeros(extra)])


# ------------------------------------------------------------------------------------------ save


def hf_tensors(model: NVLMModel, dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors one at a time, whole (gathered from the ranks if sharded), on the CPU."""
    head_dim = model.config.vision.head_dim
    for name, tensor in model.state_dict().items():
        if name == "language_model.lm_head.weight" and model.config.llm.tie_word_embeddings:
            continue
        if hasattr(tensor, "full_tensor"):  # a DTensor: FSDP2 shards
            tensor = tensor.full_tensor()
        tensor = tensor.detach().cpu()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        yield name, pad_vit_attention(name, tensor, head_dim) if VIT_ATTENTION.match(name) else tensor


# ------------------------------------------------------------------------------------------ load


def resolve_dtype(dtype: torch.dtype | str | None, cfg: NVLMConfig) -> torch.dtype:
    name = dtype if dtype is not None else cfg.torch_dtype
    resolved = name if isinstance(name, torch.dtype) else getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype {name!r}: a floating-point dtype (e.g. bfloat16, float32) is needed")
    return resolved


def _shard_files(path: Path) -> list[Path]:
    """The directory's shard files, each inside it (no absolute or ``..`` names in the index, no symlink to a
    file elsewhere, except into the ``blobs/`` of a Hugging Face cache whose ``snapshots/`` holds ``path``)."""
    index = path / INDEX_FILE
    if index.is_file():
        names = dict.fromkeys(_weight_map(index).values())
        files = [_inside(path, index, name) for name in names]
    elif (path / SINGLE_FILE).is_file():
        files = [_inside(path, path / SINGLE_FILE, SINGLE_FILE)]
    else:
        raise CheckpointError(f"{path}: no {INDEX_FILE} or {SINGLE_FILE}")
    missing = [f for f in files if not f.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{missing[0]}: missing or not a file, named in {index}{more}")
    return files


def tensor_index(path: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Every tensor of a checkpoint directory: its file and shape, from the safetensors headers alone (the
    same checks as ``iter_checkpoint``: a ``CheckpointError`` names the file)."""
    return {name: (file, shape) for file, name, shape in _headers(path)}


def _headers(path: Path) -> Iterator[tuple[Path, str, tuple[int, ...]]]:
    for file, name, f in _entries(path):
        yield file, name, tuple(f.get_slice(name).get_shape())


def _weight_map(index: Path) -> dict[str, str]:
    """The index's ``weight_map`` (tensor name -> shard file name); a name listed twice is an error."""

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"{key!r} is listed twice")
            seen.add(key)
        return dict(pairs)

    try:
        weight_map = json.loads(index.read_bytes(), object_pairs_hook=unique)["weight_map"]
    except (ValueError, KeyError, TypeError) as e:  # bad JSON, not UTF-8, a duplicate, no weight_map
        raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) and f for f in weight_map.values()):
        raise CheckpointError(f"{index}: weight_map must map each tensor name to a shard file name")
    return weight_map


def _inside(path: Path, named_in: Path, name: str) -> Path:
    """``path / name``, refused when the name or a symlink leads out of ``path``."""
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise CheckpointError(f"{named_in}: shard {name!r} is outside {path}")
    file = path / name
    if file.exists():
        target, roots = file.resolve(), [path.resolve()]
        if path.parent.name == "snapshots":  # a Hugging Face cache: snapshots/REV/FILE -> ../../blobs/HASH
            roots.append(path.parent.parent.resolve() / "blobs")
        if not any(target.is_relative_to(root) for root in roots):
            raise CheckpointError(f"{file}: a link to {target}, outside {path}")
    return file


def iter_checkpoint(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of every shard, one at a time."""
    for _, name, tensor in iter_shard_tensors(path):
        yield name, tensor


def iter_shard_tensors(path: Path) -> Iterator[tuple[Path, str, torch.Tensor]]:
    """(shard file, name, tensor) one at a time."""
    for file, name, f in _entries(path):
        yield file, name, f.get_tensor(name)


def _entries(path: Path) -> Iterator[tuple[Path, str, Any]]:
    """(shard file, tensor name, open safetensors file) for every tensor; a file that safetensors cannot read,
    or a tensor in two shards, is a ``CheckpointError`` naming the file."""
    seen: dict[str, Path] = {}
    for file in _shard_files(path):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open has keys(), no __iter__)
                    if name in seen:
                        raise CheckpointError(f"{file}: tensor {name!r} is also in {seen[name].name}")
                    seen[name] = file
                    yield file, name, f
        except CheckpointError:
            raise
        except (OSError, RuntimeError, ValueError, TypeError, SafetensorError) as e:
            raise CheckpointError(f"{file}: unreadable safetensors file ({_one_line(e)})") from None


def _image_token_id(path: Path, token: str, vocab_size: int) -> int | None:
    """The id of the image token in the directory's tokenizer.json, which wins over config.json."""
    tok = path / "tokenizer.json"
    if not tok.is_file():
        return None
    try:
        data = json.loads(tok.read_bytes())
    except ValueError as e:  # bad JSON or not UTF-8
        raise TokenizerError(f"{tok}: not valid JSON ({e})") from None
    added = data.get("added_tokens", []) if isinstance(data, dict) else None
    if not isinstance(added, list) or not all(isinstance(a, dict) for a in added):
        raise TokenizerError(f"{tok}: added_tokens must be a list of token objects")
    for a in added:
        if a.get("content") == token:
            if not isinstance(a.get("id"), int) or isinstance(a["id"], bool) or not 0 <= a["id"] < vocab_size:
                raise TokenizerError(f"{tok}: {token} has id {a.get('id')!r}, not one of the model's {vocab_size}")
            return a["id"]
    return None


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def read_config(path: str | Path) -> tuple[Path, NVLMConfig]:
    """The checkpoint directory (``model/`` of a run directory) and its config, with the image token's id
    taken from the directory's tokenizer.json."""
    path = model_dir(path)
    cfg = from_json_file(path / "config.json")
    token_id = _image_token_id(path, cfg.image_token, cfg.llm.vocab_size)
    if token_id is not None and token_id != cfg.image_token_id:
        cfg = NVLMConfig(**{**cfg.__dict__, "image_token_id": token_id})
    return path, cfg


def build_empty(cls: type[M], cfg: NVLMConfig, device: Any) -> tuple[M, DeviceLookup, dict[str, torch.nn.Parameter]]:
    """A ``cls`` model on the meta device, where each parameter goes, and the parameters a checkpoint must fill."""
    with torch.device("meta"):
        model = cls(cfg)
    params = dict(model.named_parameters())
    if cfg.llm.tie_word_embeddings:
        params.pop("language_model.lm_head.weight")
    return model, resolve_device_map(model, device), params


def place(
    model: NVLMModel,
    param: torch.Tensor,
    name: str,
    tensor: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
    file: Path,
) -> None:
    """Check one tensor of the shard ``file`` against its parameter and put it in place (cast and moved once)."""
    if param.is_floating_point() and not tensor.is_floating_point():
        raise CheckpointError(f"{file}: tensor {name!r} is {tensor.dtype}, a floating-point weight was expected")
    if VIT_ATTENTION.match(name):
        try:
            tensor = unpad_vit_attention(name, tensor, model.config.vision.hidden_size, model.config.vision.head_dim)
        except CheckpointError as e:
            raise CheckpointError(f"{file}: {e}") from None
        tensor = tensor.contiguous()
    if tensor.shape != param.shape:
        raise CheckpointError(
            f"{file}: tensor {name!r} has shape {tuple(tensor.shape)}, the config asks for {tuple(param.shape)}"
        )
    _assign(model, name, tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None))


def finish(
    model: NVLMModel,
    params: dict[str, Any],
    loaded: set[str],
    fresh: tuple[str, ...],
    device_map: DeviceLookup,
    dtype: torch.dtype,
    path: Path,
) -> None:
    """Initialise the ``fresh`` modules, check nothing else is missing, re-tie the embeddings."""
    for prefix in fresh:
        if hasattr(model, prefix.rstrip(".")):
            init_modules(model, prefix.rstrip("."), device_map(prefix), dtype)
            loaded |= {n for n in params if n.startswith(prefix)}
    missing = sorted(set(params) - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{path}: missing tensors: {shown}")
    if model.config.llm.tie_word_embeddings:
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight


def init_modules(model: torch.nn.Module, name: str, device: torch.device, dtype: torch.dtype) -> None:
    """Give the submodule ``name`` (on the meta device) fresh weights: PyTorch's defaults, gates closed."""
    module = model.get_submodule(name)
    module.to_empty(device=device)
    for m in module.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
    module.to(dtype)


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=model.get_parameter(name).requires_grad)


__all__ = [
    "CheckpointError",
    "ConfigError",
    "build_empty",
    "finish",
    "hf_tensors",
    "init_modules",
    "iter_checkpoint",
    "iter_shard_tensors",
    "model_dir",
    "place",
    "read_config",
    "resolve_dtype",
    "tensor_index",
]
