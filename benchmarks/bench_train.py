"""Training throughput: tokens/s (and MFU on a GPU) of stage-2 steps on a random model.

    .venv/bin/python benchmarks/bench_train.py [--preset 1b] [--arch D] [--device cuda] [--seq-len 2048]

``1b`` is a ~1.3B-parameter LLM (hidden 2048, 16 layers, vocab 152064) behind the tiny ViT, ``250m`` a
smaller one for CPUs (hidden 1024, 12 layers), ``tiny`` the test preset. Each step: ``--rows`` packed rows
of ``--seq-len`` tokens (text only, so that the LLM is measured), bf16 autocast on GPU, AdamW on everything
but the ViT (stage 2), optional activation checkpointing. MFU counts 6 x parameters x tokens per step against
the GPU's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from nvlm import NVLM, preset
from nvlm.train.distributed import apply_activation_checkpointing
from nvlm.train.loop import PEAK_TFLOPS
from nvlm.train.stages import set_trainable


def config(name: str, arch: str):
    base = preset("tiny-d")
    if name != "tiny":
        h, layers, ffn, vocab = {
            "1b": (2048, 16, 5504, 152064),
            "250m": (1024, 12, 2816, 152064),
            "300m": (1024, 20, 2816, 32000),
            "330m": (1024, 28, 2816, 4096),
            "400m": (1024, 36, 2816, 4096),
        }[name]
        llm = replace(
            base.llm,
            hidden_size=h,
            intermediate_size=ffn,
            num_layers=layers,
            num_heads=16,
            num_kv_heads=4,
            vocab_size=vocab,
        )
        base = replace(base, llm=llm, projector=replace(base.projector, hidden_size=ffn, output_size=h))
    return base.with_arch(arch)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="1b", choices=["tiny", "250m", "300m", "330m", "400m", "1b"])
    ap.add_argument("--arch", default="D", choices=["D", "X", "H"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--activation-checkpointing", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = NVLM(config(args.preset, args.arch)).to(device).train()
    set_trainable(model, 2)
    if args.activation_checkpointing:
        apply_activation_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.98), weight_decay=0.1)
    n_params = sum(p.numel() for p in model.parameters())
    vocab = model.config.llm.vocab_size
    ids = torch.randint(0, vocab - 100, (args.rows, args.seq_len), device=device)
    mask = (
        torch.arange(args.seq_len, device=device).div(512, rounding_mode="floor").add(1).expand(args.rows, -1)
    )  # 512-token docs
    times = []
    for step in range(args.steps + 2):
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(ids, attention_mask=mask).logits
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    tokens = args.rows * args.seq_len
    line = (
        f"{n_params / 1e9:.2f}B params, NVLM-{args.arch}, {args.device}: {tokens / seconds:,.0f} tokens/s "
        f"({seconds * 1000:.0f} ms/step)"
    )
    if device.type == "cuda":
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in torch.cuda.get_device_name(device)), None)
        if peak:
            line += f", MFU {6 * n_params * tokens / seconds / (peak * 1e12):.1%}"
        line += f", peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    print(line)


if __name__ == "__main__":
    main()
