"""ImageProcessor against the model card's load_image on the same inputs (outputs checked torch.equal).

    .venv/bin/python benchmarks/bench_image_processor.py [--repeats 15]

Two rows per size: "PIL" starts both sides from the same decoded RGB image (the tiling and normalisation
alone); "JPEG file" / "PNG file" starts from the file, so decoding is included (the card's
``Image.open(path).convert('RGB')`` against our ``load_image(path)``). The two are timed in alternating
blocks (median of ``--repeats``), and the speed-up is the card's median time over ours. Prints a markdown
table for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reference.model_card import load_image as card_load_image

from nvlm.image import ImageProcessor, load_image

SIZES = [(640, 480), (1024, 768), (1920, 1080), (3000, 2000), (800, 2400), (448, 448)]


def photo_like(w: int, h: int, seed: int) -> Image.Image:
    """Seeded gradients plus noise: resizes and JPEG decoding cost what they cost on photos."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8))


def median_ms(card_fn, ours_fn, repeats: int, block: int = 5) -> tuple[float, float]:
    """Median wall times, measured in alternating blocks of ``block`` calls so that background load hits both
    sides alike. (Not call by call: torch's OpenMP threads spin for a few ms after the card's last torch op
    and would slow our first resize threads; within a block each side runs after itself.)"""
    card_fn(), ours_fn()  # warm-up
    card: list[float] = []
    ours: list[float] = []
    while len(ours) < repeats:
        for fn, times in ((card_fn, card), (ours_fn, ours)):
            for _ in range(min(block, repeats - len(times))):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
    return statistics.median(card) * 1000, statistics.median(ours) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    proc = ImageProcessor()
    print(
        f"{platform.machine()}, nproc {os.cpu_count()}, torch {torch.__version__} ({torch.get_num_threads()} "
        f"threads), Pillow {PIL.__version__}, numpy {np.__version__}, Python {platform.python_version()}; "
        f"median of {args.repeats}\n"
    )
    print("| input | size | crops | card load_image (ms) | ImageProcessor (ms) | speed-up |")
    print("|---|---|---|---|---|---|")
    total_card = total_ours = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for i, (w, h) in enumerate(SIZES):
            img = photo_like(w, h, i)
            fmt = "PNG" if i % 3 == 2 else "JPEG"
            path = Path(tmp) / f"img{i}.{fmt.lower()}"
            img.save(path, quality=90) if fmt == "JPEG" else img.save(path)
            cases = [
                ("PIL", lambda img=img: card_load_image(img), lambda img=img: proc(img)),
                (f"{fmt} file", lambda p=path: card_load_image(str(p)), lambda p=path: proc(load_image(p))),
            ]
            for name, card_fn, ours_fn in cases:
                assert torch.equal(card_fn(), ours_fn()), (name, w, h)
                card, ours = median_ms(card_fn, ours_fn, args.repeats)
                total_card, total_ours = total_card + card, total_ours + ours
                crops = proc.num_crops(w, h)
                print(f"| {name} | {w}x{h} | {crops} | {card:.1f} | {ours:.1f} | {card / ours:.2f}x |")
    print(f"| **all** | | | {total_card:.1f} | {total_ours:.1f} | {total_card / total_ours:.2f}x |")


if __name__ == "__main__":
    main()
