"""``nvlm data synth --out DIR``: the synthetic multimodal data set (and its tokenizer) of the CPU demo."""

from __future__ import annotations

import argparse
from pathlib import Path

from nvlm.data.synth import SynthConfig, generate, train_demo_tokenizer


def synth(out: str | Path, cfg: SynthConfig) -> Path:
    """``nvlm data synth``: the data set in ``out`` (kept if already generated) and its tokenizer in
    ``out/tokenizer`` (trained on the set's text unless there); returns ``out``."""
    out = Path(generate(out, cfg))
    tokenizer = out / "tokenizer"
    if not (tokenizer / "tokenizer.json").is_file():
        train_demo_tokenizer(out).save(tokenizer)
        print(f"{tokenizer}: tokenizer trained on the data set's text")
    return out


def _synth(args: argparse.Namespace) -> int:
    synth(
        args.out,
        SynthConfig(seed=args.seed, train=args.train, test=args.test, text=args.text, tile_size=args.tile_size),
    )
    return 0


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="data sets").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("synth", help="generate the synthetic multimodal data set (seeded, reproducible)")
    p.add_argument("--out", required=True, help="output directory")

    defaults = SynthConfig()
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--train", type=int, default=defaults.train, help="training images")
    p.add_argument("--test", type=int, default=defaults.test, help="held-out images per skill")
    p.add_argument("--text", type=int, default=defaults.text, help="text-only examples")
    p.add_argument("--tile-size", type=int, default=defaults.tile_size, help="the model's tile size in pixels")
    p.set_defaults(func=_synth)
