"""``nvlm convert SRC DST [--to hf|mcore] [--tp N] [--pp N] [--tokenizer DIR] [--config PRESET|config.json]``.

The source format is told from its files: a Megatron checkpoint (tracker file, ``iter_*``/``release`` or
``mp_rank_*`` directories) converts to the NVLM-D-72B layout, an NVLM-D-72B-layout directory to Megatron's.
"""

from __future__ import annotations

import argparse
from typing import Any

from nvlm.checkpoint import CheckpointError, model_dir
from nvlm.mcore import convert_to_hf, convert_to_mcore, is_mcore


def _convert(args: argparse.Namespace) -> int:
    src_format = "mcore" if is_mcore(args.src) else "hf"
    if src_format == "hf":
        model_dir(args.src)  # a clear error when it is no directory at all
    to = args.to or ("hf" if src_format == "mcore" else "mcore")
    if to == src_format:
        raise CheckpointError(f"{args.src}: already in the {to} layout")
    if to == "hf":
        if args.tp or args.pp or args.iteration is not None:
            raise CheckpointError("--tp, --pp and --iteration are for --to mcore")
        if args.tokenizer is None:
            raise CheckpointError(
                "--tokenizer DIR is needed: a Megatron checkpoint holds no tokenizer "
                "(Qwen2-72B-Instruct's or NVLM-D-72B's)"
            )
        cfg = convert_to_hf(args.src, args.dst, args.tokenizer, args.config, int(args.max_shard_size * 1024**3))
        print(f"wrote {args.dst}: NVLM-D ({cfg.llm.num_layers} LM layers, {cfg.llm.vocab_size} tokens), HF layout")
        return 0
    if args.tokenizer is not None or args.config is not None:
        raise CheckpointError("--tokenizer and --config are for a Megatron source (the NVLM-D-72B layout has both)")
    it_dir = convert_to_mcore(args.src, args.dst, args.tp or 1, args.pp or 1, args.iteration)
    print(f"wrote {it_dir}: TP {args.tp or 1} x PP {args.pp or 1} Megatron legacy rank files")
    return 0


def add_subcommand(sub: Any) -> None:
    p = sub.add_parser("convert", help="convert between Megatron-Core (legacy rank files) and the HF layout")
    p.add_argument("src", help="a Megatron checkpoint directory, or an NVLM-D-72B-layout directory")
    p.add_argument("dst", help="the output directory (new or empty)")
    p.add_argument("--to", choices=["hf", "mcore"], default=None, help="default: the other format")
    p.add_argument(
        "--tp",
        type=int,
        default=None,
        help="--to mcore: tensor parallelism (default 1; Megatron's NVLM-D-72B example runs TP 8)",
    )
    p.add_argument("--pp", type=int, default=None, help="--to mcore: pipeline stages (default 1)")
    p.add_argument("--iteration", type=int, default=None, help="--to mcore: write iter_N (default: release/)")
    p.add_argument("--tokenizer", default=None, help="mcore source: a Qwen2-72B-Instruct or NVLM-D-72B tokenizer dir")
    p.add_argument(
        "--config",
        default=None,
        help="mcore source: a preset or config.json giving the ViT and vocabulary (default nvlm-d-72b)",
    )
    p.add_argument("--max-shard-size", type=float, default=5.0, help="--to hf: GiB per safetensors shard")
    p.set_defaults(func=_convert)
