"""Megatron-Core NVLM-D -> ours, one tensor at a time: in memory, or as a standalone NVLM-D-72B-layout directory.

``McoreCheckpoint`` opens every rank file (their pickles only), checks the whole file set before any tensor is
read (a complete TP x PP grid, the same tensors on every TP rank of a stage, every tensor known, none missing,
each rank's shape and dtype), then ``tensors()`` merges one Megatron tensor at a time from the memory-mapped
ranks and gives its pages back: a reader holds one merged tensor beyond what it keeps. Replicated tensors must be
equal on every rank. The config: the LLM from the files' ``args``, the ViT (and the tags, the HF vocabulary size)
from the base config (``--config``, default ``nvlm-d-72b``), the projector's LayerNorm epsilon from ``args``.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from nvlm.checkpoint import VIT_ATTENTION, CheckpointError, pad_vit_attention
from nvlm.config import NVLMConfig
from nvlm.hf_config import from_json_file, to_hf
from nvlm.image import ImageProcessor
from nvlm.mcore.args import config_from_args
from nvlm.mcore.layout import scan
from nvlm.mcore.names import Geometry, Rule, merge_into, rules
from nvlm.mcore.pickle import RankFile, TensorRef
from nvlm.mcore.shards import write_sharded
from nvlm.mcore.vocab import for_megatron_model
from nvlm.models.nvlm import NVLMModel
from nvlm.presets import PRESETS, preset
from nvlm.processor import Processor

NUM_LM_PREFIX = "language_model.decoder.layers."
LM_LAYER = re.compile(rf"^{re.escape(NUM_LM_PREFIX)}(\d+)\.(.+)$")
DEFAULT_CONFIG = "nvlm-d-72b"


def base_config(config: str | Path | NVLMConfig | None) -> NVLMConfig:
    """A preset name, a config.json (or a directory holding one), or a config; None: ``nvlm-d-72b``."""
    if isinstance(config, NVLMConfig):
        return config
    if config is None or str(config) in PRESETS:
        return preset(str(config or DEFAULT_CONFIG))
    path = Path(config)
    return from_json_file(path / "config.json" if path.is_dir() else path)


class McoreCheckpoint:
    """The rank files of one checkpoint, checked as a set; ``config`` is the model they hold."""

    def __init__(self, path: str | Path, config: str | Path | NVLMConfig | None = None) -> None:
        self.layout = scan(path)
        self.files: dict[tuple[int, int], RankFile] = {}
        try:
            for rank, f in sorted(self.layout.files.items()):
                self.files[rank] = RankFile(f)
            self._check(config)
        except BaseException:
            self.close()
            raise

    def _check(self, config: str | Path | NVLMConfig | None) -> None:
        layout, first = self.layout, self.files[(0, 0)]
        for f in self.files.values():
            self._check_state(f)
            tp_arg = getattr(f.state.get("args"), "tensor_model_parallel_size", layout.tp)
            if tp_arg != layout.tp:
                raise CheckpointError(f"{f.path}: args say TP {tp_arg}, the directory holds {layout.tp} TP ranks")
        args = first.state.get("args")
        self.index = self._index()
        embed = self.index.get("language_model.embedding.word_embeddings.weight")
        if embed is None:
            raise CheckpointError(f"{first.path}: no language_model.embedding.word_embeddings.weight")
        base = base_config(config)
        self.config = config_from_args(args, first.path, base, embed[0][1].dtype)
        self.geometry = Geometry(layout.tp, embed[0][1].shape[0] * layout.tp, self._vit_heads())
        self.rules = rules(self.config, self.geometry)
        self._check_names()

    # ---- checks

    @staticmethod
    def _check_state(f: RankFile) -> None:
        model, version = f.state.get("model"), f.state.get("checkpoint_version", 0)
        if not isinstance(model, dict):
            hint = " (virtual pipeline stages, 'model0', ... are not supported)" if "model0" in f.state else ""
            raise CheckpointError(f"{f.path}: no 'model' state dict{hint}")
        if not isinstance(version, (int, float)) or version < 2.0:
            raise CheckpointError(
                f"{f.path}: checkpoint_version {version!r}; versions before 2.0 order q/k/v "
                "differently and are not supported"
            )

    def _index(self) -> dict[str, list[tuple[Path, TensorRef, str]]]:
        """Global name -> per TP rank (file, tensor, name in the file); LM layers renumbered across stages."""
        index: dict[str, list[tuple[Path, TensorRef, str]]] = {}
        self._stage_layers: list[range] = []  # the global LM layers of each pipeline stage
        offset = 0
        for p in range(self.layout.pp):
            ref = self.files[(0, p)]
            keys = [k for k in ref.state["model"] if not k.endswith("._extra_state")]
            for t in range(1, self.layout.tp):
                other = self.files[(t, p)]
                theirs = [k for k in other.state["model"] if not k.endswith("._extra_state")]
                if set(theirs) != set(keys):
                    odd = sorted(set(theirs) ^ set(keys))[0]
                    raise CheckpointError(
                        f"{other.path}: tensor {odd!r} is in one of it and {ref.path}, not both "
                        "(ranks of one pipeline stage hold the same tensors)"
                    )
            layers = sorted({int(m.group(1)) for k in keys if (m := LM_LAYER.match(k))})
            if layers != list(range(len(layers))):
                raise CheckpointError(f"{ref.path}: LM layers {layers[:8]}... are not numbered 0.. within the stage")
            for k in keys:
                m = LM_LAYER.match(k)
                name = f"{NUM_LM_PREFIX}{int(m.group(1)) + offset}.{m.group(2)}" if m else k
                if name in index:
                    raise CheckpointError(f"{ref.path}: tensor {k!r} is also in {index[name][0][0]}")
                pieces = []
                for t in range(self.layout.tp):
                    f = self.files[(t, p)]
                    value = f.state["model"][k]
                    if not isinstance(value, TensorRef):
                        raise CheckpointError(f"{f.path}: {k!r} is a {type(value).__name__}, not a tensor")
                    pieces.append((f.path, value, k))
                index[name] = pieces
            self._stage_layers.append(range(offset, offset + len(layers)))
            offset += len(layers)
        return index

    def _home(self, rule: Rule) -> tuple[Path, str]:
        """The stage's rank-0 file that should hold ``rule``'s tensor, and its name there."""
        if rule.layer is None:
            p = self.layout.pp - 1 if rule.last else 0
            return self.files[(0, p)].path, rule.mcore
        p = next((p for p, r in enumerate(self._stage_layers) if rule.layer in r), self.layout.pp - 1)
        local = rule.layer - self._stage_layers[p].start
        return self.files[(0, p)].path, rule.mcore.replace(f"{NUM_LM_PREFIX}{rule.layer}.", f"{NUM_LM_PREFIX}{local}.")

    def _vit_heads(self) -> int:
        v = self.config.vision
        qkv = self.index.get("vision_model.decoder.layers.0.self_attention.linear_qkv.weight")
        if qkv is None:
            raise CheckpointError(f"{self.files[(0, 0)].path}: no vision_model.decoder.layers.0 attention")
        rows = qkv[0][1].shape[0] * self.layout.tp
        if rows % (3 * v.head_dim):
            raise CheckpointError(
                f"{qkv[0][0]}: ViT qkv rows {rows} are not 3 x heads x head size {v.head_dim} "
                "(does --config give the right ViT?)"
            )
        return rows // (3 * v.head_dim)

    def _check_names(self) -> None:
        known = {r.mcore for r in self.rules}
        if self.config.llm.tie_word_embeddings:  # a tied model's last stage may keep a copy of the embedding
            known.add("language_model.output_layer.weight")
        lm, v = self.config.llm, self.config.vision
        for name, pieces in self.index.items():
            if name not in known:
                raise CheckpointError(
                    f"{pieces[0][0]}: unknown tensor {pieces[0][2]!r} for an NVLM-D of "
                    f"{lm.num_layers} LM and {v.num_layers} ViT layers"
                )
        tp = self.layout.tp
        for rule in self.rules:
            found = self.index.get(rule.mcore)
            if found is None:
                file, local = self._home(rule)
                raise CheckpointError(f"{file}: missing tensor {local!r} (in this stage's TP rank files)")
            want = rule.piece_shape(tp)
            for file, ref, key in found:
                if ref.shape != want:
                    raise CheckpointError(
                        f"{file}: tensor {key!r} has shape {ref.shape}, expected {want} (TP {tp} of {rule.shape})"
                    )
                if not ref.dtype.is_floating_point or ref.dtype != found[0][1].dtype:
                    raise CheckpointError(f"{file}: tensor {key!r} is {ref.dtype}, not a weight like the others")

    # ---- tensors

    def merged(self, rule: Rule) -> torch.Tensor:
        """One Megatron tensor merged over the TP ranks (a new tensor): each rank's piece is copied into place
        and its pages given back before the next is read. Replicated pieces must all be equal."""
        pieces = self.index[rule.mcore]
        out = torch.empty(rule.shape, dtype=pieces[0][1].dtype)
        for rank, (file, ref, key) in enumerate(pieces):
            view = ref.load()
            if rule.split != "rep":
                merge_into(rule, out, view, self.layout.tp, rank)
            elif rank == 0:
                out.copy_(view)
            elif not torch.equal(view, out):
                raise CheckpointError(f"{file}: replicated tensor {key!r} differs from {pieces[0][0]}'s")
            del view
            ref.release()
        return out

    def tensors(self) -> Iterator[tuple[Rule, tuple[torch.Tensor, ...]]]:
        """Each rule with our tensors (NVLM names, ViT attention without dummy heads), one rule at a time."""
        for rule in self.rules:
            yield rule, tuple(t.contiguous() for t in rule.to_ours(self.merged(rule)))

    def close(self) -> None:
        for f in self.files.values():
            f.close()


# ------------------------------------------------------------------------------------------ tokenizer


def prepare_tokenizer(path: str | Path, cfg: NVLMConfig) -> tuple[Any, NVLMConfig]:
    """The tokenizer of ``path`` made ready for the converted model (see ``nvlm.mcore.vocab``), and ``cfg`` with
    its image token's id."""
    tok = for_megatron_model(path, cfg)
    return tok, replace(cfg, image_token_id=tok.token_to_id(cfg.image_token)).validate()


# ----------------------------------------------------------------------------------------- outputs


def convert_to_hf(
    src: str | Path,
    dst: str | Path,
    tokenizer: str | Path,
    config: str | Path | NVLMConfig | None = None,
    max_shard_size: int = 5 * 1024**3,
) -> NVLMConfig:
    """Write ``dst`` in the NVLM-D-72B layout (config, sharded safetensors + index, tokenizer, preprocessor)
    from the Megatron checkpoint ``src``, streaming one tensor at a time. Everything is checked before ``dst``
    is touched; ``dst`` must be new or empty."""
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise CheckpointError(f"{dst}: exists and is not an empty directory; give a new one")
    ckpt = McoreCheckpoint(src, config)
    try:
        tok, cfg = prepare_tokenizer(tokenizer, ckpt.config)
        groups = _groups(ckpt, cfg)
        dst.mkdir(parents=True, exist_ok=True)
        try:
            write_sharded(groups, dst, max_shard_size)
            (dst / "config.json").write_text(json.dumps(to_hf(cfg), indent=2) + "\n")
            images = ImageProcessor(
                tile_size=cfg.tile_size,
                max_tiles=cfg.max_tiles,
                min_tiles=cfg.min_tiles,
                use_thumbnail=cfg.use_thumbnail,
            )
            Processor(tok, images, cfg, chat_template="checkpoint").save_pretrained(dst)  # Megatron's format
        except BaseException:
            shutil.rmtree(dst, ignore_errors=True)
            raise
    finally:
        ckpt.close()
    return cfg


def _groups(ckpt: McoreCheckpoint, cfg: NVLMConfig) -> list[Any]:
    """Per rule: our tensors' names, shapes (ViT attention with its dummy heads, as released) and dtype, and
    the function that merges and converts them."""
    with torch.device("meta"):
        shapes = {n: p for n, p in NVLMModel(cfg).named_parameters()}
    head_dim = cfg.vision.head_dim

    def released(name: str, t: torch.Tensor) -> torch.Tensor:
        return pad_vit_attention(name, t, head_dim).contiguous() if VIT_ATTENTION.match(name) else t

    def producer(rule: Rule) -> Any:
        return lambda: [released(n, t) for n, t in zip(rule.ours, rule.to_ours(ckpt.merged(rule)), strict=True)]

    groups = []
    for rule in ckpt.rules:
        dtype = ckpt.index[rule.mcore][0][1].dtype
        specs = [(n, tuple(released(n, shapes[n]).shape), dtype) for n in rule.ours]
        groups.append((specs, producer(rule)))
    return groups
