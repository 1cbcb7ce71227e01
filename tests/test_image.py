"""nvlm.image against the model card's load_image (tests/reference/model_card.py): bit for bit, and bad input."""

import io
import multiprocessing
import struct
import sys
import threading
import time
import zlib
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))  # `reference.*`, as conftest does

import itertools

from reference.model_card import dynamic_preprocess, find_closest_aspect_ratio
from reference.model_card import load_image as card_load_image

import nvlm.image as nvlm_image
from nvlm.image import DEFAULT_MAX_PIXELS, ImageError, ImageProcessor, load_image
from nvlm.presets import preset

RNG = np.random.default_rng(1234)


def noise(w: int, h: int) -> Image.Image:
    """Seeded noise plus a gradient: every resize filter tap matters."""
    x = RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)
    x[..., 0] = (x[..., 0] // 2 + np.linspace(0, 127, w, dtype=np.uint8)[None, :]).astype(np.uint8)
    return Image.fromarray(x)


def assert_matches_card(image: Image.Image, tile: int = 448, max_tiles: int = 6, thumb: bool = True) -> torch.Tensor:
    want = card_load_image(image, input_size=tile, max_num=max_tiles, use_thumbnail=thumb)
    got = ImageProcessor(tile, max_tiles, thumb)(image)
    assert got.dtype == torch.float32 and got.is_contiguous()
    assert got.shape == want.shape, (image.size, image.mode)
    assert torch.equal(got, want), (image.size, image.mode, (got - want).abs().max())
    return got


# ------------------------------------------------------------------ bit-identical to the card


@pytest.mark.parametrize("size", [(448, 448), (640, 480), (1000, 800), (500, 1600), (1, 1), (3000, 90)])
def test_matches_card_at_448(size):
    assert_matches_card(noise(*size))


SMALL_SIZES = [
    (1, 1),
    (1, 500),
    (500, 1),
    (2, 3),
    (55, 56),
    (56, 56),
    (57, 56),
    (56, 57),
    (79, 79),
    (80, 80),
    (112, 56),
    (56, 112),
    (168, 112),
    (300, 40),
    (40, 300),
    (123, 77),
    (77, 123),
    (200, 200),
    (400, 70),
    (1000, 30),
    (30, 1000),
    (333, 111),
]


@pytest.mark.parametrize("max_tiles,thumb", [(6, True), (12, True), (12, False), (1, True), (2, True)])
def test_matches_card_small_tiles(max_tiles, thumb):
    for size in SMALL_SIZES:
        assert_matches_card(noise(*size), tile=56, max_tiles=max_tiles, thumb=thumb)


def tie_sizes(tile: int, max_tiles: int) -> list[tuple[int, int]]:
    """Sizes whose aspect is exactly as far from two candidate ratios (or equal to a ratio several grids
    share, 1:1 = 2:2), with areas just under and just over each of those grids' thresholds."""
    grids = ImageProcessor(tile, max_tiles).grids
    ratios = sorted({Fraction(i, j) for i, j in grids})
    out = {(1, 1)}
    for lo, hi in [*itertools.pairwise(ratios), *((r, r) for r in ratios)]:
        mid = (lo + hi) / 2
        w0, h0 = mid.numerator, mid.denominator
        if abs(w0 / h0 - lo) != abs(w0 / h0 - hi):
            continue  # not a tie in floating point
        for i, j in grids:
            if Fraction(i, j) in (lo, hi):
                k = max(1, int((0.5 * tile * tile * i * j / (w0 * h0)) ** 0.5))  # area just under the threshold
                out |= {(w0 * k, h0 * k), (w0 * (k + 1), h0 * (k + 1))}
    return sorted(out)


def test_tie_sizes_are_ties():
    sizes = tie_sizes(56, 6)
    assert any(w * 4 == h * 5 for w, h in sizes)  # 5:4 sits halfway between 1:1 and 3:2
    proc = ImageProcessor(56, 6)
    by_aspect: dict[Fraction, set] = {}
    for w, h in sizes:
        by_aspect.setdefault(Fraction(w, h), set()).add(proc.grid(w, h))
    assert sum(len(g) > 1 for g in by_aspect.values()) >= 5  # one aspect, different grids by area
    assert proc.grid(79, 79) == (1, 1) and proc.grid(80, 80) == (2, 2)


@pytest.mark.parametrize("max_tiles", [6, 12])
def test_matches_card_on_aspect_ties(max_tiles):
    for size in tie_sizes(56, max_tiles):
        if size[0] * size[1] <= 250_000:
            assert_matches_card(noise(*size), tile=56, max_tiles=max_tiles)


def card_ratios(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """The candidate list exactly as the card's dynamic_preprocess builds it."""
    target_ratios = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num
    )
    return sorted(target_ratios, key=lambda x: x[0] * x[1])


def test_grid_tie_rule_matches_card():
    for tile, max_tiles in [(448, 6), (56, 6), (56, 12), (14, 9)]:
        proc = ImageProcessor(tile, max_tiles)
        assert proc.grids == card_ratios(1, max_tiles)  # same order, equal-area grids included
        for w, h in tie_sizes(tile, max_tiles) + SMALL_SIZES:
            want = find_closest_aspect_ratio(w / h, card_ratios(1, max_tiles), w, h, tile)
            assert proc.grid(w, h) == tuple(want), (tile, max_tiles, w, h)


def _mode_images() -> dict[str, Image.Image]:
    base = noise(150, 100)
    u16 = RNG.integers(0, 65536, (100, 150), dtype=np.uint16)
    images = {
        m: base.convert(m)
        for m in ["RGBA", "L", "LA", "P", "PA", "CMYK", "1", "I", "F", "RGBX", "RGBa", "YCbCr", "LAB", "HSV"]
    }
    rgba = np.asarray(base.convert("RGBA")).copy()
    rgba[..., 3] = RNG.integers(0, 256, (100, 150), dtype=np.uint8)  # real transparency
    images["RGBA+alpha"] = Image.fromarray(rgba)
    images["I;16"] = Image.fromarray(u16)
    images["I;16B"] = Image.fromarray(u16).convert("I;16B")
    assert (images["I;16"].mode, images["I;16B"].mode) == ("I;16", "I;16B")
    images["I wide"] = Image.fromarray(RNG.integers(-70000, 70000, (100, 150), dtype=np.int32))
    images["F wide"] = Image.fromarray(RNG.normal(100, 300, (100, 150)).astype(np.float32))
    p = base.convert("P")
    p.info["transparency"] = 0
    images["P+transparency"] = p
    return images


@pytest.mark.parametrize("name,image", list(_mode_images().items()))
def test_matches_card_for_modes(name, image):
    assert_matches_card(image, tile=56, max_tiles=6)


def test_matches_card_for_mode_at_448():
    assert_matches_card(noise(700, 500).convert("P"))
    assert_matches_card(Image.fromarray(RNG.integers(0, 65536, (500, 700), dtype=np.uint16)))


def test_files_match_card_end_to_end(tmp_path):
    """load_image + ImageProcessor on a file equals the card's load_image on the same path."""
    deep = Image.fromarray(RNG.integers(0, 65536, (60, 90), dtype=np.uint16))  # a 16-bit PNG
    files = {
        "a.png": noise(130, 70),
        "b.jpg": noise(90, 200),
        "c.jpg": noise(90, 60).convert("CMYK"),
        "d.gif": noise(120, 120).convert("P"),
        "e.png": noise(100, 60).convert("LA"),
        "f.png": deep,
    }
    for name, image in files.items():
        path = tmp_path / name
        image.save(path)
        want = card_load_image(str(path), input_size=56)
        for source in (path, str(path), path.read_bytes()):
            assert torch.equal(ImageProcessor(56)(load_image(source)), want), name
        assert torch.equal(ImageProcessor(56)(Image.open(path)), want), name  # lazily opened, not yet decoded


# ------------------------------------------------------------------ the banded resize


@pytest.fixture
def bands_always(monkeypatch):
    """Every resize, however small, runs as bands (3 of them: uneven cuts), as 448-px images do."""
    monkeypatch.setattr(nvlm_image, "BAND_MIN_PIXELS", 0)
    monkeypatch.setattr(nvlm_image, "_THREADS", 3)


def test_installed_pillow_pass_order_is_known():
    assert nvlm_image._pass_order() is not None, "no rule fits this Pillow: every resize runs as one PIL call"


def _resize(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """The bands of a _Resize put together; each pixel covered exactly once."""
    r = nvlm_image._Resize(image, size)
    r.second_pass()
    out, hits = np.zeros((size[1], size[0], 3), np.uint8), np.zeros((size[1], size[0]), int)
    for band, y0, x0 in r.bands():
        out[y0 : y0 + band.shape[0], x0 : x0 + band.shape[1]] = band
        hits[y0 : y0 + band.shape[0], x0 : x0 + band.shape[1]] += 1
    assert (hits == 1).all()
    return out


def test_banded_resize_is_pils_resize(bands_always):
    rule = nvlm_image._pass_order()
    cases = [
        (640, 480, 168, 112),
        (300, 200, 56, 56),
        (40, 120, 56, 336),
        (120, 40, 100, 10),
        (7, 900, 3, 50),
        (5, 503, 5, 60),
        (9, 9, 1, 1),
        (1, 1, 56, 56),
        (200, 100, 210, 20),
        (100, 100, 90, 79),
        (100, 100, 90, 80),
        (100, 100, 90, 81),
        (3, 301, 2, 300),
    ]
    seen = set()
    for W, H, w, h in cases:
        image = noise(W, H)
        assert np.array_equal(_resize(image, (w, h)), np.asarray(image.resize((w, h)))), (W, H, w, h)
        seen.add(rule(W, H, w, h))
    assert seen == {True, False} or rule is nvlm_image._ORDER_RULES[-1]  # both pass orders were exercised


def test_matches_card_with_bands(bands_always):
    for size in SMALL_SIZES + tie_sizes(56, 6)[::3]:
        assert_matches_card(noise(*size), tile=56, max_tiles=6)
    for image in [
        noise(170, 60).convert("P"),
        noise(60, 170).convert("CMYK"),
        Image.fromarray(RNG.integers(0, 65536, (60, 170), dtype=np.uint16)),
    ]:
        assert_matches_card(image, tile=56)


def _in_child(conn, image):
    conn.send(ImageProcessor(56)(image).numpy())
    conn.close()


def test_works_in_a_forked_child(bands_always):
    """The thread pool is rebuilt in a forked child (a DataLoader worker), which would otherwise hang."""
    image = noise(300, 130)
    want = ImageProcessor(56)(image)  # the parent's pool threads exist now
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_in_child, args=(child, image))
    proc.start()
    assert parent.poll(30), "the forked child hung"
    assert torch.equal(torch.from_numpy(parent.recv()), want)
    proc.join(10)


# ------------------------------------------------------------------ tiling rules


def test_grid_and_crops():
    proc = ImageProcessor()
    # the paper's 14 ratios, in the card's order (by tile count; ties in CPython's set order)
    assert proc.grids == [
        (1, 1),
        (1, 2),
        (2, 1),
        (3, 1),
        (1, 3),
        (4, 1),
        (1, 4),
        (2, 2),
        (1, 5),
        (5, 1),
        (6, 1),
        (2, 3),
        (1, 6),
        (3, 2),
    ]
    assert proc.grid(448, 448) == (1, 1) and proc.num_crops(448, 448) == 1  # one tile: no thumbnail
    assert proc.grid(633, 633) == (1, 1) and proc.num_crops(633, 633) == 1  # 1:1 vs 2:2 tie, area too small
    assert proc.grid(634, 634) == (2, 2) and proc.num_crops(634, 634) == 5  # ... area > 2 * 448^2
    assert proc.grid(500, 400) == (1, 1)  # 5:4 is halfway between 1:1 and 3:2
    assert proc.grid(750, 600) == (2, 2)
    assert proc.grid(1000, 800) == (3, 2) and proc.num_crops(1000, 800) == 7
    assert proc.grid(1920, 1080) == (2, 1) and proc.num_crops(1920, 1080) == 3
    assert proc.grid(1, 500) == (1, 6) and proc.grid(500, 1) == (6, 1)
    assert ImageProcessor(use_thumbnail=False).num_crops(1000, 800) == 6
    assert ImageProcessor(max_tiles=12).grid(4000, 1000) == (4, 1)
    assert ImageProcessor(max_tiles=1).num_crops(5000, 100) == 1


def test_tiles_row_major_and_thumbnail_last():
    """Each crop is the right piece of the grid resize, and the thumbnail is the whole image, last."""
    image = noise(130, 200)  # 56-px tiles: a 2 x 3 grid
    proc = ImageProcessor(56, 6)
    assert proc.grid(*image.size) == (2, 3)
    got = proc(image)
    assert got.shape == (7, 3, 56, 56)
    resized = image.resize((112, 168))
    one_tile = ImageProcessor(56, max_tiles=1)  # a 56 x 56 image is one crop: itself
    for k in range(6):
        r, c = divmod(k, 2)
        assert torch.equal(got[k], one_tile(resized.crop((56 * c, 56 * r, 56 * c + 56, 56 * r + 56)))[0]), k
    assert torch.equal(got[6], one_tile(image.resize((56, 56)))[0])  # the thumbnail: the whole image, last
    assert [c.size for c in dynamic_preprocess(image, image_size=56, use_thumbnail=True)] == [(56, 56)] * 7


def test_from_config_and_validation():
    cfg = preset("tiny-d")
    proc = ImageProcessor.from_config(cfg)
    assert (proc.tile_size, proc.max_tiles, proc.min_tiles, proc.use_thumbnail) == (56, 6, 1, True)
    with pytest.raises(ValueError):
        ImageProcessor(max_tiles=0)
    with pytest.raises(ValueError):
        ImageProcessor(min_tiles=3, max_tiles=2)


def test_min_tiles_matches_card():
    """min_tiles (min_num in the card, always 1 there) drops the small grids."""
    for min_tiles in (2, 3):
        proc = ImageProcessor(56, 6, min_tiles=min_tiles)
        assert proc.grids == card_ratios(min_tiles, 6)
        for w, h in [(50, 50), (100, 100), (300, 60)]:
            crops = dynamic_preprocess(noise(w, h), min_num=min_tiles, max_num=6, image_size=56, use_thumbnail=True)
            assert proc.num_crops(w, h) == len(crops)


def test_input_untouched_and_threads_agree():
    image = noise(300, 120)
    before = image.tobytes()
    want = ImageProcessor(56)(image)
    results = [None] * 4

    def work(k):
        results[k] = ImageProcessor(56)(image)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert all(torch.equal(r, want) for r in results)
    assert image.tobytes() == before and image.mode == "RGB"


# ------------------------------------------------------------------ bad input


def _png(width: int, height: int, idat: bytes = b"") -> bytes:
    """A PNG whose header says width x height; the pixel data is whatever ``idat`` is."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    noise(120, 80).save(buf, fmt)
    return buf.getvalue()


def test_good_png_header_helper_opens():
    rows = b"".join(b"\x00" + bytes(3 * 4) for _ in range(3))
    assert load_image(_png(4, 3, zlib.compress(rows))).size == (4, 3)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="no such image file") as e:
        load_image(tmp_path / "nope.png")
    assert "nope.png" in str(e.value)
    with pytest.raises(ImageError, match="not a file"):
        load_image(tmp_path)


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture\n")
    with pytest.raises(ImageError, match="not an image file") as e:
        load_image(path)
    assert "notes.png" in str(e.value)
    with pytest.raises(ImageError, match="not an image file"):
        load_image(b"")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated(tmp_path, fmt):
    data = _encoded(fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"(?i)truncated") as e:
        load_image(path)
    assert path.name in str(e.value)
    with pytest.raises(ImageError, match=r"(?i)truncated"):
        load_image(data[: len(data) * 3 // 4])


def test_zero_sized(tmp_path):
    for w, h in [(0, 5), (5, 0), (0, 0)]:
        with pytest.raises(ImageError, match="zero-sized"):
            load_image(_png(w, h))
        with pytest.raises(ImageError, match="zero-sized"):
            load_image(Image.new("RGB", (w, h)))
    path = tmp_path / "empty.png"
    path.write_bytes(_png(0, 7))
    with pytest.raises(ImageError, match=r"zero-sized .*0x7") as e:
        load_image(path)
    assert "empty.png" in str(e.value)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    assert DEFAULT_MAX_PIXELS >= 40_000_000  # a 6000 x 6000 photo is fine
    start = time.perf_counter()
    idat = zlib.compress(b"\x00" * 1000)  # the header lies: nothing like 9000 x 9000 pixels follows
    for w, h in [(9000, 9000), (20000, 20000), (100_000_000, 1)]:  # ours, Pillow's hard limit, a long strip
        with pytest.raises(ImageError, match="pixel limit"):
            load_image(_png(w, h, idat))
    path = tmp_path / "bomb.png"
    path.write_bytes(_png(20000, 20000, idat))
    with pytest.raises(ImageError, match="pixel limit") as e:
        load_image(path)
    assert "bomb.png" in str(e.value)
    with pytest.raises(ImageError, match="pixel limit"):
        load_image(_encoded("PNG"), max_pixels=100)
    with pytest.raises(ImageError, match="pixel limit"):
        load_image(Image.new("RGB", (11, 10)), max_pixels=100)
    assert time.perf_counter() - start < 1.0
    small = Image.new("RGB", (10, 10))
    assert load_image(small, max_pixels=100) is small


def test_errors_are_value_errors():
    assert issubclass(ImageError, ValueError)
