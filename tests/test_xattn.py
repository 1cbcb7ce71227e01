"""NVLM-X and NVLM-H: gated cross-attention, their sequences and masks, cached decoding, checkpoints."""

import json
from pathlib import Path

import pytest
import torch
from conftest import IMAGE_TOKEN_ID, open_gates
from PIL import Image
from reference.gated_xattn import gated_xattn_block

from nvlm import NVLM, Processor, preset
from nvlm.models.llm import documents
from nvlm.models.xattn import GatedCrossAttentionBlock, memory_blocks

WIDE = Image.new("RGB", (200, 90), (30, 90, 200))  # 2x1 tiles + thumbnail at 56 px
SMALL = Image.new("RGB", (50, 50), (200, 10, 10))  # one crop


def _conv(*parts):
    content = [
        {"type": "image", "image": p} if isinstance(p, Image.Image) else {"type": "text", "text": p} for p in parts
    ]
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def converted(tiny_model_dir, tmp_path_factory):
    """arch -> (model with gates at 0, saved dir of a copy with open gates and its processor)."""
    out = {}
    for arch in "XH":
        closed = NVLM.from_pretrained(tiny_model_dir, arch=arch)
        opened = NVLM.from_pretrained(tiny_model_dir, arch=arch)
        torch.manual_seed(0)
        open_gates(opened)
        path = tmp_path_factory.mktemp(f"nvlm-{arch}") / "model"
        opened.save_pretrained(path)
        out[arch] = closed, NVLM.from_pretrained(path), Processor.from_pretrained(path)
    return out


@pytest.mark.parametrize("arch", "XH")
def test_presets_and_config_json(arch, converted, tmp_path):
    big = preset(f"nvlm-{arch.lower()}-72b")
    assert big.xattn.layer_indices() == tuple(range(0, 80, 8))
    assert preset(f"nvlm-{arch.lower()}-34b").xattn.layer_indices() == tuple(range(0, 60, 6))
    assert big.projector.num_layers == (1 if arch == "X" else 2) and big.projector.input_size == 12800
    with torch.device("meta"):
        model = NVLM(big)
    assert len(model.xattn_layers) == 10 and model.mlp1[-1].out_features == 8192
    _, opened, _ = converted[arch]
    cfg = json.loads((Path(opened.name_or_path) / "config.json").read_text())
    assert cfg["architectures"] == [f"NVLM_{arch}"] and "auto_map" not in cfg and "xattn_config" in cfg


@pytest.mark.parametrize("arch", "XH")
def test_conversion_from_nvlm_d_copies_shared_weights(arch, converted, tiny_model_dir):
    d = NVLM.from_pretrained(tiny_model_dir).state_dict()
    closed = converted[arch][0]
    for name, tensor in closed.state_dict().items():
        if name.startswith(("vision_model.", "language_model.")) or (arch == "H" and name.startswith("mlp1.")):
            assert torch.equal(tensor, d[name]), name
    assert all(b.attn_gate.item() == 0 and b.ffn_gate.item() == 0 for b in closed.xattn_layers)
    assert (len(closed.mlp1) == 2) == (arch == "X")


def test_x_with_closed_gates_is_its_text_llm(converted, reference):
    closed, _, processor = converted["X"]
    inputs = processor.apply_chat_template(_conv("look", WIDE, "and", SMALL, "what?"))
    assert "pixel_values" not in inputs and inputs["memory_pixel_values"].shape[0] == 3 + 1
    assert not (inputs["input_ids"] == IMAGE_TOKEN_ID).any()  # no image token in the decoder sequence
    ours = closed(**inputs).logits
    torch.testing.assert_close(ours, reference.logits(inputs["input_ids"], IMAGE_TOKEN_ID), atol=1e-4, rtol=1e-4)


def test_h_with_closed_gates_is_nvlm_d_with_the_thumbnail(converted, reference):
    closed, _, processor = converted["H"]
    inputs = processor.apply_chat_template(_conv("look", WIDE, "and", SMALL, "what?"))
    # thumbnails in the sequence (one per image), the two regular tiles of WIDE in the memory
    assert inputs["pixel_values"].shape[0] == 2 and inputs["memory_pixel_values"].shape[0] == 2
    assert int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum()) == 2 * 4
    ref = reference.logits(inputs["input_ids"], IMAGE_TOKEN_ID, inputs["pixel_values"])
    torch.testing.assert_close(closed(**inputs).logits, ref, atol=1e-4, rtol=1e-4)


def test_h_single_tile_image_has_only_its_thumbnail(converted):
    _, _opened, processor = converted["H"]
    inputs = processor.apply_chat_template(_conv(SMALL, "what?"))
    assert "memory_pixel_values" not in inputs and inputs["pixel_values"].shape[0] == 1


@pytest.mark.parametrize("arch", "XH")
def test_open_gates_tiles_change_output_text_before_images_does_not(arch, converted):
    _, opened, processor = converted[arch]
    inputs = processor.apply_chat_template(_conv("before", WIDE, "after"))
    ids = inputs["input_ids"][0].tolist()
    first_image = processor.tokenizer.encode("<Image")[0]
    start = ids.index(first_image)
    other = dict(inputs, memory_pixel_values=inputs["memory_pixel_values"].flip(-1) + 0.5)
    a, b = opened(**inputs).logits[0], opened(**other).logits[0]
    assert torch.equal(a[:start], b[:start])  # text before any image: exactly untouched
    assert not torch.allclose(a[-1], b[-1], atol=1e-3)  # text after the image reads its tiles
    assert not a.isnan().any()


def test_a_token_after_two_images_reads_both(converted):
    _, opened, processor = converted["X"]
    inputs = processor.apply_chat_template(_conv(WIDE, SMALL, "which?"))
    mask = inputs["cross_attention_mask"][0]
    assert mask[-1].all()  # the last token reads every crop of both images
    base = opened(**inputs).logits[0, -1]
    for crops in (slice(0, 3), slice(3, 4)):  # WIDE's 3 crops, SMALL's 1
        pix = inputs["memory_pixel_values"].clone()
        pix[crops] = -pix[crops]
        assert not torch.allclose(opened(**dict(inputs, memory_pixel_values=pix)).logits[0, -1], base, atol=1e-4)


def test_x_tag_tokens_read_only_their_tile(converted):
    processor = converted["X"][2]
    enc = processor.encode("q <image> a", [3])  # tiles 1, 2 and the thumbnail
    spans = {tag: enc.text.index(tag) for tag in ("<tile_1>", "<tile_2>", "<tile_global_thumbnail>")}
    for k, (tag, start) in enumerate(spans.items()):
        inside = [t for t, (s, e) in enumerate(enc.offsets) if s >= start + 1 and e <= start + len(tag) - 1]
        assert inside, tag
        for t in inside:  # tokens wholly inside the tag (not the `><` merged with a neighbour)
            assert enc.cross_attention_mask[t].nonzero().flatten().tolist() == [k], tag
    before = [t for t, (s, e) in enumerate(enc.offsets) if e <= enc.text.index("<Image>")]
    assert not enc.cross_attention_mask[before].any()
    assert enc.cross_attention_mask[-1].all()


def _open_block() -> tuple:
    """tiny-x's config and a seeded cross-attention block with both gates open and a non-unit norm."""
    cfg = preset("tiny-x")
    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(cfg.llm, cfg.xattn)
    with torch.no_grad():
        block.attn_gate.fill_(0.9)
        block.ffn_gate.fill_(-0.4)
        block.attn_norm.weight.uniform_(0.5, 1.5)
    return cfg, block


def test_block_matches_a_naive_reference():
    cfg, block = _open_block()
    x, memory = torch.randn(2, 5, 64), torch.randn(2, 12, 64)
    reads = torch.rand(2, 5, 12) > 0.5
    reads[0, 0] = False  # reads nothing
    reads[1, 2] = False
    ours, kv = block(x, memory, reads[:, None])
    assert torch.equal(block(x, memory, reads[:, None], kv)[0], ours)
    ref = gated_xattn_block(
        {n: p.detach() for n, p in block.named_parameters()},
        x,
        memory,
        reads,
        cfg.llm.num_heads,
        cfg.llm.num_kv_heads,
        cfg.llm.rms_norm_eps,
    )
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(ours[0, 0], x[0, 0]) and torch.equal(ours[1, 2], x[1, 2])


@pytest.mark.parametrize("arch", "XH")
def test_cached_decoding_equals_recomputing(arch, converted):
    _, opened, processor = converted[arch]
    inputs = processor.apply_chat_template(_conv("see", WIDE, "now", SMALL, "say"))
    new = opened.generate(**inputs, max_new_tokens=6, eos_token_id=[])[0]
    ids, xmask = inputs["input_ids"], inputs["cross_attention_mask"]
    for step in range(len(new)):
        # new tokens come after every image: they read all of their row's crops
        more = xmask[:, -1:].expand(-1, step, -1)
        full = dict(
            inputs,
            input_ids=torch.cat([ids, new[None, :step]], 1),
            attention_mask=torch.ones(1, ids.shape[1] + step, dtype=torch.long),
            cross_attention_mask=torch.cat([xmask, more], 1),
        )
        assert int(opened(**full).logits[0, -1].argmax()) == int(new[step])


@pytest.mark.parametrize("arch", "XH")
def test_batch_with_different_numbers_of_images_equals_one_by_one(arch, converted):
    _, opened, processor = converted[arch]
    convs = [_conv(WIDE, "two", SMALL, "images"), _conv("no image at all, a longer prompt"), _conv(SMALL, "one")]
    batch = opened.generate(**processor.apply_chat_template(convs), max_new_tokens=5, eos_token_id=[])
    for i, conv in enumerate(convs):
        alone = opened.generate(**processor.apply_chat_template(conv), max_new_tokens=5, eos_token_id=[])
        assert batch[i].tolist() == alone[0].tolist()


@pytest.mark.parametrize("arch", "XH")
def test_save_load_round_trip_is_bit_identical(arch, converted, tmp_path):
    _, opened, processor = converted[arch]
    opened.save_pretrained(tmp_path / "again", processor=processor)
    again = NVLM.from_pretrained(tmp_path / "again")
    a, b = opened.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    inputs = processor.apply_chat_template(_conv(WIDE, "q"))
    assert torch.equal(opened(**inputs).logits, again(**inputs).logits)


def test_memory_without_a_mask_is_an_error(converted):
    _, opened, processor = converted["X"]
    inputs = processor.apply_chat_template(_conv(WIDE, "q"))
    inputs.pop("cross_attention_mask")
    with pytest.raises(ValueError, match="cross_attention_mask"):
        opened(**inputs)


@pytest.mark.parametrize("arch", "XH")
def test_chat_streams_answers_about_an_image(arch, converted, tmp_path):
    from nvlm import Chat

    _, opened, processor = converted[arch]
    chat = Chat(opened, processor, max_new_tokens=4)
    WIDE.save(tmp_path / "wide.png")
    first = chat.ask("what is this?", [str(tmp_path / "wide.png")])
    assert isinstance(first, str) and len(chat.messages) == 2
    assert isinstance(chat.ask("and now?"), str)


def test_packed_rows_read_block_by_block_as_the_naive_reference():
    """Per-document cross-attention (``memory_blocks``): two examples packed in a row, each reading only its
    own crops (some of its tokens none), and a row that ends in padding: the naive reference's outputs, and
    the full-mask path's gradients."""
    cfg, block = _open_block()
    x, memory = torch.randn(2, 9, 64, requires_grad=True), torch.randn(2, 12, 64)
    docs = torch.tensor([[1, 1, 1, 1, 2, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1, 0, 0, 0]])
    reads = torch.zeros(2, 9, 12, dtype=torch.bool)
    reads[0, 1:4, :5] = True  # example 1's tokens after its image read its crops 0-4
    reads[0, 6:9, 5:11] = True  # example 2's last tokens read 5-10; its first two read nothing
    reads[0, 7, 8:11] = False
    reads[1, 2:6, :7] = torch.rand(4, 7) > 0.3
    blocks = memory_blocks(documents(docs), reads[:, None])
    assert blocks is not None and blocks[0] == ((0, 4, 0, 5), (4, 9, 5, 11))
    ours, _ = block(x, memory, reads[:, None], blocks=blocks)
    params = {n: p.detach() for n, p in block.named_parameters()}
    ref = gated_xattn_block(
        params, x.detach(), memory, reads, cfg.llm.num_heads, cfg.llm.num_kv_heads, cfg.llm.rms_norm_eps
    )
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    (g_blocks,) = torch.autograd.grad(ours.square().sum(), x)
    (g_full,) = torch.autograd.grad(block(x, memory, reads[:, None])[0].square().sum(), x)
    torch.testing.assert_close(g_blocks, g_full, atol=1e-5, rtol=1e-5)
    overlap = reads.clone()
    overlap[0, 2, 6] = True  # example 1 reads into example 2's crops: one block per row cannot say it
    assert memory_blocks(documents(docs), overlap[:, None]) is None
    # a sharded rank's blank memory, read by no token: the full mask, so that k_proj and v_proj get gradients
    assert memory_blocks(documents(docs), torch.zeros_like(reads)[:, None]) is None
