"""NVLM-D vs -X vs -H on one small config and a 6+1-tile image: decoder length and training step time.

    .venv/bin/python benchmarks/bench_archs.py [--device cpu] [--steps 5] [--text 512]

The paper's Table 3 (Yi-34B SFT, 128 H100): X 1,024 tokens, 5,063 ms/iter; H 1,280, 7,071 ms; D 2,816,
8,885 ms. Here: a random ~30M-parameter model (LLM hidden 512, 8 layers, cross-attention blocks before
layers 0 and 4; a narrow 2-layer ViT) with the paper's 448-px tiles of 256 tokens, batch 2, one 6+1-tile
image and about ``--text`` text tokens per row, one AdamW step on everything but the ViT (stage 2),
median of ``--steps``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch
from PIL import Image

from nvlm import NVLM, Processor, preset
from nvlm.config import CrossAttentionConfig
from nvlm.image import ImageProcessor
from nvlm.tokenizer import build_tiny_tokenizer


def small(arch: str):
    base = preset("tiny-d")
    vision = replace(base.vision, hidden_size=64, num_heads=4, intermediate_size=256, image_size=448)
    llm = replace(base.llm, hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8, num_kv_heads=2)
    projector = replace(base.projector, input_size=256, hidden_size=1408, output_size=512)
    cfg = replace(base, vision=vision, llm=llm, projector=projector).with_arch(arch)
    return (
        replace(cfg, xattn=CrossAttentionConfig(num_layers=2, interval=4, intermediate_size=1408))
        if arch != "D"
        else cfg
    )


def step_times(arch: str, args: argparse.Namespace) -> tuple[int, list[float]]:
    torch.manual_seed(0)
    cfg = small(arch)
    model = NVLM(cfg).to(args.device).train()
    model.vision_model.requires_grad_(False)
    processor = Processor(build_tiny_tokenizer(), ImageProcessor(tile_size=448), cfg)
    image = Image.new("RGB", (1344, 896), (120, 60, 30))  # 3x2 grid: 6 tiles + thumbnail
    words = " ".join(["the quick brown fox"] * (args.text // 4))
    conv = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": words}]}]
    inputs = processor.apply_chat_template([conv, conv]).to(args.device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    times = []
    for i in range(args.steps + 2):
        t0 = time.perf_counter()
        logits = model(**inputs).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), inputs["input_ids"][:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return inputs["input_ids"].shape[1], times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--text", type=int, default=512, help="text tokens per row (about)")
    args = ap.parse_args()
    print(f"| arch | decoder sequence length | ms / training step (median of {args.steps}) |")
    print("|---|---|---|")
    for arch in "XHD":
        length, times = step_times(arch, args)
        print(f"| NVLM-{arch} | {length} | {1000 * statistics.median(times):.0f} |", flush=True)


if __name__ == "__main__":
    main()
