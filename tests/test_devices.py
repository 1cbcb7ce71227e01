"""Device placement: the card's split_model run as a placement (a forward over several devices' worth of
layers equals the forward on one), and the CPU default."""

import math
from dataclasses import replace

import pytest
import torch
from conftest import open_gates

from nvlm import preset
from nvlm.devices import resolve_device_map, split_model
from nvlm.pretrained import NVLM

LAYERS, GPUS = 8, 3


def _eight_layer_model(arch: str, tmp_path) -> tuple[NVLM, dict]:
    """A random tiny NVLM-D/X with 8 decoder layers, saved; the inputs of a prompt with one image (D: in the
    sequence; X: a memory crop every token reads)."""
    cfg = preset(f"tiny-{arch.lower()}")
    cfg = replace(
        cfg, llm=replace(cfg.llm, num_layers=LAYERS), xattn=replace(cfg.xattn, num_layers=2, interval=4)
    ).validate()
    torch.manual_seed(0)
    model = NVLM(cfg).eval()
    if arch != "D":
        open_gates(model)
    model.save_pretrained(tmp_path / arch)
    pixels = torch.randn(1, 3, cfg.tile_size, cfg.tile_size)
    if arch == "D":
        ids = torch.tensor([[1, 2] + [cfg.image_token_id] * cfg.tokens_per_tile + [3, 4]])
        return model, {"input_ids": ids, "pixel_values": pixels}
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    return model, {
        "input_ids": ids,
        "memory_pixel_values": pixels,
        "memory_crops": torch.tensor([1]),
        "cross_attention_mask": torch.ones(1, 6, 1, dtype=torch.bool),
    }


def test_split_model_places_the_72b_as_the_card_describes():
    """GPU 0 counts as half a GPU and also holds the ViT, projector, embeddings, norm, head and last layer."""
    for gpus in (2, 3, 4, 8):
        device_map = split_model(80, gpus)
        layers = [device_map[f"language_model.model.layers.{i}"] for i in range(80)]
        per_gpu = math.ceil(80 / (gpus - 0.5))
        assert layers[:-1] == sorted(layers[:-1]) and layers[-1] == 0  # contiguous runs, the last layer on 0
        counts = [layers[:-1].count(g) for g in range(gpus)]
        assert counts[0] == math.ceil(per_gpu / 2) and counts[1:-1] == [per_gpu] * (gpus - 2) and counts[-1] <= per_gpu
        for name in (
            "vision_model",
            "mlp1",
            "language_model.model.embed_tokens",
            "language_model.model.norm",
            "language_model.lm_head",
        ):
            assert device_map[name] == 0


@pytest.mark.parametrize("arch", ["D", "X"])
def test_split_model_placement_runs_the_same_forward(arch, tmp_path):
    """Every parameter of the model (X: cross-attention blocks with the layer they precede) has a place in the
    3-GPU map; loaded with that map's placement (each GPU's share on the CPU here, GPU 0 on CUDA and the rest on
    the CPU when a GPU is there) the model gives the single-device logits."""
    model, inputs = _eight_layer_model(arch, tmp_path)
    device_map = split_model(LAYERS, GPUS)
    lookup = resolve_device_map(model, device_map)
    placed = {name: lookup(name).index for name, _ in model.named_parameters()}  # raises if one has no place
    assert {placed[f"language_model.model.layers.{i}.mlp.up_proj.weight"] for i in range(LAYERS)} == {0, 1, 2}
    if arch == "X":
        assert placed["xattn_layers.1.attn_gate"] == placed["language_model.model.layers.4.mlp.up_proj.weight"] == 1
    gpu0 = "cuda:0" if torch.cuda.is_available() else "cpu"
    split = NVLM.from_pretrained(
        tmp_path / arch, dtype=torch.float32, device={k: gpu0 if v == 0 else "cpu" for k, v in device_map.items()}
    )
    if torch.cuda.is_available():
        assert {p.device.type for p in split.parameters()} == {"cuda", "cpu"}
    with torch.no_grad():
        want = model(**inputs).logits
        got = split(**{k: v.to(gpu0) for k, v in inputs.items()}).logits
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)


def test_device_map_lookup_uses_the_longest_prefix(nvlm_d_dir):
    model = NVLM.from_pretrained(nvlm_d_dir, device={"": "cpu"} | {"vision_model": "meta"})
    assert model.vision_model.embeddings.patch_embedding.weight.device.type == "meta"
    assert model.language_model.lm_head.weight.device.type == "cpu"
    lookup = resolve_device_map(model, {"language_model.model.layers.1": 1, "language_model": "cpu"})
    assert lookup("language_model.model.layers.1.mlp.up_proj.weight") == torch.device("cuda", 1)
    assert lookup("language_model.model.layers.10.mlp.up_proj.weight") == torch.device("cpu")
    with pytest.raises(ValueError, match="places no prefix"):
        lookup("mlp1.0.weight")


def test_cpu_default_keeps_everything_on_one_device(nvlm_d_dir):
    model = NVLM.from_pretrained(nvlm_d_dir, device="auto" if not torch.cuda.is_available() else "cpu")
    assert {p.device for p in model.parameters()} == {torch.device("cpu")}
