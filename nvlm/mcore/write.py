"""Ours -> Megatron-Core: the legacy per-rank files Megatron's NVLM example loads (MCORE_SPEC 6.2).

One ``model_optim_rng.pt`` per (TP, PP) rank under ``release/`` (or ``iter_NNNNNNN/``) with the tracker file,
each ``{"args", "checkpoint_version": 3.0, "iteration", "model"}``: the rank's pieces (each its own storage),
``None`` for every ``_extra_state`` a TE >= 1.8 Megatron expects, and ``args`` in stdlib and torch types only.
Load it with ``--use-checkpoint-args --no-load-optim --no-load-rng`` (or ``--finetune``). A rank file is built
from the source tensors it needs (read from the memory-mapped safetensors) and written before the next one, so
the writer holds about one rank file. Layers are spread evenly over the pipeline stages; the ViT and projector
sit on the first stage with the embedding, the final norm and output layer on the last (Megatron's defaults).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from nvlm.checkpoint import (
    NUM_DUMMY_HEADS,
    VIT_ATTENTION,
    CheckpointError,
    read_config,
    tensor_index,
    unpad_vit_attention,
)
from nvlm.mcore.args import make_args, padded_vocab
from nvlm.mcore.layout import RANK_FILE, TRACKER
from nvlm.mcore.names import Geometry, Rule, extra_state_keys, piece, rules

LM_PREFIX = "language_model.decoder.layers."


def vit_heads(num_heads: int, tp: int) -> int:
    """Megatron's padded ViT head count: the real heads and NVLM's 7 dummy ones, up to a multiple of TP
    (NVLM-D-72B: 25 + 7 = 32, the TP 8 layout Megatron's InternViT asserts)."""
    return -(-(num_heads + NUM_DUMMY_HEADS) // tp) * tp


class _Source:
    """Our tensors by name from a checkpoint directory, ViT attention without its dummy heads."""

    def __init__(self, path: Path, width: int, head_dim: int) -> None:
        self.index = tensor_index(path)
        self.width, self.head_dim = width, head_dim
        self._open: dict[Path, Any] = {}

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.index:
            raise CheckpointError(f"missing tensor {name!r} in the source checkpoint")
        file = self.index[name][0]
        if file not in self._open:
            self._open[file] = safe_open(str(file), framework="pt", device="cpu")
        t = self._open[file].get_tensor(name)
        return unpad_vit_attention(name, t, self.width, self.head_dim) if VIT_ATTENTION.match(name) else t


def _stage(rule_layer: int | None, last: bool, per_stage: int, pp: int) -> int:
    if rule_layer is not None:
        return rule_layer // per_stage
    return pp - 1 if last else 0


def _local(name: str, per_stage: int) -> str:
    """The name inside its stage's file: LM layers counted from the stage's first layer."""
    if not name.startswith(LM_PREFIX):
        return name
    layer, rest = name[len(LM_PREFIX) :].split(".", 1)
    return f"{LM_PREFIX}{int(layer) % per_stage}.{rest}"


def convert_to_mcore(src: str | Path, dst: str | Path, tp: int = 1, pp: int = 1, iteration: int | None = None) -> Path:
    """Write the checkpoint ``src`` (NVLM-D-72B layout) as Megatron legacy rank files at TP ``tp`` and PP ``pp``
    under ``dst`` (``release/`` when ``iteration`` is None). ``dst`` must be new or empty. Returns the
    iteration directory."""
    path, cfg = read_config(src)
    if tp < 1 or pp < 1:
        raise CheckpointError(f"--tp {tp} --pp {pp}: both must be at least 1")
    if cfg.llm.num_layers % pp:
        raise CheckpointError(f"{cfg.llm.num_layers} LM layers do not split evenly over {pp} pipeline stages")
    if cfg.llm.tie_word_embeddings and pp > 1:
        raise CheckpointError(
            "tied embeddings over several pipeline stages (Megatron's output-layer copy) are not supported"
        )
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise CheckpointError(f"{dst}: exists and is not an empty directory; give a new one")
    geo = Geometry(tp, padded_vocab(cfg.llm.vocab_size, tp), vit_heads(cfg.vision.num_heads, tp))
    all_rules = rules(cfg, geo)
    source = _Source(path, cfg.vision.hidden_size, cfg.vision.head_dim)
    missing = [n for r in all_rules for n in r.ours if n not in source.index]
    if missing:
        raise CheckpointError(f"{path}: missing tensor {missing[0]!r} ({len(missing)} missing)")
    dtype = source("language_model.model.embed_tokens.weight").dtype
    per_stage = cfg.llm.num_layers // pp
    it_dir = dst / ("release" if iteration is None else f"iter_{iteration:07d}")
    args = make_args(cfg, tp, pp, geo.padded_vocab, iteration or 0, dtype)
    try:
        for p in range(pp):
            stage_rules = [r for r in all_rules if _stage(r.layer, r.last, per_stage, pp) == p]
            extras = [n for n, layer, last in extra_state_keys(cfg) if _stage(layer, last, per_stage, pp) == p]
            for t in range(tp):
                model: dict[str, torch.Tensor | None] = {
                    _local(r.mcore, per_stage): _piece(r, source, tp, t) for r in stage_rules
                }
                model.update({_local(n, per_stage): None for n in extras})
                name = f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "")
                (it_dir / name).mkdir(parents=True)
                state = {"args": args, "checkpoint_version": 3.0, "iteration": iteration or 0, "model": model}
                torch.save(state, it_dir / name / RANK_FILE)
                del model, state
        (dst / TRACKER).write_text(("release" if iteration is None else str(iteration)) + "\n")
    except BaseException:
        shutil.rmtree(it_dir, ignore_errors=True)
        raise
    return it_dir


def _piece(rule: Rule, source: _Source, tp: int, rank: int) -> torch.Tensor:
    merged = rule.from_ours(*(source(n) for n in rule.ours))
    if tuple(merged.shape) != rule.shape:
        raise CheckpointError(f"{rule.mcore}: made {tuple(merged.shape)} from {rule.ours}, expected {rule.shape}")
    return piece(rule, merged, tp, rank)
