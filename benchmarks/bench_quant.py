"""Quantization while loading: peak and loaded memory, CPU decode speed, answers against bf16's.

    .venv/bin/python benchmarks/bench_quant.py [--preset 300m] [--formats bf16 int8 int4] [--shard-mb 128]
    .venv/bin/python benchmarks/bench_quant.py --arithmetic   # the 72B memory table only (no model run)

Writes a random NVLM-D checkpoint (``300m``: bench_train's config, 0.29B parameters, vocab 32k) in bf16 in
shards of ``--shard-mb``, then for each format loads it in a fresh child process. The parent reads the
child's /proc/PID/status: VmRSS just before loading, VmHWM (peak) and VmRSS once loaded. The child then
reports the quantized layers' bytes (measured and predicted by ``predicted_bytes``) and decode tokens/s at
batch 1 (``--prompt`` tokens, ``--new-tokens`` greedy, eos disabled).

Answers (one more child per model, ``answers``): ``--questions`` random 16-token prompts, 8 greedy tokens
each, all in one batch; every variant is compared with bf16 (same batch) on the same weights: how many
next tokens and whole 8-token answers are equal, and the logits' relative error over all prompt positions.
Beside int8 and int4 stand the noise floor's variants, which change only the arithmetic: ``fp32`` (the bf16
weights loaded in float32) and ``bf16, batch 1`` (each prompt alone, so other matmul shapes and orders).

Peaked models (``--peaks``): a random model's top two logits are a median 0.11 apart, 0.19 of the logits'
spread (their std over the vocabulary), where a trained LM's choice stands clear: tests/test_quant.py's
trained tiny model has a median top-2 gap of 7.3 logits, 6.8 times its logits' std (its 4 answer tokens on the
200 held-out questions; one public measurement of a large trained LLM's greedy decode, pegainfer-project/
pegainfer issue 833, gives a median of 7-8 logits). With every other weight the same, each peaked model draws
``lm_head`` as the random rows plus ``a`` times the input embedding of a fixed random successor of each token
(a permutation), rescaled to the random rows' std. This random model's final hidden state is mostly the
current token's embedding (cosine 0.78), so each token's successor gets a margin that grows with ``a``: 0.2,
0.3 and 0.5 give a median top-2 gap of 0.7, 3.0 and 6.9 logit stds (printed by each run). The margin comes
from the unquantized embedding and lm_head; the quantized layers move the logits exactly as in the plain model
(the same relative error). These rows stand beside the plain random row, never instead of it.
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


def prompts(model: torch.nn.Module, n: int, length: int, g: torch.Generator) -> torch.Tensor:
    """(n, length) random text tokens, never the image placeholder."""
    ids = torch.randint(0, model.config.llm.vocab_size, (n, length), generator=g)
    return ids.masked_fill(ids == model.config.image_token_id, 0)


def peak(model: torch.nn.Module, a: float) -> None:
    """Add to ``lm_head`` ``a`` times each token's successor's input embedding (a fixed random permutation),
    rescaled to the lm_head rows' std (module docstring: a trained LM's margin on random weights)."""
    lm = model.language_model
    head, emb = lm.lm_head.weight, lm.model.embed_tokens.weight.float()
    successor_of = torch.randperm(emb.shape[0], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        head.copy_(head.float() + a * emb[successor_of] * (head.float().std() / emb.std()))


def _variant_outputs(model: torch.nn.Module, questions: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(8 greedy tokens per question, float32 logits over every prompt position), ``batch`` questions at a time."""
    answers, logits = [], []
    with torch.no_grad():
        for q in questions.split(batch):
            answers.append(model.generate(q, max_new_tokens=8, eos_token_id=[]))
            logits.append(model(q).logits.float())
    return torch.cat(answers), torch.cat(logits)


def alternative(path: str, spec: str) -> torch.nn.Module:
    """The bf16 checkpoint with the default-quantized linears quantized by one of torchao 0.18's other CPU choices:
    ``spec`` is "int8 g128" (per group of 128 rather than per row), "int4 gG" (group G, tinygemm's min/max
    scales and zeros) or "int4 hqq gG" (HQQ's optimised scales and zeros), G in 32, 64, 128."""
    from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

    from nvlm.pretrained import NVLM
    from nvlm.quant import DEFAULT_MODULES, QuantConfig, _torchao

    tq, fmt, *opts = _torchao(), *spec.split()
    group = int(opts[-1].removeprefix("g"))
    if fmt == "int8":
        cfg = tq.Int8WeightOnlyConfig(granularity=tq.PerGroup(group), set_inductor_config=False)
    else:
        algorithm = "hqq" if "hqq" in opts else "tinygemm"
        cfg = PrototypeInt4WeightOnlyConfig(group, int4_choose_qparams_algorithm=algorithm, set_inductor_config=False)
    model, select = NVLM.from_pretrained(path), QuantConfig(fmt, DEFAULT_MODULES)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and select.selects(name):
            tq.quantize_(m, cfg)
    return model


def answers_child(path: str, formats: list[str], args: argparse.Namespace) -> None:
    """Compare each variant's answers and logits with bf16's on the same weights (the module docstring)."""
    from nvlm.pretrained import NVLM
    from nvlm.quant import quantized_linears, storage_bytes

    torch.set_num_threads(args.threads)
    floor = {"batch1": ("bf16, batch 1", {}, 1), "fp32": ("fp32", {"dtype": torch.float32}, 0)}
    variants = [floor[f] for f in args.floor]
    variants += [(f, {"quantize": f}, 0) for f in formats if f != "bf16"] + [(a, {}, 0) for a in args.alternatives]
    ref = NVLM.from_pretrained(path)
    questions = prompts(ref, args.questions, 16, torch.Generator().manual_seed(0))
    ref_answers, ref_logits = _variant_outputs(ref, questions, len(questions))
    ref_last = ref_logits[:, -1]
    top2 = ref_last.topk(2, dim=-1).values
    gap = top2[:, 0] - top2[:, 1]
    in_stds = float((gap / ref_last.std(-1)).median())
    result = {"median_top2_gap": float(gap.median()), "median_top2_gap_in_stds": in_stds, "rows": []}
    for name, kwargs, batch in variants:
        t0 = time.perf_counter()
        if batch == 1:
            model = ref
        else:
            model = alternative(path, name) if name in args.alternatives else NVLM.from_pretrained(path, **kwargs)
        quantize_s = time.perf_counter() - t0
        answers, logits = _variant_outputs(model, questions, batch or len(questions))
        linears = list(quantized_linears(model).values())
        bf16_bytes = sum(2 * m.weight.numel() for m in linears)
        weight_bytes = sum(storage_bytes(m.weight) for m in linears) / bf16_bytes if linears else None
        del model
        last = logits[:, -1]
        result["rows"].append(
            {
                "variant": name,
                "same_next_token": float((last.argmax(-1) == ref_last.argmax(-1)).float().mean()),
                "same_answers": float((answers == ref_answers).all(1).float().mean()),
                "logits_relative_error": float((logits - ref_logits).norm() / ref_logits.norm()),
                "median_max_error": float((last - ref_last).abs().amax(-1).median()),  # the largest logit shift
                "bytes_x_bf16": weight_bytes,
                "load_s": quantize_s,
            }
        )
    print(json.dumps(result), flush=True)


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
    ids = prompts(model, 1, args.prompt, torch.Generator().manual_seed(0))
    model.generate(ids[:, :8], max_new_tokens=2, eos_token_id=[])  # warm-up
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=1, eos_token_id=[])
    t1 = time.perf_counter()
    model.generate(ids, max_new_tokens=args.new_tokens, eos_token_id=[])
    t2 = time.perf_counter()
    result["decode_tokens_per_s"] = (args.new_tokens - 1) / ((t2 - t1) - (t1 - t0))
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


def _ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.3f}"


def run_answers(path: Path, formats: list[str], floor: list[str], alternatives: list[str], argv: list[str]) -> dict:
    """The ``answers`` child's comparison for the checkpoint at ``path``."""
    cmd = [
        sys.executable,
        __file__,
        "--answers-child",
        str(path),
        *argv,
        "--formats",
        *formats,
        "--floor",
        *floor,
        "--alternatives",
        *alternatives,
    ]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
    print(f"answers of {path.name}: done", file=sys.stderr, flush=True)
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="300m", choices=["tiny", "250m", "300m", "330m", "400m", "1b"])
    ap.add_argument("--formats", nargs="+", default=["bf16", "int8", "int4"])
    ap.add_argument("--shard-mb", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=17)
    ap.add_argument("--questions", type=int, default=128)
    ap.add_argument(
        "--peaks",
        nargs="*",
        type=float,
        default=[0.2, 0.3, 0.5],
        help="lm_head peaking strengths of the extra answer rows (module docstring); none: no extra rows",
    )
    ap.add_argument(
        "--floor",
        nargs="*",
        default=["batch1", "fp32"],
        choices=["batch1", "fp32"],
        help="noise-floor variants of the plain model's answers (the peaked models get fp32 only)",
    )
    ap.add_argument(
        "--alternatives",
        nargs="*",
        default=[],
        metavar="SPEC",
        help='other torchao CPU choices for the plain model\'s answers: "int8 g128", "int4 g32", '
        '"int4 hqq g128" (see alternative())',
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each child (1: no waits on a busy CPU)")
    ap.add_argument("--arithmetic", action="store_true")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--answers-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.arithmetic:
        return arithmetic()
    if args.child:
        return child(*args.child, args)
    if args.answers_child:
        return answers_child(args.answers_child, args.formats, args)
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
        plain = Path(d) / "plain"
        model.save_pretrained(plain, max_shard_size=args.shard_mb * 2**20)
        head = model.language_model.lm_head.weight.detach().clone()
        for a in args.peaks:
            peak(model, a)
            model.save_pretrained(Path(d) / f"peak {a}", max_shard_size=args.shard_mb * 2**20)
            model.language_model.lm_head.weight.data.copy_(head)
        del model, head
        shards = sorted(plain.glob("*.safetensors"))
        largest = max(f.stat().st_size for f in shards) / 2**20
        print(
            f"{args.preset}: {n / 1e9:.2f}B parameters, {len(shards)} bf16 shards (largest {largest:.0f} MiB); "
            f"torch {torch.__version__}, {args.threads} thread(s) per child"
        )
        rows = [run_child(plain, fmt, argv) for fmt in args.formats]
        compared = {"random": run_answers(plain, args.formats, args.floor, args.alternatives, argv)}
        for a in args.peaks:
            compared[f"random, peaked a={a}"] = run_answers(Path(d) / f"peak {a}", args.formats, ["fp32"], [], argv)
    base = next((r for r in rows if r["format"] == "bf16" and "error" not in r), None)
    print(
        "| format | load peak (VmHWM - before) | loaded (VmRSS - before) "
        "| quantized layers: measured / predicted / bf16 | decode tok/s (x bf16) |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['format']} | {r['error']} |")
            continue
        speed = f"{r['decode_tokens_per_s']:.1f}" + (
            f" ({r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x)" if base else ""
        )
        mib = [r[k] / 2**20 for k in ("measured_bytes", "predicted_bytes", "bf16_bytes")]
        print(
            f"| {r['format']} | {r['peak_mb'] - r['rss_before_mb']:.0f} MiB "
            f"| {r['loaded_mb'] - r['rss_before_mb']:.0f} MiB | {mib[0]:.1f} / {mib[1]:.1f} / {mib[2]:.1f} MiB "
            f"| {speed} |"
        )
    print(
        f"\n{args.questions} random 16-token prompts, 8 greedy tokens; each variant against bf16 (batch "
        f"{args.questions}) on the same weights"
    )
    print(
        "| model (bf16's median top-2 gap: logits / logit stds) | variant | same next token | same 8-token answers "
        "| logits rel. error | median max logit shift | quantized layers' bytes (x bf16) |"
    )
    print("|---|---|---|---|---|---|---|")
    for model_name, c in compared.items():
        for r in c["rows"]:
            print(
                f"| {model_name} ({c['median_top2_gap']:.3f} / {c['median_top2_gap_in_stds']:.2f}) | {r['variant']} "
                f"| {r['same_next_token']:.1%} | {r['same_answers']:.1%} | {r['logits_relative_error']:.4f} "
                f"| {r['median_max_error']:.3f} | {_ratio(r['bytes_x_bf16'])} |"
            )
    print(json.dumps({"formats": rows, "answers": compared}))


if __name__ == "__main__":
    main()
