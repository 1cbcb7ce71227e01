"""The training data loader: examples per second with 0, 1, 2, ... worker processes, and how long the training
loop waits for its batches when each step also computes for ``--step_ms``.

    .venv/bin/python benchmarks/bench_loader.py [--workers 0 1 2] [--examples 48] [--step_ms 0]

Records: ``--images`` distinct 1024x768 JPEGs (noise), each with a short question and answer, tiled as in
SFT (448-px tiles, up to 6 + thumbnail: 7 crops each); the tiny tokenizer; micro-batches of 2 rows of 4,096
tokens, packed. The first batch (worker start-up included) is timed apart.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from nvlm import Processor, preset
from nvlm.data.blend import Source
from nvlm.data.loader import Loader
from nvlm.image import ImageProcessor
from nvlm.tokenizer import build_tiny_tokenizer


def write_records(root: Path, images: int) -> Source:
    rng = np.random.default_rng(0)
    lines = []
    for i in range(images):
        Image.fromarray(rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8)).save(root / f"{i}.jpg", quality=90)
        lines.append({"image": f"{i}.jpg", "question": f"What is in picture {i}?", "answer": f"noise number {i}"})
    (root / "d.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return Source(str(root / "d.jsonl"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--examples", type=int, default=48, help="examples timed after the first batch")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--step_ms", type=float, default=0.0, help="compute per batch, standing in for a training step")
    args = ap.parse_args()
    config = preset("tiny-d")
    processor = Processor(build_tiny_tokenizer(), ImageProcessor(tile_size=448, max_tiles=6), config)
    with tempfile.TemporaryDirectory() as tmp:
        source = write_records(Path(tmp), args.images)
        print("workers  first batch s  examples/s  waiting for data per batch ms")
        for workers in args.workers:
            with Loader(processor, [source], 4096, 2, num_workers=workers) as loader:
                t0 = time.perf_counter()
                first = loader()
                first_s = time.perf_counter() - t0
                per_batch = int(first["attention_mask"].amax(1).sum())
                batches = max(1, args.examples // per_batch)
                waited, t1 = 0.0, time.perf_counter()
                for _ in range(batches):
                    busy = time.perf_counter() + args.step_ms / 1000
                    while time.perf_counter() < busy:  # the training step (the CPU is busy, as in training)
                        pass
                    t = time.perf_counter()
                    loader()
                    waited += time.perf_counter() - t
                total = time.perf_counter() - t1
            print(
                f"{workers:7d}  {first_s:12.2f}  {batches * per_batch / total:10.1f}  {1000 * waited / batches:10.0f}"
            )


if __name__ == "__main__":
    main()
