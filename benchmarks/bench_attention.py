"""Attention over packed rows: the block-diagonal (B, 1, T, T) mask against per-document attention.

    .venv/bin/python benchmarks/bench_attention.py [--preset demo-d] [--rows 4] [--seq-len 512]
        [--lengths 60 260] [--steps 20]

A training batch packs several samples into each row; each must attend only to itself. The LLM (of
``--preset``) runs forward and backward over ``--rows`` rows of ``--seq-len`` slots filled first-fit with
samples of seeded random lengths in ``--lengths``, once with the (B, 1, T, T) mask (the masked SDPA kernel
over every row's T x T) and once with ``nvlm.models.llm.Documents`` (one causal SDPA per sample),
alternating, on one intra-op thread. Both give transformers' outputs and gradients
(``tests/test_parity.py``); the printed ratio is the masked step's time over the per-document one's.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from nvlm import preset
from nvlm.models.llm import LanguageModel, attention_mask_4d, documents, position_ids_from_mask


def packed_mask(rows: int, seq_len: int, lengths: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """(rows, seq_len) document ids: samples drawn until one fits no row (first-fit), 0 = padding."""
    rng = random.Random(seed)
    mask = torch.zeros(rows, seq_len, dtype=torch.long)
    used, docs = [0] * rows, [0] * rows
    while True:
        n = rng.randint(*lengths)
        row = next((r for r in range(rows) if used[r] + n <= seq_len), None)
        if row is None:
            return mask
        docs[row] += 1
        mask[row, used[row] : used[row] + n] = docs[row]
        used[row] += n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="demo-d")
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--lengths", type=int, nargs=2, default=(60, 260))
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = preset(args.preset).llm
    model = LanguageModel(cfg).train()
    mask = packed_mask(args.rows, args.seq_len, tuple(args.lengths))
    positions = position_ids_from_mask(mask)
    embeds = torch.randn(args.rows, args.seq_len, cfg.hidden_size) * 0.02
    ways = {"mask": attention_mask_4d(mask, args.seq_len), "documents": documents(mask)}
    times: dict[str, list[float]] = {k: [] for k in ways}
    for step in range(args.steps + 2):
        for name, how in ways.items():
            start = time.perf_counter()
            model(embeds, positions, how).float().square().mean().backward()
            if step >= 2:  # the first two are warm-up
                times[name].append(time.perf_counter() - start)
    real, samples = int((mask > 0).sum()), int(mask.max(1).values.sum())
    print(f"{args.preset} LLM, {args.rows} x {args.seq_len}, {samples} samples, {real} real tokens")
    for name, t in times.items():
        print(f"{name:>10}: {statistics.median(t) * 1e3:7.1f} ms forward + backward (median of {len(t)})")
    ratio = statistics.median(times["mask"]) / statistics.median(times["documents"])
    print(f"     ratio: {ratio:.2f}x")


if __name__ == "__main__":
    main()
