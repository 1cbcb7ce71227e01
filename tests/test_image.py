"""ImageProcessor against the model card's load_image, and load_image's errors on bad input."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from nvlm.image import ImageError, ImageProcessor, load_image
from reference.model_card import dynamic_preprocess, load_image as card_load_image


def _noise(w, h, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return img if mode == "RGB" else img.convert(mode)


# Exact aspect-ratio ties between a grid and its multiples ((1,1)~(2,2), (2,1)~(4,2), ...) on both sides of
# the area rule (the larger grid wins only above half its area: 79.2 px square for (2,2) at 56 px).
TIE_SIZES = [(70, 70), (79, 79), (80, 80), (120, 120), (112, 56), (158, 79), (160, 80), (56, 112), (80, 160),
             (168, 56), (240, 80), (300, 100)]  # fmt: skip


SIZES_SMALL_TILES = [(1, 1), (1, 500), (500, 1), (56, 56), (57, 56), (112, 56), (56, 168), (300, 40), (40, 300),
                     (100, 99), (99, 100), (168, 112), (33, 77), (400, 300), (1000, 90)]  # fmt: skip


@pytest.mark.parametrize("tile, max_tiles, thumb", [(56, 6, True), (56, 12, True), (56, 6, False), (56, 1, True), (28, 4, True)])
def test_equals_the_card_on_many_sizes(tile, max_tiles, thumb):
    proc = ImageProcessor(tile, max_tiles, thumb)
    for i, (w, h) in enumerate(SIZES_SMALL_TILES + TIE_SIZES):
        img = _noise(w, h, seed=i)
        ours = proc(img)
        card = card_load_image(img, input_size=tile, max_num=max_tiles, use_thumbnail=thumb)
        assert ours.dtype == torch.float32 and torch.equal(ours, card), (w, h)
        assert ours.shape[0] == proc.num_crops(w, h)


@pytest.mark.parametrize("size", [(448, 448), (1000, 400), (300, 900), (449, 448), (1344, 896)])
def test_equals_the_card_at_448(size):
    img = _noise(*size)
    assert torch.equal(ImageProcessor()(img), card_load_image(img))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "1", "I", "I;16", "F", "YCbCr", "HSV"])
def test_equals_the_card_in_every_mode(mode):
    img = _noise(130, 70, mode)
    assert img.mode == mode
    assert torch.equal(ImageProcessor(56)(img), card_load_image(img, input_size=56))


def test_sixteen_bit_png_file(tmp_path):
    arr = (np.arange(90 * 60, dtype=np.uint16).reshape(60, 90) * 7).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    img = load_image(path)
    assert img.mode.startswith("I")
    assert torch.equal(ImageProcessor(56)(img), card_load_image(str(path), input_size=56))


def test_grid_rules():
    proc = ImageProcessor(448, 6)
    assert proc.grid(448, 448) == (1, 1) and proc.num_crops(448, 448) == 1  # one tile: no thumbnail
    assert proc.grid(900, 448) == (2, 1) and proc.num_crops(900, 448) == 3  # 2 tiles + thumbnail
    assert proc.grid(10_000, 100) == (6, 1) and proc.grid(100, 10_000) == (1, 6)
    # a 1:1 image ties (1,1), (2,2); the larger grid wins only above half its area
    assert proc.grid(600, 600) == (1, 1) and proc.grid(700, 700) == (2, 2)
    assert len(proc.grids) == 14  # the 14 ratios of the paper for 6 tiles
    card_grids = [(t.size) for t in dynamic_preprocess(_noise(900, 448), image_size=448)]
    assert card_grids == [(448, 448), (448, 448)]


def test_thumbnail_is_last_and_crops_are_row_major():
    img = _noise(112, 56)  # a 2x1 grid at 56 px
    crops = ImageProcessor(56)(img)
    assert crops.shape == (3, 3, 56, 56)
    left = ImageProcessor(56, max_tiles=1)(img.resize((112, 56)).crop((0, 0, 56, 56)))
    thumb = ImageProcessor(56, max_tiles=1)(img.resize((56, 56)))
    assert torch.equal(crops[0], left[0]) and torch.equal(crops[2], thumb[0])


# ---------------------------------------------------------------------------------------------- bad input


def _png_header_only(w, h):
    """A PNG whose IHDR declares w x h, with one tiny compressed row of data: a decompression bomb shape."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="nope.png: no such image file"):
        load_image(tmp_path / "nope.png")


def test_not_an_image(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("hello, I am text")
    with pytest.raises(ImageError, match="notes.png: not an image"):
        load_image(p)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(tmp_path, fmt):
    buf = io.BytesIO()
    _noise(200, 200).save(buf, fmt)
    p = tmp_path / f"cut.{fmt.lower()}"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match=f"cut.{fmt.lower()}: (truncated|unreadable)"):
        load_image(p)


def test_zero_sized_image(tmp_path):
    with pytest.raises(ImageError, match=r"zero-sized image \(0x5\)"):
        load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(ImageError, match="image"):
        load_image(_png_header_only(0, 10))


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    p = tmp_path / "bomb.png"
    p.write_bytes(_png_header_only(30_000, 30_000))
    assert p.stat().st_size < 200
    with pytest.raises(ImageError, match=r"bomb.png: (30000x30000|too many pixels)"):
        load_image(p)
    with pytest.raises(ImageError, match="over the limit of 1000"):
        load_image(_noise(50, 50), max_pixels=1000)


def test_bytes_and_pil_inputs_load():
    buf = io.BytesIO()
    _noise(60, 40).save(buf, "PNG")
    assert load_image(buf.getvalue()).size == (60, 40)
    img = _noise(10, 10)
    assert load_image(img) is img
