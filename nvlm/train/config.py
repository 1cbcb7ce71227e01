"""A training run's settings: a YAML recipe, ``--key value`` overrides, and the paper's stage defaults.

Paths (data, checkpoints, out_dir) are relative to the working directory. Unset optimiser, sequence and
tiling fields take the paper's values for the model's architecture and the
stage (``nvlm.train.stages.PAPER``), so a recipe states only what it changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from nvlm.train.stages import PAPER


@dataclass(frozen=True)
class Schedule:
    """The stage settings of a resolved run: the recipe's, or the paper's where it left them unset."""

    seq_len: int
    max_tiles: int
    steps: int
    lr: float
    min_lr: float
    warmup_steps: int
    betas: tuple[float, float]
    weight_decay: float
    grad_clip: float


@dataclass
class TrainConfig:
    out_dir: str = "runs/nvlm"
    stage: int = 1
    trainable: list[str] | None = None  # parameter-name prefixes to train instead of the stage's (paper Tables 10/11)
    # the starting point: an NVLM checkpoint (optionally converted to ``arch``), or a preset with a ViT and
    # an LLM checkpoint (``vit`` / ``llm``; without them the preset starts from random weights)
    init: str | None = None
    preset: str | None = None
    arch: str | None = None
    vit: str | None = None
    llm: str | None = None
    tokenizer: str | None = None  # a directory with tokenizer.json (default: init's, or llm's)
    data: list[dict[str, Any]] = field(default_factory=list)  # [{path: x.jsonl, weight: 1.0}, ...]
    chat_template: str = "nvlm"  # the prompt format the labels are rendered in: "nvlm" or "checkpoint"
    max_tiles: int | None = None
    # False: the images are formatted without tile tags (as Megatron's NVLM pretraining script, which omits
    # ``--use-tile-tags``); the saved model keeps its config's tags, so a next stage and inference use them
    tile_tags: bool = True
    seq_len: int | None = None
    pack: bool = True
    num_workers: int = 2  # data worker processes per rank (record -> image decode, tiles, tokens); 0: in the loop
    micro_batch_size: int = 1  # rows per forward pass, per rank
    grad_accum: int = 1
    steps: int | None = None
    lr: float | None = None
    min_lr: float | None = None
    warmup_steps: int | None = None
    betas: tuple[float, float] | None = None
    weight_decay: float | None = None
    grad_clip: float | None = None
    dtype: str = "bfloat16"  # autocast dtype on GPU; the CPU trains in float32
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each block
    fsdp: bool = True  # under torchrun: FSDP2 (fully_shard per block); False: plain data parallelism
    shard_size: int | None = None  # FSDP2 shards over this many ranks (a node), replicated across groups: HSDP
    device: str | None = None
    seed: int = 0
    save_every: int = 500
    keep_last: int = 2
    async_save: bool = False  # write checkpoints from a thread while training goes on (DCP async_save)
    log_every: int = 10
    peak_tflops: float | None = None  # for MFU; default: looked up from the GPU's name

    def __post_init__(self) -> None:
        for key in ("lr", "min_lr", "weight_decay", "grad_clip", "peak_tflops"):
            value = getattr(self, key)
            if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
                try:
                    setattr(self, key, float(value))
                except ValueError:
                    raise ValueError(f"{key}: {value!r} is not a number") from None

    def resolve(self, arch: str) -> TrainConfig:
        """Fill unset fields with the paper's values for (arch, stage)."""
        paper = PAPER[(arch, self.stage)]
        for key, value in paper.items():
            if hasattr(self, key) and getattr(self, key) is None:
                setattr(self, key, value)
        if self.betas is not None:
            if len(self.betas) != 2:
                raise ValueError(f"betas: two numbers, got {self.betas!r}")
            self.betas = (float(self.betas[0]), float(self.betas[1]))
        if not self.data:
            raise ValueError("no training data: set data: [{path: train.jsonl, weight: 1.0}, ...]")
        return self

    @property
    def schedule(self) -> Schedule:
        """The stage settings, once ``resolve`` has filled them (else ``ValueError`` naming those unset)."""
        values = {f.name: getattr(self, f.name) for f in fields(Schedule)}
        unset = [k for k, v in values.items() if v is None]
        if unset:
            raise ValueError(f"training settings not resolved: {', '.join(unset)}")
        return Schedule(**values)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
        """A YAML recipe (optional) then ``--key value`` overrides (values parsed as YAML)."""
        yaml = _yaml()
        data: dict[str, Any] = {}
        if path is not None:
            data = yaml.safe_load(Path(path).read_text()) or {}
            if not isinstance(data, dict):
                raise ValueError(f"{path}: a recipe is a YAML mapping")
        it = iter(overrides)
        for flag in it:
            if not flag.startswith("--"):
                raise ValueError(f"expected --key value, got {flag!r}")
            key, _, value = flag[2:].partition("=")
            if not value:
                following = next(it, None)
                if following is None:
                    raise ValueError(f"{flag} needs a value")
                value = following
            key = key.replace("-", "_")
            data[key] = value if key in _TEXT else yaml.safe_load(value)  # `--init 300` names a directory "300"
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training settings: {', '.join(unknown)}")
        for key in _TEXT & set(data):
            value = data[key]
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                data[key] = str(value)  # a recipe's `out_dir: 2024`
            elif value is not None and not isinstance(value, str):
                raise ValueError(f"{key}: a path or a name, not {value!r}")
        if "data" in data and isinstance(data["data"], str):
            data["data"] = [{"path": data["data"]}]
        return cls(**data)


def _yaml():
    try:
        import yaml
    except ImportError:
        raise ImportError("nvlm train reads YAML recipes: pip install 'nvlm[train]' (PyYAML)") from None
    return yaml


# The settings that hold a path or a name: an override's value is taken as written, never parsed as YAML.
_TEXT = frozenset(f.name for f in fields(TrainConfig) if f.type in ("str", "str | None"))
