"""``nvlm train --config recipe.yaml [--key value ...]``: a recipe, its overrides, then the loop."""

from __future__ import annotations

import argparse


def _train(args: argparse.Namespace) -> int:
    from nvlm.train.config import TrainConfig
    from nvlm.train.loop import train

    cfg = TrainConfig.load(args.config, args.overrides)
    path = train(cfg)
    print(f"model saved to {path}")
    return 0


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train an NVLM (stage 1 or 2) from a YAML recipe",
                       description="Any recipe field can be overridden: --steps 100 --lr 1e-5 --data '[{path: a.jsonl}]'")  # fmt: skip
    p.add_argument("--config", default=None, help="YAML recipe (see recipes/)")
    p.set_defaults(func=_train, overrides=[])
