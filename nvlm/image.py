"""Images in: safe loading, and dynamic high-resolution tiling bit-identical to the model card's ``load_image``.

The card (and InternVL, Megatron, vLLM) picks a grid of up to ``max_tiles`` tiles with the closest aspect
ratio, resizes the whole image to it with PIL's default filter, cuts the tiles row-major and, when there
is more than one tile, appends a thumbnail of the original image; each crop is then scaled to [0, 1] and
normalised with the ImageNet statistics (torchvision ``ToTensor`` + ``Normalize``).

We compute the same bytes in less time, on a few threads (PIL and numpy release the GIL while they work):
- PIL's resize is two separable passes with uint8 in between, one along rows and one along columns. We
  run each pass as PIL resizes of bands of the image: an output row of the horizontal pass depends on one
  input row only, a column of the vertical pass on one column, so the bands give the same bytes as one
  call. The grid and the thumbnail are resized at the same time.
- No crops are made: each band of the resized grid (or thumbnail) is normalised straight into the tiles it
  covers, as soon as it is ready, with the very float32 operations torchvision does (``/255``, ``-mean``,
  ``/std``; each correctly rounded, so numpy gives the same bits as torch). torch's own OpenMP threads are
  left asleep: woken on a 2-core machine they spin for milliseconds and slow the resize threads down.
The result follows the installed Pillow, as the card's does. Which pass Pillow runs first changed: Pillow 13
runs the vertical one first when the height shrinks by more than twice as many pixels as the width
(PR python-pillow/Pillow#9549), 12.x does so for images over 100 times taller than wide, older versions
never, and the two orders can differ by one in a few uint8 values. At first use we find which of these
rules the installed Pillow follows on small probes; if none fits we leave each resize to one PIL call.
Spec: NVLM_SPEC.md section 2.1.
"""

from __future__ import annotations

import io
import itertools
import os
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from nvlm.config import NVLMConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# 64 MP (e.g. 8000 x 8000) is far above any camera photo and below Pillow's own warning threshold
# (~89 MP); a decoded 64 MP RGB image is ~256 MB in PIL. Pillow's hard limit (~179 MP) applies above it.
DEFAULT_MAX_PIXELS = 64_000_000
# Tiling costs memory and time in proportion to an image's sides, not only to its pixels: PIL's resize keeps
# ~4 float64 weights per input pixel along each side (a 25,000,000 x 1 strip: 1.65 GB and 4 s, where a
# 5000 x 5000 photo needs 0.2 s). So an image's longer side is limited too, to JPEG's own maximum: at the
# limit, the weights of both resizes (grid and thumbnail) take ~4 MB and a 65,535 x 381 image tiles in 0.2 s.
MAX_SIDE = 65_535

BAND_MIN_PIXELS = 100_000  # a resize to fewer output pixels runs as one PIL call (bands would not pay)
_MEAN = np.array(IMAGENET_MEAN, dtype=np.float32)[:, None, None]  # the float32 values torchvision uses
_STD = np.array(IMAGENET_STD, dtype=np.float32)[:, None, None]
_THREADS = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


_pool: ThreadPoolExecutor  # set by _new_pool, here and in a forked child


def _new_pool() -> None:
    global _pool
    _pool = ThreadPoolExecutor(max_workers=max(2, _THREADS), thread_name_prefix="nvlm-image")


_new_pool()
if hasattr(os, "register_at_fork"):  # a forked child (a DataLoader worker) has none of the parent's threads
    os.register_at_fork(after_in_child=_new_pool)


class ImageError(ValueError):
    """An image that cannot be used: missing, unreadable, truncated, empty or too large."""


def load_image(source: str | os.PathLike | bytes | Image.Image, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and fully decode an image (a path, raw bytes, or a PIL image, which is only checked).

    Decoding happens here, not later, so that a bad file fails with a clear :class:`ImageError` naming
    it; the pixel count and the longer side (``MAX_SIDE``) are checked from the header before
    decoding, so a decompression bomb or a 25,000,000 x 1 strip costs nothing.
    """
    if isinstance(source, Image.Image):
        _check_size(source, "image", max_pixels)
        return source
    fp: io.BytesIO | Path
    if isinstance(source, (bytes, bytearray, memoryview)):
        name, fp = f"image ({len(source)} bytes)", io.BytesIO(source)
    else:
        name, fp = str(source), Path(source)
        if "\x00" in name:
            raise ImageError(f"{name!r}: an image path cannot hold a NUL character")
        if not fp.exists():
            raise ImageError(f"{name}: no such image file")
        if not fp.is_file():
            raise ImageError(f"{name}: not a file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies just below
        try:
            image = Image.open(fp)
        except UnidentifiedImageError:
            head = fp.getvalue()[:24] if isinstance(fp, io.BytesIO) else _head(fp, 24)
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
    if w * h > max_pixels:
        raise ImageError(f"{name}: {w}x{h} = {w * h} pixels is over the pixel limit of {max_pixels} (a bomb?)")
    _check_shape(image, name)


def _check_shape(image: Image.Image, name: str) -> None:
    w, h = image.size
    if w <= 0 or h <= 0:
        raise ImageError(f"{name}: zero-sized image ({w}x{h})")
    if max(w, h) > MAX_SIDE:
        raise ImageError(f"{name}: {w}x{h} has a side over {MAX_SIDE} pixels (tiling cost grows with the sides)")


class ImageProcessor:
    """PIL image -> ``[n_crops, 3, tile, tile]`` float32, equal bit for bit to the card's ``load_image``."""

    def __init__(
        self, tile_size: int = 448, max_tiles: int = 6, use_thumbnail: bool = True, min_tiles: int = 1
    ) -> None:
        if not 1 <= min_tiles <= max_tiles:
            raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {min_tiles}, {max_tiles}")
        if tile_size < 1:
            raise ValueError(f"tile_size must be positive, got {tile_size}")
        self.tile_size, self.max_tiles, self.min_tiles = tile_size, max_tiles, min_tiles
        self.use_thumbnail = use_thumbnail
        # The card's candidate order: a set sorted by tile count (a stable sort, so equal counts keep the
        # set's iteration order, which is fixed for small int tuples: built the same way, it is the same).
        self.grids: list[tuple[int, int]] = sorted(
            {
                (i, j)
                for n in range(min_tiles, max_tiles + 1)
                for i in range(1, n + 1)
                for j in range(1, n + 1)
                if min_tiles <= i * j <= max_tiles
            },
            key=lambda g: g[0] * g[1],
        )

    @classmethod
    def from_config(cls, cfg: NVLMConfig) -> ImageProcessor:
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
        """The crops of one image, row-major tiles then the thumbnail: ``(n_crops, 3, S, S)`` float32.

        Any pixel count is tiled (``load_image`` applies the pixel limit), but a side over ``MAX_SIDE`` is
        an :class:`ImageError`, raised before any work: the cost is then bounded by the pixels alone."""
        _check_shape(image, "image")
        image = image.convert("RGB") if image.mode != "RGB" else image
        image.load()  # decode now: several threads read it below
        s = self.tile_size
        cols, rows = self.grid(*image.size)
        n = cols * rows
        thumbnail = self.use_thumbnail and n != 1
        resizes = [_Resize(image, (s * cols, s * rows), inline=n == 1)]  # the grid, then the thumbnail
        if thumbnail:
            resizes.append(_Resize(image, (s, s)))
        for r in resizes:
            r.second_pass()
        out = np.empty((thumbnail + n, 3, s, s), dtype=np.float32)
        jobs = _normalize_bands(resizes[0], out[:n], cols)
        if thumbnail:
            jobs += _normalize_bands(resizes[1], out[n:], 1)
        for job in jobs:
            job.result()
        return torch.from_numpy(out)


def _normalize_bands(resize: _Resize, out: np.ndarray, cols: int) -> list[Future]:
    """Start normalising each band of a resize into the tiles it covers (``out``: (tiles, 3, S, S), row-major
    ``cols`` to a row) as soon as that band is ready, while the other bands are still being resized."""
    s = out.shape[-1]
    jobs: list[Future] = []
    if resize.inline:  # a single tile in one PIL call, nothing to overlap it with: no thread hand-offs
        _normalize(next(resize.bands())[0], out[0])
        return jobs
    for band, y0, x0 in resize.bands():
        h, w = band.shape[:2]
        for r in range(y0 // s, (y0 + h - 1) // s + 1):
            for c in range(x0 // s, (x0 + w - 1) // s + 1):
                ya, yb, xa, xb = max(y0, r * s), min(y0 + h, r * s + s), max(x0, c * s), min(x0 + w, c * s + s)
                dst = out[r * cols + c, :, ya - r * s : yb - r * s, xa - c * s : xb - c * s]
                jobs.append(_pool.submit(_normalize, band[ya - y0 : yb - y0, xa - x0 : xb - x0], dst))
    return jobs


def _normalize(pixels: np.ndarray, out: np.ndarray) -> None:
    """(h, w, 3) uint8 -> (3, h, w) float32: torchvision's ToTensor (``/255``), then Normalize's
    ``sub_(mean)`` and ``div_(std)``, the same float32 operations in the same order."""
    np.copyto(out, pixels.transpose(2, 0, 1))  # uint8 -> float32 is exact
    np.divide(out, np.float32(255), out=out)
    np.subtract(out, _MEAN, out=out)
    np.divide(out, _STD, out=out)


# ------------------------------------------------------------------ PIL's resize, its passes run in bands


class _Resize:
    """``image.resize(size)`` of an RGB image, started at once on the thread pool, its two passes in bands."""

    def __init__(self, image: Image.Image, size: tuple[int, int], inline: bool = False) -> None:
        (W, H), (w, h) = image.size, size
        rule = _pass_order()
        self.size, self.vertical_first, self.inline = size, False, False
        if _THREADS < 2 or w * h < BAND_MIN_PIXELS or rule is None or w == W or h == H:
            self.inline = inline  # a single tile: computed in this thread, no hand-offs
            job = Future() if inline else _pool.submit(_band, image, (0, 0, W, H), size, True)
            if inline:
                job.set_result(_band(image, (0, 0, W, H), size, True))
            self.first, self.second = [], [(job, 0)]
            return
        self.vertical_first = rule(W, H, w, h)
        self.mid = (W, h) if self.vertical_first else (w, H)  # the size after the first pass
        self.first = _bands(image, self.mid, rows=not self.vertical_first, array=False)

    def second_pass(self) -> None:
        """Once the first pass is done: start the second on its output."""
        if self.first:
            tmp = Image.new("RGB", self.mid)
            for f, at in self.first:  # column bands side by side, or row bands stacked
                tmp.paste(f.result(), (at, 0) if self.vertical_first else (0, at))
            self.second = _bands(tmp, self.size, rows=self.vertical_first, array=True)

    def bands(self) -> Iterator[tuple[np.ndarray, int, int]]:
        """The output, as (h, w, 3) uint8 bands with their top and left offsets, each as soon as it is done."""
        for f, at in self.second:  # a horizontal second pass makes row bands, a vertical one column bands
            yield (f.result(), at, 0) if self.vertical_first else (f.result(), 0, at)


def _bands(image: Image.Image, size: tuple[int, int], rows: bool, array: bool) -> list[tuple[Future, int]]:
    """One pass of a resize to ``size`` started on the pool, one band per thread: the horizontal pass
    (``rows``: row bands, widths change) or the vertical one (column bands, heights change)."""
    W, H = image.size
    n = min(_THREADS, H if rows else W)
    cuts = [round(k * (H if rows else W) / n) for k in range(n + 1)]
    jobs = []
    for a, b in itertools.pairwise(cuts):
        box, band_size = ((0, a, W, b), (size[0], b - a)) if rows else ((a, 0, b, H), (b - a, size[1]))
        jobs.append((_pool.submit(_band, image, box, band_size, array), a))
    return jobs


def _band(image: Image.Image, box: tuple[int, int, int, int], size: tuple[int, int], array: bool) -> Any:
    """``image.crop(box).resize(size)``, as a (h, w, 3) uint8 array if ``array``; runs on the pool."""
    out = (image.crop(box) if box != (0, 0, *image.size) else image).resize(size)
    return np.asarray(out) if array else out


# Which pass Pillow runs first, for a resize (W, H) -> (w, h); the first rule that fits all the probes wins.
_ORDER_RULES: tuple[Callable[[int, int, int, int], bool], ...] = (
    lambda W, H, w, h: h < H and H - h > 2 * (W - w),  # Pillow 13 (C code, PR #9549)
    lambda W, H, w, h: H > 100 * W and h < H,  # Pillow 12.x (Python code, PR #9524: very tall images)
    lambda W, H, w, h: False,  # older Pillow: horizontal first, always
)
_PROBES = [
    ((40, 40), (25, 9)),
    ((40, 40), (30, 19)),
    ((40, 40), (30, 20)),
    ((40, 40), (30, 21)),
    ((30, 60), (50, 20)),
    ((60, 30), (20, 50)),
    ((31, 17), (70, 45)),
    ((50, 50), (20, 7)),
    ((23, 80), (9, 31)),
    ((3, 337), (1, 18)),
    ((3, 400), (1, 397)),
    ((2, 300), (5, 150)),
]
_order: list[Callable[[int, int, int, int], bool] | None] = []


def _pass_order() -> Callable[[int, int, int, int], bool] | None:
    """The rule the installed Pillow follows (None: none of ours), found once on small noise images."""
    if not _order:
        rng = np.random.default_rng(0)
        noise = [Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)) for (W, H), _ in _PROBES]
        probes = list(zip(noise, (size for _, size in _PROBES), strict=True))

        def fits(rule: Callable[[int, int, int, int], bool]) -> bool:
            for img, (w, h) in probes:
                (W, H) = img.size
                tmp = img.resize((W, h) if rule(W, H, w, h) else (w, H))
                if tmp.resize((w, h)).tobytes() != img.resize((w, h)).tobytes():
                    return False
            return True

        _order.append(next((rule for rule in _ORDER_RULES if fits(rule)), None))
    return _order[0]
