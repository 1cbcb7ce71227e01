"""ImageProcessor against the model card's load_image on the same images (outputs checked equal).

    .venv/bin/python benchmarks/bench_image_processor.py [--repeats 7]

Both sides start from the decoded PIL image; the ratio is the card's median time over ours.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference.model_card import load_image as card_load_image  # noqa: E402

from nvlm.image import ImageProcessor  # noqa: E402

SIZES = [(640, 480), (1024, 768), (1920, 1080), (3000, 2000), (800, 2400), (448, 448)]


def photo_like(w: int, h: int, seed: int) -> Image.Image:
    """Seeded gradients plus noise: resizes cost what they cost on photos."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8))


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    proc = ImageProcessor()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), Pillow {PIL.__version__}, Python {platform.python_version()}\n")  # fmt: skip
    print("| image | crops | card load_image (ms) | ImageProcessor (ms) | speed-up |")
    print("|---|---|---|---|---|")
    total_card = total_ours = 0.0
    for i, (w, h) in enumerate(SIZES):
        img = photo_like(w, h, i)
        assert torch.equal(proc(img), card_load_image(img)), (w, h)
        card = median_ms(lambda: card_load_image(img), args.repeats)
        ours = median_ms(lambda: proc(img), args.repeats)
        total_card, total_ours = total_card + card, total_ours + ours
        print(f"| {w}x{h} | {proc.num_crops(w, h)} | {card:.1f} | {ours:.1f} | {card / ours:.2f}x |")
    print(f"| all | | {total_card:.1f} | {total_ours:.1f} | {total_card / total_ours:.2f}x |")


if __name__ == "__main__":
    main()
