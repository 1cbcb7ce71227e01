"""``nvlm train --plan``: the per-device memory of a training run, from its config alone (no weights read).

The layout counted is FSDP2's (``nvlm.train.distributed.units``): one ``fully_shard`` unit per ViT layer,
decoder layer and cross-attention block, the projector, the token embeddings, the final norm with ``lm_head``,
then the root (the ViT's patch and position embeddings).
Each parameter is split along dim 0 over the shard group (all devices, or one node's with HSDP), padded as
FSDP2 pads it. Per device, with S the shard group and P_t / P_f the trained / frozen parameters (a recipe's
``trainable``, else ``stages.TRAINABLE``):

- parameters: 4 P_t / S (fp32 master copies) + b_f P_f / S (frozen: bf16 on GPU, b_f = 2; fp32 on CPU)
- gradients: 4 P_t / S (fp32, trained parameters only); optimizer: 8 P_t / S (AdamW exp_avg, exp_avg_sq)
- transients: the root unit (small) unsharded through forward and backward (c bytes per element: bf16 on GPU under
  ``MixedPrecisionPolicy``, fp32 on CPU), the largest block unit unsharded twice (computed + prefetched) and
  its unsharded gradient in backward, or the root's unsharded gradient at the end of backward, whichever is
  larger (2 x 4 bytes per trained element: the fp32 copy and FSDP2's reduce-scatter input). None on one CPU
  process, which runs unsharded.
- the optimizer step's temporaries, once activations and transients are gone: AdamW's foreach kernels on GPU
  allocate one fp32 buffer the size of all ``exp_avg_sq`` shards; its per-tensor loop on CPU two fp32 copies
  of the largest trained shard (the square root and its quotient).
- activations: what autograd saves, counted tensor by tensor from the modules' code (tests check the count
  against ``saved_tensors_hooks``), at ``micro_batch_size`` rows of ``seq_len`` tokens and one image per row
  of ``max_tiles`` tiles (+ thumbnail); the frozen ViT runs without saving anything, so only its forward
  working set counts; logits count as held at every position (B, T, vocab), the most the loop computes (it
  takes them at the supervised positions only, fewer in most data), with the fp32 log-softmax saved for the loss
  and its two gradients in backward. The decoder's attention runs per document, causal and unmasked: a
  fused kernel on CPU and CUDA. The cross-attention is masked, and on GPU counted as PyTorch runs a masked
  GQA call, with the math kernel and its (B, heads, T, keys) fp32 probabilities (``Layout.masked_gqa_math``). With
  activation checkpointing: the input of each block, plus one block recomputed with its backward working set.

``fits`` leaves ``headroom`` (10% by default) of each GPU for the CUDA context, communication buffers and
allocator fragmentation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nvlm.config import NVLMConfig
from nvlm.hf_config import from_json_file, model_dir
from nvlm.presets import preset
from nvlm.pretrained import NVLM
from nvlm.train.config import TrainConfig
from nvlm.train.distributed import units
from nvlm.train.stages import set_trainable

GIB = 2**30
_F32 = 4
_TAG_TOKENS = 5  # an NVLM-H memory tile's ``<tile_k>`` tag: five BPE pieces (<, tile, _, k, >) in Qwen2's vocabulary


@dataclass(frozen=True)
class Layout:
    """Bytes per element of each kind of state, and the attention kernel a masked GQA call gets."""

    master: int  # a trained parameter's sharded copy
    frozen: int  # a frozen parameter's sharded copy
    compute: int  # unsharded parameters and activations
    reduce: int  # gradients as they are reduced
    # PyTorch's CUDA SDPA has no fused kernel for an attention mask with GQA (enable_gqa): it falls back to
    # the math kernel, which upcasts q, k, v to fp32, repeats k and v per head and keeps the (B, H, T, S)
    # fp32 probabilities. Its CPU flash kernel takes both.
    masked_gqa_math: bool


GPU = Layout(master=4, frozen=2, compute=2, reduce=4, masked_gqa_math=True)  # MixedPrecisionPolicy(bf16, fp32)
CPU = Layout(master=4, frozen=4, compute=4, reduce=4, masked_gqa_math=False)  # gloo: everything fp32


@dataclass(frozen=True)
class Unit:
    """One FSDP2 unit's parameter elements: whole, and on one device of a shard group."""

    name: str
    trained: int
    frozen: int
    trained_shard: int
    frozen_shard: int

    @property
    def total(self) -> int:
        return self.trained + self.frozen


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device; ``total`` counts the activations the recipe's ``activation_checkpointing`` implies."""

    devices: int
    shard_group: int
    device_gib: float
    cpu: bool
    activation_checkpointing: bool
    params_total: int  # elements, whole model
    params_trained: int
    parameters: int
    gradients: int
    optimizer: int
    activations_ac: int
    activations_no_ac: int
    transients: int
    optimizer_step: int  # the step's temporaries, when activations and transients are gone
    headroom: float

    @property
    def activations(self) -> int:
        return self.activations_ac if self.activation_checkpointing else self.activations_no_ac

    @property
    def total(self) -> int:
        states = self.parameters + self.gradients + self.optimizer
        return states + max(self.activations + self.transients, self.optimizer_step)

    @property
    def usable(self) -> int:
        """The bytes a run may use on one device: its memory less the headroom."""
        return int(self.device_gib * GIB * (1 - self.headroom))

    @property
    def fits(self) -> bool:
        return self.total <= self.usable

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "activations": self.activations,
            "total": self.total,
            "usable": self.usable,
            "fits": self.fits,
        }


def model_config(train: TrainConfig) -> NVLMConfig:
    """The starting point's config: ``init``'s config.json (nothing else is read), else ``preset``; then
    ``arch``. An ``init`` that does not exist yet (the model of an earlier stage) needs ``preset`` to name it."""
    config = None
    if train.init:
        path = Path(train.init)
        if path.is_dir():
            config = from_json_file(model_dir(path) / "config.json")
        elif not train.preset:
            raise ValueError(f"{path}: no such directory (not trained yet?): name its model with --preset NAME")
    if config is None:
        if not train.preset:
            raise ValueError("say where training starts: init (an NVLM checkpoint) or preset")
        config = preset(train.preset)
    return config.with_arch(train.arch) if train.arch else config  # type: ignore[arg-type]


def meta_model(config: NVLMConfig, train: TrainConfig) -> NVLM:
    """The model on the meta device (no memory, no weights) with the recipe's trainable set marked."""
    with torch.device("meta"):
        model = NVLM(config)
    set_trainable(model, train.stage, train.trainable)
    if any(p.requires_grad for p in model.vision_model.encoder.parameters()):
        raise ValueError(
            "the memory plan counts a frozen ViT (as in both of the paper's stages); this recipe trains it"
        )
    return model


def count_units(model: NVLM, shard_group: int) -> list[Unit]:
    """Every FSDP2 unit of a (meta) model, blocks first and the root last, with its parameter elements."""
    return _units(_shapes(model), shard_group)


_Shapes = list[tuple[str, list[tuple[int, int, bool]]]]  # per unit: (dim-0 rows, elements, trained) per parameter


def _shapes(model: NVLM) -> _Shapes:
    def rows(params: Any) -> list[tuple[int, int, bool]]:
        return [(p.shape[0] if p.dim() else 1, p.numel(), p.requires_grad) for p in params]

    def params(unit: list[nn.Module]) -> list[nn.Parameter]:
        return list({id(p): p for m in unit for p in m.parameters()}.values())  # tied weights once

    below = units(model)
    in_units = {id(p) for unit in below for p in params(unit)}
    root = [p for p in model.parameters() if id(p) not in in_units]
    return [("+".join(type(m).__name__ for m in unit), rows(params(unit))) for unit in below] + [("root", rows(root))]


def _units(shapes: _Shapes, shard_group: int) -> list[Unit]:
    units = []
    for name, params in shapes:
        n, shard = [0, 0], [0, 0]  # [frozen, trained]
        for rows, numel, trained in params:
            n[trained] += numel
            shard[trained] += math.ceil(rows / shard_group) * (numel // max(rows, 1))  # FSDP2 pads dim 0
        units.append(Unit(name, n[True], n[False], shard[True], shard[False]))
    return units


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


@dataclass(frozen=True)
class Activations:
    """One micro-batch's activation bytes on one device, by where they sit."""

    blocks: tuple[int, ...]  # saved by each block (decoder layer, cross-attention block) for its backward
    working: tuple[int, ...]  # what each block's backward allocates while it runs
    boundaries: tuple[int, ...]  # what each block keeps when checkpointed: its inputs
    root: int  # saved outside the blocks: masks, memory, projector, final norm, lm_head input, log-softmax
    logits: int  # the (N, vocab) logits the loop holds, N the supervised positions
    head_backward: int  # the log-softmax's gradients in and out, at the start of backward
    vit: int  # the frozen ViT's forward working set (nothing saved)

    @property
    def saved(self) -> int:
        """What autograd holds at the end of the forward pass without checkpointing."""
        return sum(self.blocks) + self.root

    def peak(self, checkpointing: bool) -> int:
        """The forward's ViT pass, or the backward's start, or one block's backward (recomputed first when
        checkpointed), whichever is larger."""
        if checkpointing:
            recompute = max((s + w for s, w in zip(self.blocks, self.working, strict=True)), default=0)
            kept = sum(self.boundaries) + self.root + self.logits
            return max(self.vit, kept + max(self.head_backward, recompute))
        return max(self.vit, self.saved + self.logits + max([self.head_backward, *self.working]))


def _attention(layout: Layout, lm: Any, keys: int, out_trains: bool) -> tuple[int, int]:
    """(bytes per query token, bytes per key token) one masked cross-attention saves, taken block by block
    (each example's tokens and crops). Fused: q, the blocks' outputs, the mask converted to the compute dtype,
    the fp32 log-sum-exp; o_proj's input (the blocks' outputs concatenated) when it trains; k and v. Math
    (masked GQA on CUDA): q, and k and v repeated per head, in fp32, the fp32 probabilities, o_proj's input."""
    a, c = layout.compute, lm.hidden_size
    if layout.masked_gqa_math and lm.num_heads != lm.num_kv_heads:
        return 4 * c + 4 * lm.num_heads * keys + (a * c if out_trains else 0), 8 * c
    return 2 * a * c + a * keys + 4 * lm.num_heads, 2 * a * lm.num_kv_heads * lm.head_dim


def _self_attention(layout: Layout, lm: Any, out_trains: bool) -> tuple[int, int]:
    """(bytes per query token, bytes per key token) the decoder's attention saves: per document, causal and
    unmasked, a fused kernel on CPU and CUDA alike (flash takes GQA without a mask). q, each document's
    output, the fp32 log-sum-exp, o_proj's input (the outputs concatenated) when it trains; k and v."""
    a, c = layout.compute, lm.hidden_size
    return 2 * a * c + 4 * lm.num_heads + (a * c if out_trains else 0), 2 * a * lm.num_kv_heads * lm.head_dim


def count_activations(model: NVLM, train: TrainConfig, layout: Layout, supervised: float = 1.0) -> Activations:
    """The activations of one micro-batch for a (meta) model with its trainable set marked and ``train``
    resolved, counted tensor by tensor from what each module saves (see the module docstring). ``supervised``:
    the share of positions with a target, where the loop takes logits (1.0: every position, the most)."""
    config: NVLMConfig = model.config
    a = layout.compute
    lm, v = config.llm, config.vision
    c, f, d, h = lm.hidden_size, lm.intermediate_size, lm.head_dim, lm.num_heads
    kv = lm.num_kv_heads * d
    rows, t, tiles = train.micro_batch_size, train.schedule.seq_len, train.schedule.max_tiles
    tokens = rows * t
    math = layout.masked_gqa_math and h != lm.num_kv_heads
    crops = tiles + (1 if config.use_thumbnail and tiles > 1 else 0)
    arch = config.architecture
    seq_crops, mem_crops = arch.sequence_crops(crops), arch.memory_crops(crops)
    per_crop = config.tokens_per_tile
    mem = mem_crops * (per_crop + (_TAG_TOKENS if arch.tags_in_memory else 0))  # memory tokens per row
    llm = model.language_model
    projector_trains = _trains(model.mlp1)
    # gradients reach a block when it or anything before it trains; only then does it save anything
    flows = _trains(llm.model.embed_tokens) or (projector_trains and seq_crops > 0)
    before = (
        dict(zip(config.xattn.layer_indices(), getattr(model, "xattn_layers", []), strict=True))
        if arch.cross_attention
        else {}
    )
    blocks, working, boundaries = [], [], []
    root = 0
    fx = config.xattn.intermediate_size
    memory_trains = projector_trains or any(_trains(b) for b in before.values())
    for i, layer in enumerate(llm.model.layers):
        if i in before:
            # per text token: the norms' fp32 inputs (+ outputs and linear inputs when trained), the
            # attention, the attention and FFN outputs the gates scale, SwiGLU; per memory token: k and v
            w = _trains(before[i])
            flows = flows or w or projector_trains
            query, key = _attention(layout, lm, mem, w)
            text = 8 * c + (4 * a * c + 2 * a * c + 4 * a * fx if w else 3 * a * fx) + query + 3 * a + 8
            blocks.append(text * tokens + key * mem * rows)
            working.append(blocks[-1] + (4 * h * mem * tokens if math else 0))  # the probabilities' gradients
            boundaries.append(a * c * tokens + 2 * a * kv * mem * rows)  # x, and k and v computed outside
        w = _trains(layer)
        flows = flows or w
        if flows:
            # per token: each norm's fp32 input (+ its output and the linear's input when trained), the
            # attention, RoPE's cos and sin, SwiGLU
            query, key = _self_attention(layout, lm, w)
            per_token = 8 * c + (4 * a * c + 4 * a * f if w else 3 * a * f) + query + key + 2 * a * d + 8
            blocks.append(per_token * tokens)
            working.append(blocks[-1])
            boundaries.append((a * c + 2 * a * d) * tokens)  # x, cos and sin
    if before:
        root += (a * c * mem * rows if memory_trains else 0) + rows * t * mem  # memory embeddings, its boolean mask
    if projector_trains:
        p = config.projector
        per_token = 2 * a * p.input_size + (2 * a * p.hidden_size if p.num_layers == 2 else 0) + 2 * a
        root += per_token * per_crop * crops * rows
    vocab = lm.vocab_size
    head = 4 * c + a * c * (_trains(llm.model.norm) + _trains(llm.lm_head)) + 8
    scored = round(supervised * tokens)  # positions with a target: the lm_head runs on these only
    root += head * tokens + _F32 * vocab * scored  # final norm, lm_head input; the fp32 log-softmax, targets
    vit = (
        crops * rows * (v.num_patches + 1) * (a * (2 * v.intermediate_size + 4 * v.hidden_size) + _F32 * v.hidden_size)
    )
    return Activations(
        tuple(blocks), tuple(working), tuple(boundaries), root, a * vocab * scored, 2 * _F32 * vocab * scored, vit
    )


def plan(
    config: NVLMConfig,
    train: TrainConfig,
    devices: int,
    device_gib: float,
    devices_per_node: int = 8,
    hsdp: bool = False,
    cpu: bool | None = None,
    headroom: float | None = None,
    supervised: float = 1.0,
) -> MemoryPlan:
    """The per-device memory of ``train`` (its stage, trainable set, sequence, tiles, micro batch and
    checkpointing) for ``config`` on ``devices`` devices of ``device_gib`` GiB. ``hsdp`` shards within a node
    of ``devices_per_node`` and replicates across nodes; ``fsdp: false`` replicates everything. ``cpu``
    (default: the recipe's ``device: cpu``) counts gloo's fp32 layout; ``headroom`` defaults to 10% on GPU, 0 on CPU;
    ``supervised``: the share of positions with a target (default 1.0, the most logits a step can take)."""
    train = resolved(config, train)
    counted = _Counted.of(meta_model(config, train), train, supervised)
    return counted.plan(devices, device_gib, devices_per_node, hsdp, cpu, headroom)


def smallest_fit(
    config: NVLMConfig,
    train: TrainConfig,
    device_gib: float,
    devices_per_node: int = 8,
    hsdp: bool = False,
    cpu: bool | None = None,
    headroom: float | None = None,
    max_devices: int = 4096,
) -> MemoryPlan | None:
    """The plan on the fewest devices that fit: 1 to ``devices_per_node``, then whole nodes; None if even
    ``max_devices`` do not (with HSDP, if one node's shard group does not)."""
    train = resolved(config, train)
    counted = _Counted.of(meta_model(config, train), train)
    candidates = list(range(1, devices_per_node + 1))
    if not hsdp:
        candidates += list(range(2 * devices_per_node, max_devices + 1, devices_per_node))
    for n in (n for n in candidates if n <= max_devices):
        p = counted.plan(n, device_gib, devices_per_node, hsdp, cpu, headroom)
        if p.fits:
            return p
    return None


@dataclass(frozen=True)
class _Counted:
    """A recipe's parameter shapes per unit and its activations in both layouts: what plans are made of."""

    train: TrainConfig
    shapes: _Shapes
    activations: dict[Layout, Activations]

    @classmethod
    def of(cls, model: NVLM, train: TrainConfig, supervised: float = 1.0) -> _Counted:
        activations = {p: count_activations(model, train, p, supervised) for p in (CPU, GPU)}
        return cls(train, _shapes(model), activations)

    def plan(
        self,
        devices: int,
        device_gib: float,
        devices_per_node: int,
        hsdp: bool,
        cpu: bool | None,
        headroom: float | None,
    ) -> MemoryPlan:
        if devices < 1 or devices_per_node < 1 or device_gib <= 0 or not 0 <= (headroom or 0) < 1:
            raise ValueError(
                f"need devices >= 1, devices_per_node >= 1, device memory > 0 and 0 <= headroom < 1, "
                f"not {devices}, {devices_per_node}, {device_gib}, {headroom}"
            )
        train = self.train
        cpu = (train.device or "").startswith("cpu") if cpu is None else cpu
        layout = CPU if cpu else GPU
        group = 1 if not train.fsdp else (min(devices, devices_per_node) if hsdp else devices)
        units = _units(self.shapes, group)
        root, blocks = units[-1], units[:-1]
        trained = sum(u.trained_shard for u in units)
        frozen = sum(u.frozen_shard for u in units)
        acts = self.activations[layout]
        largest = max(
            (
                math.ceil(rows / group) * (numel // max(rows, 1))
                for _, params in self.shapes
                for rows, numel, trains in params
                if trains
            ),
            default=0,
        )
        transients = 0
        if not (cpu and devices == 1):  # one CPU process runs the model as it is, unsharded
            c, r = layout.compute, layout.reduce
            widest = max(blocks, key=lambda u: (u.total, u.trained), default=Unit("none", 0, 0, 0, 0))
            in_block = 2 * widest.total * c + 2 * r * widest.trained + c * root.trained
            transients = root.total * c + max(in_block, 2 * r * root.trained)
        return MemoryPlan(
            devices=devices,
            shard_group=group,
            device_gib=device_gib,
            cpu=cpu,
            activation_checkpointing=train.activation_checkpointing,
            params_total=sum(u.total for u in units),
            params_trained=sum(u.trained for u in units),
            parameters=trained * layout.master + frozen * layout.frozen,
            gradients=trained * _F32,
            optimizer=2 * trained * _F32,
            activations_ac=acts.peak(True),
            activations_no_ac=acts.peak(False),
            transients=transients,
            optimizer_step=_F32 * (trained if not cpu else 2 * largest),
            headroom=(0.0 if cpu else 0.1) if headroom is None else headroom,
        )


def resolved(config: NVLMConfig, train: TrainConfig) -> TrainConfig:
    """The recipe with the paper's defaults for its architecture and stage filled in (no data needed)."""
    return replace(train, data=train.data or [{"path": "(none)"}]).resolve(config.arch)


def format_table(p: MemoryPlan, fit: MemoryPlan | None, label: str) -> str:
    """The plan as a markdown table, with the smallest device count that fits."""
    gib = lambda b: f"{b / GIB:,.1f}"  # noqa: E731
    kind = "CPU processes" if p.cpu else "GPUs"
    count = lambda n: f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"  # noqa: E731
    lines = [
        f"{label}: {count(p.params_total)} parameters ({count(p.params_trained)} trained)",
        f"{p.devices} {kind} of {p.device_gib:g} GiB (shard group {p.shard_group}), per device:",
        "",
        "| | GiB |",
        "|---|---|",
    ]
    ac = "with" if p.activation_checkpointing else "without"
    rows = [
        ("parameters", p.parameters),
        ("gradients", p.gradients),
        ("optimizer (AdamW)", p.optimizer),
        ("activations, checkpointed", p.activations_ac),
        ("activations, not checkpointed", p.activations_no_ac),
        ("transients (unsharded units)", p.transients),
        ("optimizer step temporaries", p.optimizer_step),
        (f"**total** ({ac} activation checkpointing)", p.total),
    ]
    lines += [f"| {name} | {gib(b)} |" for name, b in rows]
    lines.append(f"| usable ({1 - p.headroom:.0%} of the device) | {gib(p.usable)} |")
    lines += ["", f"fits: {'yes' if p.fits else 'no'}"]
    if fit is None:
        lines.append("smallest fit: none (up to the device limit)")
    else:
        lines.append(f"smallest fit: {fit.devices} {kind} ({gib(fit.total)} GiB per device)")
    return "\n".join(lines)
