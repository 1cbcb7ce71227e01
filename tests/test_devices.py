"""Device placement: the card's split_model, and the CPU default."""

import math

import pytest
import torch

from nvlm.devices import resolve_device_map, split_model
from nvlm.models.nvlm import NVLM


def card_split_model(num_layers: int, world_size: int) -> dict:
    """The NVLM-D-72B model card's split_model, transcribed (GPU 0 counts as half a GPU)."""
    device_map = {}
    num_layers_per_gpu = math.ceil(num_layers / (world_size - 0.5))
    num_layers_per_gpu = [num_layers_per_gpu] * world_size
    num_layers_per_gpu[0] = math.ceil(num_layers_per_gpu[0] * 0.5)
    layer_cnt = 0
    for i, num_layer in enumerate(num_layers_per_gpu):
        for _ in range(num_layer):
            device_map[f"language_model.model.layers.{layer_cnt}"] = i
            layer_cnt += 1
    for name in ("vision_model", "mlp1", "language_model.model.embed_tokens", "language_model.model.norm",
                 "language_model.lm_head", f"language_model.model.layers.{num_layers - 1}"):  # fmt: skip
        device_map[name] = 0
    return device_map


@pytest.mark.parametrize("gpus", [2, 3, 4, 8])
def test_split_model_matches_the_card_for_72b(gpus):
    ours, card = split_model(80, gpus), card_split_model(80, gpus)
    card = {k: v for k, v in card.items() if not k.startswith("language_model.model.layers.") or int(k.rsplit(".", 1)[1]) < 80}
    assert ours == card
    assert all(f"language_model.model.layers.{i}" in ours for i in range(80))


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
