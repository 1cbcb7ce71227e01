"""Images in: safe loading, and dynamic high-resolution tiling bit-identical to the model card's ``load_image``.

The card (and InternVL, Megatron, vLLM) picks a grid of up to ``max_tiles`` tiles with the closest aspect
ratio, resizes the whole image to it with PIL's default filter, cuts the tiles row-major and, when there
is more than one tile, appends a thumbnail of the original image; each crop is then scaled to [0, 1] and
normalised with the ImageNet statistics (torchvision ``ToTensor`` + ``Normalize``).
We do the same arithmetic faster: the uint8 grid image is cut into tiles with one reshape, the per-pixel
float work is a lookup in a 256-entry table per channel holding the exact float32 values torchvision
computes, and the thumbnail is resized in a second thread while the grid is (PIL releases the GIL).
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
DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000: well above any photo's need, far below a decompression bomb

_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nvlm-thumbnail")


class ImageError(ValueError):
    """An image that cannot be used: missing, unreadable, truncated, empty or too large."""


def load_image(source: str | os.PathLike | bytes | Image.Image, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and fully decode an image, checking its size against ``max_pixels`` before decoding."""
    if isinstance(source, Image.Image):
        _check_size(source, "image", max_pixels)
        return source
    if isinstance(source, (bytes, bytearray)):
        name, fp = f"image ({len(source)} bytes)", io.BytesIO(source)
    else:
        name, fp = str(source), Path(source)
        if not fp.is_file():
            raise ImageError(f"{name}: no such image file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies
        try:
            image = Image.open(fp)
        except UnidentifiedImageError:
            raise ImageError(f"{name}: not an image file (or an unsupported format)") from None
        except Image.DecompressionBombError as e:
            raise ImageError(f"{name}: too many pixels, a decompression bomb? ({e})") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"{name}: unreadable image ({e})") from None
        _check_size(image, name, max_pixels)
        try:
            image.load()
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageError(f"{name}: truncated or corrupt image data ({e})") from None
    return image


def _check_size(image: Image.Image, name: str, max_pixels: int) -> None:
    w, h = image.size
    if w <= 0 or h <= 0:
        raise ImageError(f"{name}: zero-sized image ({w}x{h})")
    if w * h > max_pixels:
        raise ImageError(f"{name}: {w}x{h} = {w * h} pixels is over the limit of {max_pixels} (a decompression bomb?)")


def _normalize_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(3, 256) float32: torchvision's ``ToTensor`` then ``Normalize`` of every uint8 value, same ops."""
    v = torch.arange(256, dtype=torch.uint8).to(torch.float32).div(255)  # ToTensor
    m = torch.as_tensor(mean, dtype=torch.float32)[:, None]
    s = torch.as_tensor(std, dtype=torch.float32)[:, None]
    return v[None].repeat(3, 1).sub_(m).div_(s).numpy()  # Normalize


class ImageProcessor:
    """PIL image -> ``[n_crops, 3, tile, tile]`` float32, equal bit for bit to the card's ``load_image``."""

    def __init__(self, tile_size: int = 448, max_tiles: int = 6, use_thumbnail: bool = True, min_tiles: int = 1) -> None:
        if not 1 <= min_tiles <= max_tiles:
            raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {min_tiles}, {max_tiles}")
        self.tile_size, self.max_tiles, self.min_tiles, self.use_thumbnail = tile_size, max_tiles, min_tiles, use_thumbnail
        # The card's candidate order: a set sorted by tile count (stable, so equal counts keep set order).
        self.grids = sorted(
            {(i, j) for n in range(min_tiles, max_tiles + 1) for i in range(1, n + 1) for j in range(1, n + 1)
             if min_tiles <= i * j <= max_tiles},
            key=lambda g: g[0] * g[1],
        )  # fmt: skip
        self._table = _normalize_table(IMAGENET_MEAN, IMAGENET_STD)

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
        cols, rows = self.grid(width, height)
        tiles = cols * rows
        return tiles + 1 if self.use_thumbnail and tiles != 1 else tiles

    def __call__(self, image: Image.Image) -> torch.Tensor:  # -> (n_crops, 3, S, S)
        if image.mode != "RGB":
            image = image.convert("RGB")
        s = self.tile_size
        cols, rows = self.grid(*image.size)
        with_thumbnail = self.use_thumbnail and cols * rows != 1
        thumb = _pool.submit(image.resize, (s, s)) if with_thumbnail else None
        grid = np.asarray(image.resize((s * cols, s * rows)))  # (rows*S, cols*S, 3) uint8
        tiles = grid.reshape(rows, s, cols, s, 3).transpose(0, 2, 4, 1, 3).reshape(rows * cols, 3, s, s)
        if thumb is not None:
            tiles = np.concatenate([tiles, np.asarray(thumb.result()).transpose(2, 0, 1)[None]])
        out = np.empty(tiles.shape, dtype=np.float32)
        for c in range(3):
            np.take(self._table[c], tiles[:, c], out=out[:, c])
        return torch.from_numpy(out)
