"""Peak memory of converting a Megatron-Core checkpoint (TP 4) to the NVLM-D-72B layout, against the largest
output shard.

Builds a random ~0.6B NVLM-D (a Qwen2-0.5B-like LLM with 4 query groups so that TP 4 divides it, and a small
InternViT), writes it as Megatron legacy rank files at TP 4 with ``nvlm.mcore.convert_to_mcore``, then runs
``convert_to_hf`` in a child process. The parent reads the child's ``VmHWM`` from ``/proc/PID/status`` once
the child has imported everything (its baseline) and again when it is done (the peak): the reported figure is
peak minus baseline, over the largest safetensors shard written.

    .venv/bin/python benchmarks/bench_convert_memory.py [--max-shard-gb 5] [--layers 24]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path


def _hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def child(src: str, dst: str, tok: str, config: str, max_shard_gb: float) -> None:
    import nvlm.mcore  # noqa: F401  everything imported before the baseline
    from nvlm.mcore import convert_to_hf

    print("ready", flush=True)
    sys.stdin.readline()
    convert_to_hf(src, dst, tok, config, int(max_shard_gb * 1024**3))
    print("done", flush=True)
    sys.stdin.readline()


def build(work: Path, layers: int) -> Path:
    import torch

    from nvlm import preset
    from nvlm.mcore import convert_to_mcore
    from nvlm.pretrained import NVLM
    from nvlm.tokenizer import build_tiny_tokenizer

    base = preset("nvlm-d-72b")
    vision = replace(base.vision, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024)
    llm = replace(
        base.llm,
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=2816,
        num_layers=layers,
        num_heads=16,
        num_kv_heads=4,
        rope_scaling=None,
    )
    projector = replace(base.projector, input_size=1024, hidden_size=2816, output_size=1024)
    cfg = replace(base, vision=vision, llm=llm, projector=projector).validate()
    with torch.device("meta"):
        model = NVLM(cfg)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.to(torch.bfloat16).save_pretrained(work / "ours")
    del model
    build_tiny_tokenizer().save(work / "tok")
    convert_to_mcore(work / "ours", work / "mcore", tp=4)
    return work / "ours" / "config.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--max-shard-gb", type=float, default=5.0)
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child[:4], float(args.child[4]))
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        work = Path(tmp)
        config = build(work, args.layers)
        params = sum(len(f.read_bytes()) for f in (work / "ours").glob("*.safetensors"))
        cmd = [
            sys.executable,
            __file__,
            "--child",
            str(work / "mcore"),
            str(work / "hf"),
            str(work / "tok"),
            str(config),
            str(args.max_shard_gb),
        ]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        baseline = _hwm_mb(proc.pid)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "done"
        peak = _hwm_mb(proc.pid)
        proc.stdin.write("exit\n")
        proc.stdin.flush()
        proc.wait()
        shards = sorted((work / "hf").glob("*.safetensors"))
        largest = max(f.stat().st_size for f in shards) / 2**20
        rank_file = (work / "mcore" / "release" / "mp_rank_00" / "model_optim_rng.pt").stat().st_size / 2**20
        print(
            json.dumps(
                {
                    "checkpoint_mb": round(params / 2**20, 1),
                    "tp": 4,
                    "rank_file_mb": round(rank_file, 1),
                    "shards": len(shards),
                    "largest_shard_mb": round(largest, 1),
                    "baseline_hwm_mb": round(baseline, 1),
                    "peak_hwm_mb": round(peak, 1),
                    "peak_above_baseline_mb": round(peak - baseline, 1),
                    "ratio_to_largest_shard": round((peak - baseline) / largest, 3),
                }
            )
        )


if __name__ == "__main__":
    main()
