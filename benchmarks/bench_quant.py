"""Quantization while loading: peak and loaded memory, CPU decode speed, answers against bf16's.

    .venv/bin/python benchmarks/bench_quant.py [--preset 300m] [--formats bf16 int8 int4] [--shard-mb 128]
    .venv/bin/python benchmarks/bench_quant.py --arithmetic   # the 72B memory table only (no model run)

Writes a random NVLM-D checkpoint (``300m``: bench_train's config, 0.29B parameters, vocab 32k) in bf16 in
shards of ``--shard-mb``, then for each format loads it in a fresh child process. The parent reads the
child's /proc/PID/status: VmRSS just before loading, VmHWM (peak) and VmRSS once loaded. The child then
reports the quantized layers' bytes (measured and predicted by ``predicted_bytes``), decode tokens/s at
batch 1 (``--prompt`` tokens, ``--new-tokens`` greedy, eos disabled) and, for a quantized format, how many
of ``--questions`` random 16-token prompts get bf16's greedy answer, and the logits' relative error.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

GIB = 2**30


def predicted_bytes(model: torch.nn.Module, fmt: str) -> tuple[int, int]:
    """(bytes of the default-quantized linears in ``fmt``, their bf16 bytes), from the shapes alone: int8 is
    one byte a weight plus a float32 scale and an int8 zero point per output row; int4 half a byte plus a bf16
    scale and zero per group of 128; fp8 one byte plus a float32 scale per row (not measured: no CPU kernel)."""
    from nvlm.quant import DEFAULT_MODULES, QuantConfig, int4_group_size

    cfg = QuantConfig("int8", DEFAULT_MODULES)
    got = plain = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and cfg.selects(name):
            n = m.in_features * m.out_features
            plain += 2 * n
            if fmt in ("int8", "fp8"):
                got += n + (5 if fmt == "int8" else 4) * m.out_features
            elif fmt == "int4":
                got += n // 2 + 4 * m.out_features * (m.in_features // int4_group_size(m.in_features))
            else:
                got += 2 * n
    return got, plain


def _status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (MiB) of process ``pid``."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(line.split()[1]) / 1024
    return out


def child(path: str, fmt: str, args: argparse.Namespace) -> None:
    from nvlm.pretrained import NVLM
    from nvlm.quant import quantized_linears, storage_bytes

    torch.set_num_threads(args.threads)
    print("ready", flush=True)
    sys.stdin.readline()  # the parent has read VmRSS before loading
    model = NVLM.from_pretrained(path, quantize=None if fmt == "bf16" else fmt)
    with torch.no_grad():  # plain tensors may stay mapped from the file until read: read every page
        touched = sum(
            float(p.reshape(-1)[::512].float().sum()) for p in model.parameters() if type(p) is torch.nn.Parameter
        )
    print("loaded", flush=True)
    sys.stdin.readline()  # the parent has read the peak
    linears = quantized_linears(model)
    measured = sum(storage_bytes(m.weight) for m in linears.values())
    predicted, plain = predicted_bytes(model, fmt)
    result = {
        "format": fmt,
        "touched": touched,
        "quantized_layers": len(linears),
        "measured_bytes": measured,
        "predicted_bytes": predicted,
        "bf16_bytes": plain,
        "all_params_bytes": sum(storage_bytes(p) for p in model.parameters()),
    }
    g = torch.Generator().manual_seed(0)

    def prompts(n: int, length: int) -> torch.Tensor:  # random text tokens, never the image placeholder
        ids = torch.randint(0, model.config.llm.vocab_size, (n, length), generator=g)
        return ids.masked_fill(ids == model.config.image_token_id, 0)

    ids = prompts(1, args.prompt)
    model.generate(ids[:, :8], max_new_tokens=2, eos_token_id=[])  # warm-up
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=1, eos_token_id=[])
    t1 = time.perf_counter()
    model.generate(ids, max_new_tokens=args.new_tokens, eos_token_id=[])
    t2 = time.perf_counter()
    result["decode_tokens_per_s"] = (args.new_tokens - 1) / ((t2 - t1) - (t1 - t0))
    if fmt != "bf16":
        questions = prompts(args.questions, 16)
        answers = model.generate(questions, max_new_tokens=8, eos_token_id=[])
        with torch.no_grad():
            logits = model(questions).logits.float()
        del model
        ref = NVLM.from_pretrained(path)
        ref_answers = ref.generate(questions, max_new_tokens=8, eos_token_id=[])
        with torch.no_grad():
            ref_logits = ref(questions).logits.float()
        result["same_answers"] = float((answers == ref_answers).all(1).float().mean())
        last, ref_last = logits[:, -1], ref_logits[:, -1]
        result["same_next_token"] = float((last.argmax(-1) == ref_last.argmax(-1)).float().mean())
        top2 = ref_last.topk(2, dim=-1).values
        result["median_top2_gap"] = float((top2[:, 0] - top2[:, 1]).median())  # bf16's margin for its choice
        result["median_max_error"] = float((last - ref_last).abs().amax(-1).median())  # the largest logit shift
        result["logits_relative_error"] = float((logits - ref_logits).norm() / ref_logits.norm())
    print(json.dumps(result), flush=True)


def run_child(path: Path, fmt: str, argv: list[str]) -> dict:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", str(path), fmt, *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    before = _status(proc.pid)["VmRSS"]
    proc.stdin.write("\n")
    proc.stdin.flush()
    t0 = time.perf_counter()
    line = proc.stdout.readline().strip()
    if line != "loaded":
        proc.wait()
        return {"format": fmt, "error": f"exit {proc.returncode}"}
    load_s = time.perf_counter() - t0
    after = _status(proc.pid)
    proc.stdin.write("\n")
    proc.stdin.flush()
    result = json.loads(proc.stdout.readline())
    proc.wait()
    print(f"{fmt}: done", file=sys.stderr, flush=True)
    return {**result, "rss_before_mb": before, "peak_mb": after["VmHWM"], "loaded_mb": after["VmRSS"], "load_s": load_s}


def arithmetic() -> None:
    """The 72B table: weights per format, KV cache per 6+1-tile image sequence, largest batch per card."""
    from nvlm import preset
    from nvlm.pretrained import NVLM

    cfg = preset("nvlm-d-72b")
    with torch.device("meta"):
        model = NVLM(cfg)
    total = sum(p.numel() for p in model.parameters()) * 2
    llm = cfg.llm
    seq = (
        7 * cfg.tokens_per_tile + 7 * 8 + 200
    )  # tiles' tokens, their tags (~8 tokens each), ~200 of question and answer
    kv_per_token = 2 * llm.num_layers * llm.num_kv_heads * llm.head_dim * 2
    kv_seq = kv_per_token * seq
    print(f"NVLM-D-72B: {sum(p.numel() for p in model.parameters()) / 1e9:.1f}B parameters, bf16 {total / GIB:.1f} GiB")
    print(
        f"KV cache (bf16): {kv_per_token / 2**10:.0f} KiB per token; one 6+1-tile image sequence of {seq} tokens: "
        f"{kv_seq / GIB:.2f} GiB"
    )
    parts = {
        k: sum(p.numel() for n, p in model.named_parameters() if n.startswith(k)) * 2 / GIB
        for k in ("vision_model.", "mlp1.", "language_model.model.embed_tokens.", "language_model.lm_head.")
    }
    print("kept in bf16: " + ", ".join(f"{k.rstrip('.')} {v:.2f} GiB" for k, v in parts.items()))
    print("| format | weights | left on 80 GB | batch on 80 GB | left on 141 GB | batch on 141 GB |")
    print("|---|---|---|---|---|---|")
    for fmt in ("bf16", "int8", "fp8", "int4"):
        got, plain = predicted_bytes(model, fmt)
        weights = total - plain + got
        row = [fmt, f"{weights / GIB:.1f} GiB"]
        for card in (80e9, 141e9):
            left = card - weights - 4 * GIB  # CUDA context, activations of a 2k-token prefill, allocator slack
            row += [f"{left / GIB:.1f} GiB" if left > 0 else "does not fit", str(max(0, int(left // kv_seq)))]
        print("| " + " | ".join(row) + " |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="300m", choices=["tiny", "250m", "300m", "330m", "400m", "1b"])
    ap.add_argument("--formats", nargs="+", default=["bf16", "int8", "int4"])
    ap.add_argument("--shard-mb", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=17)
    ap.add_argument("--questions", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each child (1: no waits on a busy CPU)")
    ap.add_argument("--arithmetic", action="store_true")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.arithmetic:
        return arithmetic()
    if args.child:
        return child(*args.child, args)
    from bench_train import config

    from nvlm.pretrained import NVLM

    argv = [
        "--threads",
        str(args.threads),
        "--prompt",
        str(args.prompt),
        "--new-tokens",
        str(args.new_tokens),
        "--questions",
        str(args.questions),
    ]
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        model = NVLM(config(args.preset, "D")).to(torch.bfloat16)
        n = sum(p.numel() for p in model.parameters())
        model.save_pretrained(d, max_shard_size=args.shard_mb * 2**20)
        del model
        shards = sorted(Path(d).glob("*.safetensors"))
        largest = max(f.stat().st_size for f in shards) / 2**20
        print(
            f"{args.preset}: {n / 1e9:.2f}B parameters, {len(shards)} bf16 shards (largest {largest:.0f} MiB); "
            f"torch {torch.__version__}, {args.threads} thread(s) per child"
        )
        rows = [run_child(Path(d), fmt, argv) for fmt in args.formats]
    base = next((r for r in rows if r["format"] == "bf16" and "error" not in r), None)
    print(
        "| format | load peak (VmHWM - before) | loaded (VmRSS - before) "
        "| quantized layers: measured / predicted / bf16 | decode tok/s (x bf16) | same 8-token answers "
        "| same next token | logits rel. error "
        "| median top-2 gap / max logit shift |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['format']} | {r['error']} |")
            continue
        speed = f"{r['decode_tokens_per_s']:.1f}" + (
            f" ({r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x)" if base else ""
        )
        print(
            f"| {r['format']} | {r['peak_mb'] - r['rss_before_mb']:.0f} MiB "
            f"| {r['loaded_mb'] - r['rss_before_mb']:.0f} MiB "
            f"| {r['measured_bytes'] / 2**20:.1f} / {r['predicted_bytes'] / 2**20:.1f} "
            f"/ {r['bf16_bytes'] / 2**20:.1f} MiB "
            f"| {speed} | {r.get('same_answers', 1.0):.0%} | {r.get('same_next_token', 1.0):.0%} "
            f"| {r.get('logits_relative_error', 0.0):.4f} "
            f"| {r.get('median_top2_gap', 0):.3f} / {r.get('median_max_error', 0):.3f} |"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
