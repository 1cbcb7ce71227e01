"""Weight quantization while loading, through torchao: int8 and int4 weight-only, fp8 dynamic.

``NVLM.from_pretrained(dir, quantize="int8" | "int4" | "fp8")`` builds the model on the meta device and
quantizes each selected ``nn.Linear`` as soon as its weight arrives from the shard (``Quantizer.placed``):
only one layer is ever held in bfloat16, so the bf16 model never exists whole.

What is quantized by default (``DEFAULT_MODULES``): every linear of the decoder layers and of NVLM-X/H's
cross-attention blocks, which hold ~99% of the 72B's weights. The vision encoder, the projector, the
embeddings and ``lm_head`` stay in bfloat16: together ~7.5 GB of the 72B, they set what the LLM sees of an
image and what it writes, and a community build that quantized the vision encoder answered incoherently
about images. ``QuantConfig(modules=...)`` chooses otherwise (``("",)``: every linear).

Formats and their kernels (torchao 0.18, torch 2.13):

- ``int8``: ``Int8WeightOnlyConfig``, int8 weights with one scale per output row. CPU and CUDA.
- ``int4``: int4 weights in groups of 128 input channels (64 or 32 where the width needs), one bf16 scale and
  zero per group. CUDA (sm80+): ``Int4WeightOnlyConfig`` in tinygemm's tile-packed layout; CPU:
  ``PrototypeInt4WeightOnlyConfig`` (tinygemm's CPU kernel). A linear whose input width no group size
  divides stays in bfloat16.
- ``fp8``: ``Float8DynamicActivationFloat8WeightConfig`` (e4m3 weights and activations, per-row scales);
  CUDA of compute capability 8.9+ only: torchao has no fp8 kernel for the CPU, so fp8 on the CPU (or an
  older GPU) is a ``QuantizationError`` before anything loads.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from nvlm.devices import return_freed_memory

if TYPE_CHECKING:
    from nvlm.models.nvlm import NVLMModel

FORMATS = ("int8", "int4", "fp8")
DEFAULT_MODULES = ("language_model.model.layers", "xattn_layers")
INT4_GROUP_SIZES = (128, 64, 32)


class QuantizationError(ValueError):
    """A quantization that cannot run here: unknown format, no torchao, no kernel for the device or dtype."""


@dataclass(frozen=True)
class QuantConfig:
    """``format`` ("int8", "int4" or "fp8") applied to the ``nn.Linear`` modules under ``modules`` (module-name
    prefixes, matched at dots; ``""`` matches every module)."""

    format: str
    modules: tuple[str, ...] = DEFAULT_MODULES

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise QuantizationError(f"quantize={self.format!r}: expected one of {', '.join(FORMATS)}")

    def selects(self, module: str) -> bool:
        return any(not p or module == p or module.startswith(p + ".") for p in self.modules)


def as_config(quantize: str | QuantConfig | None) -> QuantConfig | None:
    """``None``, a format name, or a ``QuantConfig`` -> the ``QuantConfig`` (or ``None``)."""
    return QuantConfig(quantize) if isinstance(quantize, str) else quantize


def add_quantize_argument(parser: argparse.ArgumentParser) -> None:
    """``--quantize {int8,int4,fp8}`` (the command-line form of ``from_pretrained(quantize=...)``)."""
    parser.add_argument(
        "--quantize",
        choices=FORMATS,
        default=None,
        help="quantize the decoder's linears while loading (torchao; int8/int4 also on CPU, fp8 on "
        "CUDA 8.9+); see docs/QUANTIZATION.md",
    )


def _torchao() -> Any:
    """torchao's ``quantize_`` entry points, imported without its warnings about absent CUDA-only libraries."""
    log = logging.getLogger("torchao")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import torchao.quantization as tq
    except ImportError:
        raise QuantizationError("quantization needs torchao: pip install 'nvlm[quant]'") from None
    finally:
        log.setLevel(level)
    return tq


def check_device(fmt: str, device: torch.device) -> None:
    """Raise ``QuantizationError`` unless torchao has a ``fmt`` kernel for ``device``."""
    if device.type == "cpu":
        if fmt == "fp8":
            raise QuantizationError(
                "quantize='fp8' needs a CUDA GPU of compute capability 8.9+ (H100, H200, L40S): "
                "torchao has no fp8 kernel for the CPU; use int8 or int4 there"
            )
        return
    if device.type != "cuda":
        raise QuantizationError(f"quantize={fmt!r} runs on the CPU or CUDA, not {device}")
    need = {"int8": (7, 0), "int4": (8, 0), "fp8": (8, 9)}[fmt]
    have = torch.cuda.get_device_capability(device)
    if have < need:
        raise QuantizationError(
            f"quantize={fmt!r} needs CUDA compute capability {need[0]}.{need[1]}+; {device} has {have[0]}.{have[1]}"
        )


def int4_group_size(in_features: int) -> int | None:
    """The int4 group: the largest of ``INT4_GROUP_SIZES`` dividing the input width (``None``: none does)."""
    return next((g for g in INT4_GROUP_SIZES if in_features % g == 0), None)


def torchao_config(fmt: str, linear: nn.Linear) -> Any:
    """The torchao config that quantizes ``linear`` (on its device) to ``fmt``; ``None``: it stays as it is."""
    tq = _torchao()
    if fmt == "int8":
        return tq.Int8WeightOnlyConfig(set_inductor_config=False)
    if fmt == "fp8":
        return tq.Float8DynamicActivationFloat8WeightConfig(granularity=tq.PerRow(), set_inductor_config=False)
    group = int4_group_size(linear.in_features)
    if group is None:
        return None
    if linear.weight.device.type == "cpu":
        from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

        return PrototypeInt4WeightOnlyConfig(group_size=group, set_inductor_config=False)
    return tq.Int4WeightOnlyConfig(group_size=group, int4_packing_format="tile_packed_to_4d", set_inductor_config=False)


def is_quantized(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is one of torchao's quantized weight tensors."""
    return hasattr(tensor, "tensor_data_names")


def storage_bytes(tensor: torch.Tensor) -> int:
    """Bytes a weight holds: a quantized one's data, scales and zeros; a plain one's elements."""
    if not is_quantized(tensor):
        return tensor.numel() * tensor.element_size()
    names = [*getattr(tensor, "tensor_data_names", ()), *(getattr(tensor, "optional_tensor_data_names", None) or ())]
    parts = [getattr(tensor, n, None) for n in names]
    return sum(storage_bytes(p) for p in parts if isinstance(p, torch.Tensor))


def quantized_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear modules whose weights are quantized, by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and is_quantized(m.weight)}


class Quantizer:
    """Quantizes the selected linears of a meta-built model one at a time, as the loader fills them.

    Construction checks everything that could fail (format, torchao, dtype, each target's device) before
    any tensor is read. ``placed(name)`` after each parameter is put in place quantizes its linear once the
    weight is real; ``finish()`` quantizes what was initialised fresh rather than loaded (a converted
    architecture's new blocks); the loader then marks the model with ``model.quantization``.

    Memory: a kept (not quantized) CPU tensor is copied out of the shard, as a tensor read in its own dtype
    may still point into the shard's memory map and would keep the whole shard resident; and glibc is told to
    return freed blocks (``return_freed_memory``), or the bf16 weight and torchao's temporaries of every layer
    stay in its heap. Then the peak is the quantized model plus about one shard (docs/BENCHMARKS.md).
    """

    def __init__(
        self, model: NVLMModel, config: QuantConfig, device_of: Callable[[str], torch.device], dtype: torch.dtype
    ) -> None:
        if dtype != torch.bfloat16:
            raise QuantizationError(f"quantize={config.format!r} runs on bfloat16 weights; got dtype {dtype}")
        _torchao()
        self.model, self.config = model, config
        tied = model.config.llm.tie_word_embeddings
        self.targets = {
            f"{n}.weight": n
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and config.selects(n) and not (tied and n == "language_model.lm_head")
        }
        for device in {device_of(w) for w in self.targets}:
            check_device(config.format, device)
        return_freed_memory()

    def placed(self, name: str) -> None:
        """``name`` (a parameter) was just put in place: quantize its linear if it is a target."""
        module_name = self.targets.pop(name, None)
        if module_name is not None:
            linear = self.model.get_submodule(module_name)
            assert isinstance(linear, nn.Linear)  # the targets are linears
            self._quantize(linear)
            return
        owner, _, attr = name.rpartition(".")
        param = self.model.get_submodule(owner)._parameters[attr]
        if param is not None and param.device.type == "cpu":
            param.data = param.data.clone()  # out of the shard's memory map

    def _quantize(self, linear: nn.Linear) -> None:
        cfg = torchao_config(self.config.format, linear)
        if cfg is not None:
            _torchao().quantize_(linear, cfg)

    def finish(self) -> None:
        for name in list(self.targets):
            self.placed(name)
