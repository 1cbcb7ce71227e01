"""``nvlm demo``: the whole system on a laptop CPU in minutes, through what the public commands run.

    nvlm demo [--out runs/demo] [--arch D|X|H] [--scale 1.0]
    nvlm demo --ablation [--out runs/ablation]

The demo runs, printing each step as the command a user would type for it (and calling what that command
calls: ``nvlm.data.cli.synth``, ``nvlm.train.cli.run``, ``nvlm.eval.cli.run``):

1. ``nvlm data synth``: the synthetic images, captions, questions, text-only arithmetic, held-out skills, and a
   tokenizer trained on their text;
2. ``nvlm train`` stage 1 (captions). The paper's stage 1 trains only the projector between a pretrained ViT and
   a pretrained LLM; here both start from random weights, so stage 1 trains everything (``--trainable``);
3. ``nvlm train`` stage 2 (questions blended with text-only arithmetic): the paper's stage 2, ViT frozen;
4. ``nvlm eval`` on each held-out skill, then the same questions asked without their image;
5. a question about a held-out image, answered by ``nvlm.Chat`` (what ``nvlm chat --model RUN/model`` does).

The run directory holds ``data/``, ``stage1/``, ``stage2/`` (checkpoints and metrics), ``model/`` (the final
model), ``eval/`` (predictions, results) and ``report.md``; a rerun reuses each finished step. ``--ablation``
trains the same NVLM-D on the reading skills three times (one low-resolution tile; tiles without tags; tiles
with 1-D tags) and writes the table of paper Table 1's comparison.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nvlm import presets
from nvlm.chat import Chat
from nvlm.data.cli import synth
from nvlm.data.synth import HELDOUT, SynthConfig
from nvlm.demo_report import answer_grid, loss_curves, read_losses, samples_per_s
from nvlm.eval.cli import run as run_eval
from nvlm.eval.runner import EvalConfig
from nvlm.pretrained import NVLM
from nvlm.processor import Processor
from nvlm.train.cli import run as run_training
from nvlm.train.config import TrainConfig
from nvlm.train.stages import PAPER

CHANCE = {"read_number": 1 / 90, "read_small": 1 / 90, "read_word": 1 / 20, "chart": 1 / 9, "shapes": 1 / 6}
# Steps of the demo, aimed at 4 minutes on two quiet CPU cores (``--scale`` multiplies them).
STAGE1_STEPS, STAGE2_STEPS = 500, 1200


def _show(argv: Sequence[str]) -> None:
    """Print the ``nvlm`` command that does the next step, as a user would type it."""
    print(f"\n$ nvlm {' '.join(shlex.quote(a) for a in argv)}", flush=True)


def _synth(data: Path, train: int, test: int) -> None:
    """``nvlm data synth`` into ``data``."""
    _show(["data", "synth", "--out", str(data), "--train", str(train), "--test", str(test)])
    synth(data, SynthConfig(train=train, test=test))


def _train(out: Path, name: str, args: list[str]) -> Path:
    """``nvlm train`` into ``out/name`` unless its model is already there."""
    model = out / name / "model"
    if (model / "config.json").is_file():
        print(f"\n{model}: trained already", flush=True)
        return model
    overrides = ["--out_dir", str(out / name), "--device", "cpu", "--log_every", "100", *args]
    _show(["train", *overrides])
    run_training(TrainConfig.load(None, overrides))
    return model


def _shape(max_tiles: int) -> list[str]:
    """A step's 2048 tokens: 8 packed rows of 256 at one tile an image (6.7% padding over the last 50 steps of
    stage 1; 4 x 512 pads 4.8% and ran at the same samples a second, as attention is per document), 4 rows
    of 512 with tiles (8 x 256 would pad 24-34%)."""
    rows, length = (8, 256) if max_tiles == 1 else (4, 512)
    return ["--max_tiles", str(max_tiles), "--seq_len", str(length), "--micro_batch_size", str(rows)]


def _stages(
    out: Path, data: Path, preset: str, scale: float, extra: Sequence[str] = (), times: dict[str, float] | None = None
) -> Path:
    """Stage 1 then stage 2 into ``out``; returns the final model directory. ``times`` gets each stage's
    seconds (those it trained, not reused).

    Stage 1 runs at the paper's resolution for the architecture (Table 10: one tile for D and X, tiles for H)
    and without tile tags, as Megatron's NVLM pretraining script (no ``--use-tile-tags``); stage 2 with up to
    6 tiles, the model's tags and a constant learning rate. A one-tile stage 1 captions only the images legible
    at one tile (``pretrain_lowres.jsonl``). What decides NVLM-D's reading is stage 2's length (docs/DEMO.md,
    read_number / read_small after 500 stage-1 steps): 62.5% / 52.5% at 600 steps, 92.0% / 82.5% at 900,
    97.5% / 95.5% at 1200; a stage 1 of 300 steps never starts reading, so 500 keeps a margin.
    A step is 2048 tokens (``_shape``), most of its time the LLM's matrix products. One data worker, not two: beside
    it, ``nvlm train`` runs one compute thread on a 2-core machine (``nvlm.train.loop.cpu_threads``) instead
    of two threads fighting two workers for the cores.
    """
    stage1_tiles = PAPER[(presets.preset(preset).arch, 1)]["max_tiles"]
    assert isinstance(stage1_tiles, int)
    common = [
        "--tokenizer",
        str(data / "tokenizer"),
        "--num_workers",
        "1",
        "--warmup_steps",
        "30",
        "--betas",
        "[0.9, 0.98]",
        "--weight_decay",
        "0.0",
        "--grad_clip",
        "1.0",
        "--save_every",
        "250",
        *extra,
    ]
    times = {} if times is None else times
    start = time.perf_counter()
    stage1 = _train(
        out,
        "stage1",
        [
            "--preset",
            preset,
            "--stage",
            "1",
            *_shape(stage1_tiles),
            *common,
            "--trainable",
            "[vision_model., mlp1., language_model., xattn_layers.]",
            "--tile_tags",
            "false",
            "--data",
            json.dumps([{"path": str(data / ("pretrain_lowres.jsonl" if stage1_tiles == 1 else "pretrain.jsonl"))}]),
            "--steps",
            str(max(1, round(STAGE1_STEPS * scale))),
            "--lr",
            "1e-3",
            "--min_lr",
            "5e-4",
        ],
    )
    times["stage1"], start = time.perf_counter() - start, time.perf_counter()
    stage2 = _train(
        out,
        "stage2",
        [
            "--init",
            str(stage1),
            "--stage",
            "2",
            *_shape(6),
            *common,
            "--data",
            json.dumps(
                [{"path": str(data / "sft.jsonl"), "weight": 0.9}, {"path": str(data / "text.jsonl"), "weight": 0.1}]
            ),
            "--steps",
            str(max(1, round(STAGE2_STEPS * scale))),
            "--lr",
            "1e-3",
            "--min_lr",
            "1e-3",
        ],
    )
    times["stage2"] = time.perf_counter() - start
    return stage2


def _blind(path: Path) -> Path:
    """The held-out file without its images: what the model answers from the question alone."""
    out = path.with_name(path.stem + "_blind.jsonl")
    if not out.is_file():
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        out.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "image"}) + "\n" for r in records))
    return out


def _evaluate(model: Path, data: Path, out: Path, skills: Sequence[str], blind: bool = True) -> dict[str, dict]:
    """Exact match per held-out skill, with and (``blind``) without the image, through ``nvlm eval``."""
    files = [data / "heldout" / f"{s}.jsonl" for s in skills]
    if blind:
        files += [_blind(f) for f in files]
    tasks = [f"jsonl:{f}" for f in files]
    _show(
        [
            "eval",
            "--model",
            str(model),
            "--tasks",
            ",".join(tasks),
            "--out",
            str(out),
            "--batch-size",
            "32",
            "--max-new-tokens",
            "8",
        ]
    )
    if run_eval(EvalConfig(model=str(model), tasks=tasks, out=str(out), batch_size=32, max_new_tokens=8)):
        raise RuntimeError("`nvlm eval` failed (exit 1)")
    results = json.loads((out / "results.json").read_text())["tasks"]
    table = {}
    for s in skills:
        row = {"n": results[f"jsonl:{s}"]["n"], "exact_match": results[f"jsonl:{s}"]["metrics"]["exact_match"]}
        if blind:
            row["blind"] = results[f"jsonl:{s}_blind"]["metrics"]["exact_match"]
        table[s] = row
    return table


def _chat(model: Path, data: Path) -> str:
    record = json.loads((data / "heldout" / "read_number.jsonl").read_text().splitlines()[0])
    image = data / "heldout" / record["image"]
    print(f"\n$ nvlm chat --model {model} --image {image} {shlex.quote(record['question'])}", flush=True)
    chat = Chat(NVLM.from_pretrained(model), Processor.from_pretrained(model), max_new_tokens=8)
    answer = chat.ask(record["question"], [str(image)])
    print(answer, flush=True)
    return f"Q: {record['question']} (image {image})\nA: {answer}  (truth: {record['answer']})"


def _table(rows: dict[str, dict], with_blind: bool = True) -> str:
    head = (
        "| skill | n | chance | exact match | without the image |"
        if with_blind
        else "| skill | n | chance | exact match |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for skill, r in rows.items():
        cells = [skill, str(r["n"]), f"{100 * CHANCE[skill]:.1f}%", f"{r['exact_match']:.1f}%"]
        if with_blind:
            cells.append(f"{r['blind']:.1f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _predictions(eval_dir: Path, skill: str) -> dict[str, str]:
    """Held-out id -> the model's answer, from ``nvlm eval``'s prediction files of this skill."""
    out: dict[str, str] = {}
    for f in sorted((eval_dir / "predictions").glob(f"jsonl_{skill}.rank*.jsonl")):
        for line in f.read_text().splitlines()[1:]:  # after the header
            if line.strip():
                r = json.loads(line)
                out[str(r["sample_id"])] = str(r["prediction"])
    return out


def _pictures(out: Path, data: Path, per_skill: int = 2) -> list[Path]:
    """``loss.png`` (both stages' loss curves) and ``answers.png`` (``per_skill`` held-out images of every
    skill with the question, the model's answer and the truth), in ``out``."""
    curves = {
        f"stage {k}: {what}": read_losses(out / f"stage{k}" / "metrics.jsonl")
        for k, what in ((1, "captions, loss by step"), (2, "questions, loss by step"))
    }
    items = []
    for skill in HELDOUT:
        answers = _predictions(out / "eval", skill)
        records = [json.loads(line) for line in (data / "heldout" / f"{skill}.jsonl").read_text().splitlines()]
        items += [{**r, "truth": r["answer"], "answer": answers.get(r["id"], "?")} for r in records[:per_skill]]
    return [loss_curves(curves, out / "loss.png"), answer_grid(items, data / "heldout", out / "answers.png")]


def demo(out: Path, arch: str = "D", scale: float = 1.0, train: int = 6000, test: int = 200) -> Path:
    """The whole demo into ``out`` (see the module docstring); returns ``out``. ``report.md`` holds the
    results table, the two pictures and the seconds of each step run (reused steps count as 0)."""
    start = time.perf_counter()
    data = out / "data"
    _synth(data, train, test)
    times = {"data": time.perf_counter() - start}
    model = _stages(out, data, f"demo-{arch.lower()}", scale, times=times)
    final = out / "model"
    if not (final / "config.json").is_file():
        shutil.copytree(model, final, dirs_exist_ok=True)
    t = time.perf_counter()
    rows = _evaluate(final, data, out / "eval", list(HELDOUT))
    answer = _chat(final, data)
    times["eval and chat"] = time.perf_counter() - t
    _pictures(out, data)
    minutes = (time.perf_counter() - start) / 60
    steps = ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
    throughput = {k: samples_per_s(out / k / "metrics.jsonl") for k in ("stage1", "stage2")}
    (out / "times.json").write_text(json.dumps({**times, "total": 60 * minutes}, indent=2) + "\n")
    report = (
        f"# nvlm demo: a tiny NVLM-{arch} trained on synthetic data\n\n"
        f"Held-out exact match (`{out}/eval/results.json`), greedy, the same model with and without the image:\n\n"
        f"{_table(rows)}\n{answer}\n\n"
        f"Training loss of both stages (the running mean over 25 steps bold):\n\n![loss curves](loss.png)\n\n"
        f"Held-out images, two a skill, with the question, the model's answer (green: right) and the truth:\n\n"
        f"![held-out answers](answers.png)\n\n"
        f"This run: {minutes:.1f} minutes ({steps}); training throughput (paper Table 3's measure): stage 1 "
        f"{throughput['stage1']:.0f}, stage 2 {throughput['stage2']:.0f} samples/s. "
        f"The model: `nvlm chat --model {final}`.\n"
    )
    (out / "report.md").write_text(report)
    print("\n" + report, flush=True)
    return out


# Paper Table 1 (NVLM-D, Yi-34B): the OCR-heavy columns beside ours.
PAPER_TABLE1 = {"Low-res": (64.8, 52.9, 622), "DHR, no tag": (76.1, 80.2, 728), "DHR + 1-D tag": (81.1, 87.4, 806)}


def ablation(out: Path, scale: float = 1.0, train: int = 6000, test: int = 200) -> Path:
    """The same NVLM-D trained three times on the reading skills: low resolution, tiles untagged, 1-D tags."""
    data = out / "data"
    _synth(data, train, test)
    skills = ["read_number", "read_small"]
    variants = {
        "Low-res": ("low-res", "demo-d", ["--max_tiles", "1"]),
        "DHR, no tag": ("untagged", "demo-d-untagged", []),
        "DHR + 1-D tag": ("tagged", "demo-d", []),
    }
    rows: dict[str, dict[str, Any]] = {}
    for name, (folder, preset, extra) in variants.items():
        run = out / folder
        model = _stages(run, data, preset, scale, extra)
        rows[name] = _evaluate(model, data, run / "eval", skills, blind=False)
    lines = [
        "| setting | read_number | read_small | paper ChartQA | paper DocVQA | paper OCRBench |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        p = PAPER_TABLE1[name]
        lines.append(
            f"| {name} | {r['read_number']['exact_match']:.1f} | {r['read_small']['exact_match']:.1f} | "
            f"{p[0]} | {p[1]} | {p[2]} |"
        )
    table = "\n".join(lines) + "\n"
    (out / "ablation.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "ablation.md").write_text(table)
    print("\n" + table, flush=True)
    return out


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="synthetic data -> stage 1 -> stage 2 -> eval -> chat, on a CPU in minutes")
    p.add_argument("--out", default=None, help="run directory (default runs/demo, or runs/ablation)")
    p.add_argument("--arch", choices=["D", "X", "H"], default="D")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the training steps (0.05 for a smoke test)")
    p.add_argument("--train", type=int, default=6000, help="synthetic training images")
    p.add_argument("--test", type=int, default=200, help="held-out images per skill")
    p.add_argument("--ablation", action="store_true", help="the tile-tag ablation (paper Table 1) instead")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    if args.ablation:
        ablation(Path(args.out or "runs/ablation"), args.scale, args.train, args.test)
    else:
        demo(Path(args.out or "runs/demo"), args.arch, args.scale, args.train, args.test)
    return 0
