"""Images in: safe loading, and dynamic high-resolution tiling bit-identical to the model card's ``load_image``.

The card (and InternVL, Megatron, vLLM) picks a grid of up to ``max_tiles`` tiles with the closest aspect
ratio, resizes the whole image to it with PIL's default filter, cuts the tiles row-major and, when there
is more than one tile, appends a thumbnail of the original image; each crop is then scaled to [0, 1] and
normalised with the ImageNet statistics (torchvision ``ToTensor`` + ``Normalize``).

We do the same arithmetic, in less time. PIL's resize is two separable passes (one along rows, one along
columns, uint8 in between); we run each pass ourselves as a PIL resize of bands of the image in threads
(PIL releases the GIL while it resamples): every output row of a horizontal pass depends on one input row
only, every column of a vertical pass on one column, so the bands give the same bytes as one call. The
thumbnail is resized in another thread meanwhile; the uint8 grid is cut into tiles by one strided copy
instead of one crop per tile; and ``ToTensor`` + ``Normalize`` run once on all crops with the very float32
ops torchvision uses (``/255``, ``-mean``, ``/std``), so every value is rounded exactly as the card's is.

The result follows the installed Pillow, as the card's does: Pillow 13 runs the vertical pass first when
the height shrinks by more than twice as many pixels as the width (PR python-pillow/Pillow#9549), earlier
versions always run the horizontal pass first, and the two orders differ by one in a few uint8 values.
We check at first use, on small probes, which of the two rules the installed Pillow follows, and use
PIL's own one-call resize if it follows neither.
Spec: NVLM_SPEC.md section 2.1.
"""

from __future__ import annotations

import io
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from nvlm.config import NVLMConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# 64 MP (e.g. 8000 x 8000) is far above any camera photo and below Pillow's own warning threshold
# (~89 MP); a decoded 64 MP RGB image is ~256 MB in PIL. Pillow's hard limit (~179 MP) applies above it.
DEFAULT_MAX_PIXELS = 64_000_000

_THREADS = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
_pool = ThreadPoolExecutor(max_workers=_THREADS, thread_name_prefix="nvlm-image")
SPLIT_MIN_PIXELS = 100_000  # output pixels below which one PIL call beats the thread hand-offs
_MEAN = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)


class ImageError(ValueError):
    """An image that cannot be used: missing, unreadable, truncated, empty or too large."""


def load_image(source: str | os.PathLike | bytes | Image.Image, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and fully decode an image (a path, raw bytes, or a PIL image, which is only checked).

    Decoding happens here, not later, so that a bad file fails with a clear :class:`ImageError` naming
    it; the pixel count is checked from the header before decoding, so a decompression bomb costs nothing.
    """
    if isinstance(source, Image.Image):
        _check_size(source, "image", max_pixels)
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        name, fp = f"image ({len(source)} bytes)", io.BytesIO(source)
    else:
        name, fp = str(source), Path(source)
        if not fp.exists():
            raise ImageError(f"{name}: no such image file")
        if not fp.is_file():
            raise ImageError(f"{name}: not a file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies just below
        try:
            image = Image.open(fp)
        except UnidentifiedImageError:
            head = source[:24] if isinstance(source, (bytes, bytearray, memoryview)) else _head(fp, 24)
            if (size := _png_size(bytes(head))) and 0 in size:  # Pillow rejects it without saying why
                raise ImageError(f"{name}: zero-sized image ({size[0]}x{size[1]} in its PNG header)") from None
            raise ImageError(f"{name}: not an image file (or an unsupported format)") from None
        except Image.DecompressionBombError as e:
            raise ImageError(f"{name}: over the pixel limit, a decompression bomb? ({e})") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageError(f"{name}: unreadable image ({e})") from None
    try:
        _check_size(image, name, max_pixels)
        image.load()
    except ImageError:
        image.close()
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        image.close()
        raise ImageError(f"{name}: truncated or corrupt image data ({e})") from None
    return image


def _head(path: Path, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _png_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk, or None if ``head`` does not start a PNG."""
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def _check_size(image: Image.Image, name: str, max_pixels: int) -> None:
    w, h = image.size
    if w <= 0 or h <= 0:
        raise ImageError(f"{name}: zero-sized image ({w}x{h})")
    if w * h > max_pixels:
        raise ImageError(f"{name}: {w}x{h} = {w * h} pixels is over the pixel limit of {max_pixels} (a decompression bomb?)")


class ImageProcessor:
    """PIL image -> ``[n_crops, 3, tile, tile]`` float32, equal bit for bit to the card's ``load_image``."""

    def __init__(self, tile_size: int = 448, max_tiles: int = 6, use_thumbnail: bool = True, min_tiles: int = 1) -> None:
        if not 1 <= min_tiles <= max_tiles:
            raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {min_tiles}, {max_tiles}")
        if tile_size < 1:
            raise ValueError(f"tile_size must be positive, got {tile_size}")
        self.tile_size, self.max_tiles, self.min_tiles, self.use_thumbnail = tile_size, max_tiles, min_tiles, use_thumbnail
        # The card's candidate order: a set sorted by tile count (a stable sort, so equal counts keep the
        # set's iteration order, which is fixed for small int tuples: built the same way, it is the same).
        self.grids: list[tuple[int, int]] = sorted(
            {(i, j) for n in range(min_tiles, max_tiles + 1) for i in range(1, n + 1) for j in range(1, n + 1)
             if min_tiles <= i * j <= max_tiles},
            key=lambda g: g[0] * g[1],
        )  # fmt: skip

    @classmethod
    def from_config(cls, cfg: NVLMConfig) -> "ImageProcessor":
        return cls(cfg.tile_size, cfg.max_tiles, cfg.use_thumbnail, cfg.min_tiles)

    def grid(self, width: int, height: int) -> tuple[int, int]:
        """(columns, rows): the closest aspect ratio; on a tie the later grid wins if the image is large enough."""
        aspect, area = width / height, width * height
        best, best_diff = (1, 1), float("inf")
        for cols, rows in self.grids:
            diff = abs(aspect - cols / rows)
            if diff < best_diff:
                best, best_diff = (cols, rows), diff
            elif diff == best_diff and area > 0.5 * self.tile_size * self.tile_size * cols * rows:
                best = (cols, rows)
        return best

    def num_crops(self, width: int, height: int) -> int:
        """Tiles, plus the thumbnail when there is more than one tile."""
        cols, rows = self.grid(width, height)
        tiles = cols * rows
        return tiles + 1 if self.use_thumbnail and tiles != 1 else tiles

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """The crops of one image, row-major tiles then the thumbnail: ``(n_crops, 3, S, S)`` float32."""
        image = image.convert("RGB") if image.mode != "RGB" else image
        image.load()  # decode now: two threads read it below
        s = self.tile_size
        cols, rows = self.grid(*image.size)
        n = cols * rows
        thumb = _pool.submit(image.resize, (s, s)) if self.use_thumbnail and n != 1 else None
        grid = torch.from_numpy(resize(image, (s * cols, s * rows)))  # (rows*S, cols*S, 3) uint8
        out = torch.empty(n + (thumb is not None), 3, s, s)
        # tile (r, c) = grid[r*S:(r+1)*S, c*S:(c+1)*S], channels first; uint8 -> float32 is exact
        out[:n].view(rows, cols, 3, s, s).copy_(grid.view(rows, s, cols, s, 3).permute(0, 2, 4, 1, 3))
        if thumb is not None:
            out[n].copy_(torch.from_numpy(np.array(thumb.result())).permute(2, 0, 1))  # (S, S, 3) -> (3, S, S)
        return out.div_(255).sub_(_MEAN).div_(_STD)  # ToTensor's div(255), then Normalize's sub_ and div_


# ------------------------------------------------------------------ PIL's resize, its passes run in bands


def resize(image: Image.Image, size: tuple[int, int], bands: int = _THREADS) -> np.ndarray:
    """``np.array(image.resize(size))`` for an RGB image, the same bytes, with each pass cut into ``bands``
    threads. -> (h, w, 3) uint8."""
    (W, H), (w, h) = image.size, size
    order = _pass_order()
    if bands < 2 or w * h < SPLIT_MIN_PIXELS or order is None or w == W or h == H:
        return np.array(image.resize(size))
    if order(W, H, w, h):  # vertical pass first (column bands), then horizontal (row bands of W x h)
        tmp = _join(_run_bands(image, w=None, h=h, bands=bands), (W, h), rows=False)
        return np.concatenate([np.asarray(b) for b in _run_bands(tmp, w=w, h=None, bands=bands)], axis=0)
    tmp = _join(_run_bands(image, w=w, h=None, bands=bands), (w, H), rows=True)
    return np.concatenate([np.asarray(b) for b in _run_bands(tmp, w=None, h=h, bands=bands)], axis=1)


def _run_bands(image: Image.Image, w: int | None, h: int | None, bands: int) -> list[Image.Image]:
    """One pass of PIL's resize: the horizontal one (to width ``w``) over row bands, or the vertical one
    (to height ``h``) over column bands. The last band runs in this thread."""
    W, H = image.size
    n = min(bands, H if w else W)
    cuts = [round(k * (H if w else W) / n) for k in range(n + 1)]
    if w:
        jobs = [(image.crop((0, a, W, b)), (w, b - a)) for a, b in zip(cuts, cuts[1:])]
    else:
        jobs = [(image.crop((a, 0, b, H)), (b - a, h)) for a, b in zip(cuts, cuts[1:])]
    futures = [_pool.submit(band.resize, sz) for band, sz in jobs[:-1]]
    last = jobs[-1][0].resize(jobs[-1][1])
    return [f.result() for f in futures] + [last]


def _join(parts: list[Image.Image], size: tuple[int, int], rows: bool) -> Image.Image:
    """Row bands stacked top to bottom, or column bands left to right, into one ``size`` image."""
    out, at = Image.new("RGB", size), 0
    for p in parts:
        out.paste(p, (0, at) if rows else (at, 0))
        at += p.height if rows else p.width
    return out


# Which pass PIL runs first, as a function of (W, H) -> (w, h); the first rule that fits all the probes wins.
_ORDER_RULES = (
    lambda W, H, w, h: h < H and H - h > 2 * (W - w),  # Pillow 13 (C code, PR #9549)
    lambda W, H, w, h: H > 100 * W and h < H,  # Pillow 12.x with PR #9524 (Python code, very tall images)
    lambda W, H, w, h: False,  # older Pillow: always horizontal first
)
_PROBES = [((40, 40), (25, 9)), ((40, 40), (30, 19)), ((40, 40), (30, 20)), ((40, 40), (30, 21)), ((30, 60), (50, 20)),
           ((60, 30), (20, 50)), ((31, 17), (70, 45)), ((50, 50), (20, 7)), ((23, 80), (9, 31)), ((3, 337), (1, 18)),
           ((3, 400), (1, 397)), ((2, 300), (5, 150))]  # fmt: skip
_order_checked: list = []


def _pass_order():
    """The installed Pillow's pass-order rule, found once on probes on both sides of each rule (None: neither
    rule fits, so resize() leaves the whole resize to PIL)."""
    if not _order_checked:
        rng = np.random.default_rng(0)
        probes = [(Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)), size) for (W, H), size in _PROBES]
        found = None
        for rule in _ORDER_RULES:
            for img, size in probes:
                (W, H), vertical_first = img.size, rule(*img.size, *size)
                tmp = img.resize((W, size[1]) if vertical_first else (size[0], H))
                if tmp.resize(size).tobytes() != img.resize(size).tobytes():
                    break
            else:
                found = rule
                break
        _order_checked.append(found)
    return _order_checked[0]
