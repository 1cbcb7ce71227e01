"""Per-rank memory of ``nvlm train`` on CPU under torchrun (gloo), against ``nvlm train --plan``.

    .venv/bin/python benchmarks/bench_train_memory.py [--ranks 1 2 4] [--preset 250m] [--steps 3]

Writes a random NVLM-D checkpoint of ``benchmarks/bench_train.py``'s config (``250m``: hidden 1024, 12
layers, vocab 152064 behind the tiny ViT) with ``save_pretrained``, a synthetic image data set and the
tiny tokenizer, then for each rank count runs ``torchrun --nproc_per_node N -m nvlm.cli train`` (stage 2,
``--device cpu``, FSDP2 for N > 1) and samples every rank's resident memory from outside (``/proc/PID/status``
``VmRSS`` of torchrun's children, every 20 ms). Loading is everything before the first step began (the first
metrics record's time less its step time); training runs from there to the last step's record (the final
save after it is left out). The largest rank's peaks are reported above the baseline of a process that has
imported the training code and built a tiny model on the meta device, as a share of the 1-rank figure and
(loading) of the fp32 model's bytes, beside the plan's per-device figures (parameters for loading, the total
for training). A checkpoint already in the
training dtype stays memory-mapped until first touched, so one rank's loading peak is small and its weights
appear in the training peak.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from nvlm.hf_config import from_json_file

MIB = 2**20
IMPORTS = "import torch, torch.distributed, nvlm.cli, nvlm.train.loop, nvlm.train.state"


def rss_mib(pid: int, field: str = "VmRSS") -> float | None:
    """A field of /proc/PID/status in MiB, or None once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def children(pid: int) -> list[int]:
    """The direct children of a process (torchrun's ranks)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(x) for x in (task / "children").read_text().split()]
        except FileNotFoundError:
            pass
    return sorted(set(out))


def baseline_mib() -> float:
    """VmRSS of a fresh interpreter that has imported the training code and built a tiny model on meta (torch's
    meta-device init functions import ``torch._dynamo``: ~30 MiB, whatever the model's size)."""
    code = (
        f"{IMPORTS}; from nvlm import NVLM; from nvlm.presets import preset\n"
        "with torch.device('meta'): NVLM(preset('tiny-d'))\n"
        "print(open('/proc/self/status').read())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return next(int(line.split()[1]) / 1024 for line in out.splitlines() if line.startswith("VmRSS:"))


def write_data(root: Path) -> Path:
    """Questions on images of two tiles (+ thumbnail), an image in every record: under FSDP2 a rank whose
    micro-batch has no image skips the ViT's and the projector's collectives that the others run (a
    collective mismatch with 4 ranks on today's code)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (name, rgb) in enumerate({"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}.items()):
        Image.new("RGB", (112, 56), rgb).save(root / "images" / f"{i}.png")
        for question in ("Color?", "What colour is this?"):
            lines.append(
                {
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "image", "image": f"images/{i}.png"},
                                {"type": "text", "text": question},
                            ],
                        },
                        {"role": "assistant", "content": name},
                    ]
                }
            )
    (root / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root / "train.jsonl"


def write_model(path: Path, preset_name: str) -> None:
    """A random NVLM-D checkpoint of bench_train's config, with the tiny tokenizer (fp32)."""
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_train import config

    from nvlm import NVLM
    from nvlm.tokenizer import build_tiny_tokenizer

    torch.manual_seed(0)
    model = NVLM(config(preset_name, "D"))
    model.save_pretrained(path)
    build_tiny_tokenizer().save(path)


def run(ranks: int, args: list[str], out: Path, env: dict[str, str]) -> dict[str, float]:
    """One torchrun; every rank's peak VmRSS (MiB) in the loading and the training phase."""
    with socket.socket() as s:  # a free port: other runs may hold torchrun's default
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(ranks),
        "--master_port",
        str(port),
        "-m",
        "nvlm.cli",
        "train",
        *args,
        "--out_dir",
        str(out),
    ]
    log = (out.parent / f"{out.name}.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    metrics = out / "metrics.jsonl"
    samples: list[tuple[float, int, float]] = []  # (time, rank index, MiB)
    seen_lines, first_start, last_end = 0, None, None
    while proc.poll() is None:
        now = time.time()
        for i, pid in enumerate(children(proc.pid)):
            mib = rss_mib(pid)
            if mib is not None:
                samples.append((now, i, mib))
        if metrics.exists():
            lines = metrics.read_text().splitlines()
            if len(lines) > seen_lines:
                if seen_lines == 0:
                    first = json.loads(lines[0])
                    first_start = now - first["tokens"] / first["tokens_per_s"]
                seen_lines, last_end = len(lines), now
        time.sleep(0.02)
    if proc.returncode:
        lines = Path(log.name).read_text().splitlines()
        first = next((i for i, line in enumerate(lines) if "Error" in line or "terminate" in line), len(lines))
        raise SystemExit(f"torchrun with {ranks} ranks failed:\n" + "\n".join(lines[max(0, first - 5) : first + 30]))
    if first_start is None:
        raise SystemExit("no step was recorded")
    load = [max((m for t, i, m in samples if i == r and t < first_start), default=0.0) for r in range(ranks)]
    step = [
        max((m for t, i, m in samples if i == r and first_start <= t <= last_end), default=0.0) for r in range(ranks)
    ]
    return {"load": max(load), "train": max(step)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--preset", default="250m", choices=["tiny", "250m", "300m", "330m", "400m", "1b"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch-size", type=int, default=1)
    ap.add_argument("--max-tiles", type=int, default=2)
    ap.add_argument("--activation-checkpointing", action="store_true")
    args = ap.parse_args()

    from nvlm.train.config import TrainConfig
    from nvlm.train.plan import plan

    base = baseline_mib()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        model, data = tmp_path / "model", write_data(tmp_path / "data")
        write_model(model, args.preset)
        config = from_json_file(model / "config.json")
        recipe = [
            "--init",
            str(model),
            "--stage",
            "2",
            "--data",
            json.dumps([{"path": str(data)}]),
            "--device",
            "cpu",
            "--steps",
            str(args.steps),
            "--seq_len",
            str(args.seq_len),
            "--max_tiles",
            str(args.max_tiles),
            "--micro_batch_size",
            str(args.micro_batch_size),
            "--warmup_steps",
            "1",
            "--save_every",
            "1000000",
            "--log_every",
            "1000000",
            "--activation_checkpointing",
            str(args.activation_checkpointing).lower(),
        ]
        train_cfg = TrainConfig.load(None, recipe)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
        for n in args.ranks:
            measured = run(n, recipe, tmp_path / f"run{n}", env)
            p = plan(config, train_cfg, n, 1024.0, devices_per_node=max(args.ranks))
            rows.append((n, measured["load"] - base, measured["train"] - base, p))
    one_load, one_train, p0 = rows[0][1], rows[0][2], rows[0][3]
    print(
        f"{p0.params_total / 1e9:.3f}B parameters ({p0.params_trained / 1e9:.3f}B trained), stage 2, seq_len "
        f"{args.seq_len}, micro batch {args.micro_batch_size}, {args.max_tiles} tiles + thumbnail, activation "
        f"checkpointing {'on' if args.activation_checkpointing else 'off'}; baseline after imports {base:.0f} MiB\n"
    )
    model_mib = 4 * p0.params_total / MIB  # the fp32 checkpoint
    print(
        "| ranks | load peak (MiB) | x 1 rank | x model | plan: parameters | train peak (MiB) | x 1 rank | plan: total "
        "| measured / plan |\n|---|---|---|---|---|---|---|---|---|"
    )
    for n, load, step, p in rows:
        print(
            f"| {n} | {load:,.0f} | {load / one_load:.2f} | {load / model_mib:.2f} | {p.parameters / MIB:,.0f} | "
            f"{step:,.0f} | {step / one_train:.2f} | {p.total / MIB:,.0f} | {step / (p.total / MIB):.2f} |"
        )


if __name__ == "__main__":
    main()
