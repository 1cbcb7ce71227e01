"""Decode speed of the generation engine on a random model (no checkpoint needed).

    .venv/bin/python benchmarks/bench_decode.py [--preset 1b] [--device cuda] [--dtype bfloat16]

``1b`` is a ~1B-parameter decoder (hidden 2048, 16 layers, GQA 16/4 heads, vocab 152064) behind the tiny ViT.
Reports prefill time and decode tokens/s (batch 1 and batch 8, greedy, 128 new tokens, eos disabled).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from nvlm import preset
from nvlm.pretrained import NVLM


def config(name: str):
    base = preset("tiny-d")
    if name == "tiny":
        return base
    h, layers = {"1b": (2048, 16), "250m": (1024, 12)}[name]
    llm = replace(
        base.llm,
        hidden_size=h,
        intermediate_size=11008 * h // 4096,
        num_layers=layers,
        num_heads=16,
        num_kv_heads=4,
        vocab_size=152064,
    )
    return replace(base, llm=llm, projector=replace(base.projector, hidden_size=llm.intermediate_size, output_size=h))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="1b", choices=["tiny", "250m", "1b"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=512)
    args = ap.parse_args()
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    with torch.device(args.device):
        model = NVLM(config(args.preset)).to(dtype).eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.preset}: {n_params / 1e9:.2f}B parameters, {args.dtype} on {args.device}")
    for batch in (1, 8):
        ids = torch.randint(0, 1000, (batch, args.prompt), device=args.device)
        sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
        model.generate(ids[:, :16], max_new_tokens=4, eos_token_id=[])  # warm-up
        sync()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, eos_token_id=[])
        sync()
        t1 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=args.new_tokens, eos_token_id=[])
        sync()
        t2 = time.perf_counter()
        decode_s = (t2 - t1) - (t1 - t0)
        print(
            f"batch {batch}: prefill {args.prompt} tokens {1000 * (t1 - t0):.0f} ms; decode "
            f"{batch * (out.shape[1] - 1) / decode_s:.1f} tokens/s ({(out.shape[1] - 1) / decode_s:.1f} steps/s)"
        )


if __name__ == "__main__":
    main()
