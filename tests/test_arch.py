"""``nvlm.arch``: what each architecture does with an image's crops (spec sections 3-6)."""

import pytest
import torch

from nvlm.arch import ARCHITECTURES, architecture
from nvlm.hf_config import to_hf
from nvlm.models.nvlm import NVLMModel
from nvlm.presets import preset

TAGS = ["<t1>", "<t2>", "<g>"]  # two tiles, then the thumbnail


@pytest.mark.parametrize(("arch", "sequence", "memory"), [("D", 3, 0), ("X", 0, 3), ("H", 1, 2)])
def test_where_the_crops_go(arch: str, sequence: int, memory: int) -> None:
    a = architecture(arch)
    assert (a.sequence_crops(3), a.memory_crops(3)) == (sequence, memory)
    crops = torch.arange(3)
    seq, mem = a.split_crops(crops)
    assert seq.tolist() == list(range(memory, 3)) and mem.tolist() == list(range(memory))
    lone = a.split_crops(torch.arange(1))  # a one-crop image: its crop is its thumbnail
    assert [len(x) for x in lone] == ([1, 0] if a.thumbnail_in_sequence else [0, 1])
    assert a.cross_attention == (memory > 0)


def test_the_text_of_an_image() -> None:
    text = {n: "".join(p for p, _ in a.image_pieces(TAGS, "<I>", "</I>", "pp")) for n, a in ARCHITECTURES.items()}
    assert text == {"D": "<I><t1>pp<t2>pp<g>pp</I>", "X": "<I><t1><t2><g></I>", "H": "<I><g>pp</I>"}
    own = [(p, k) for p, k in architecture("X").image_pieces(TAGS, "<I>", "</I>", "pp") if k is not None]
    assert own == [("<t1>", 0), ("<t2>", 1), ("<g>", 2)]  # X: each tag reads its own crop
    assert all(k is None for n in "DH" for _, k in architecture(n).image_pieces(TAGS, "<I>", "</I>", "pp"))


@pytest.mark.parametrize("name", ["D", "X", "H"])
def test_the_model_and_config_follow_it(name: str) -> None:
    cfg = preset(f"tiny-{name.lower()}")
    a = cfg.architecture
    assert a.name == name and cfg.projector.num_layers == a.projector_layers
    assert hasattr(NVLMModel(cfg), "xattn_layers") == a.cross_attention
    assert to_hf(cfg)["architectures"] == [a.hf_names[0]] and ("auto_map" in to_hf(cfg)) == a.released


def test_an_unknown_name_is_refused() -> None:
    with pytest.raises(ValueError, match="D, X or H"):
        architecture("Y")
