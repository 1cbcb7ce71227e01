"""Peak memory of NVLM.from_pretrained against the size of the weights it loads.

Writes a random checkpoint (default ~1.1 GB in bf16) in the released layout, then loads it in a fresh
process and reports that process's peak RSS above its RSS just before loading. Streaming each tensor
into a meta-built model should keep the peak near 1x the weights.

    .venv/bin/python benchmarks/bench_load_memory.py [--hidden 2048 --layers 10]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path


def _status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process. Not ru_maxrss: Linux carries that over exec from
    the parent, which has just built and written the model."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(path: str) -> None:
    import torch

    from nvlm.pretrained import NVLM

    before = _status_mb("VmRSS")
    model = NVLM.from_pretrained(path)
    # Same-dtype tensors stay mapped from the files until first read: read every one, so that the
    # peak counts the whole model resident.
    with torch.no_grad():
        touched = sum(float(p.reshape(-1)[::512].float().sum()) for p in model.parameters())  # every page
    peak = _status_mb("VmHWM")
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    print(json.dumps({"rss_before_mb": before, "peak_mb": peak, "weights_mb": weights, "touched": touched}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--dtype", default="bfloat16", help="dtype written; loading keeps it")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child)

    import torch

    from nvlm import preset
    from nvlm.pretrained import NVLM

    base = preset("tiny-d")
    h = args.hidden
    cfg = replace(
        base,
        llm=replace(
            base.llm,
            hidden_size=h,
            intermediate_size=4 * h,
            num_layers=args.layers,
            num_heads=16,
            num_kv_heads=4,
            vocab_size=32000,
        ),
        projector=replace(base.projector, hidden_size=4 * h, output_size=h),
        torch_dtype=args.dtype,
    )
    with tempfile.TemporaryDirectory() as d:
        NVLM(cfg).to(getattr(torch, args.dtype)).save_pretrained(d, max_shard_size=256 * 2**20)
        subprocess.run(["sync"], check=False)
        size = sum(f.stat().st_size for f in Path(d).glob("*.safetensors")) / 2**20
        out = subprocess.run([sys.executable, __file__, "--child", d], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout)
    extra = r["peak_mb"] - r["rss_before_mb"]
    print(f"checkpoint on disk: {size:.0f} MiB; parameters loaded: {r['weights_mb']:.0f} MiB")
    print(f"RSS before load: {r['rss_before_mb']:.0f} MiB; peak RSS: {r['peak_mb']:.0f} MiB")
    print(f"peak growth during load: {extra:.0f} MiB = {extra / r['weights_mb']:.2f}x the weights")


if __name__ == "__main__":
    main()
