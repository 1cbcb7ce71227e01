"""``nvlm train --config recipe.yaml [--key value ...]``: a recipe, its overrides, then the loop.

``--plan`` prints the run's per-device memory instead (``nvlm.train.plan``): no weights read, no step run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nvlm.train.config import TrainConfig
from nvlm.train.distributed import teardown
from nvlm.train.loop import train
from nvlm.train.plan import format_table, model_config, plan, smallest_fit

PLAN_FLAGS = ("devices", "device_memory", "devices_per_node", "hsdp", "json")


def _train(args: argparse.Namespace) -> int:
    cfg = TrainConfig.load(args.config, args.overrides)
    if args.plan:
        return _plan(cfg, args)
    given = [f"--{k.replace('_', '-')}" for k in PLAN_FLAGS if getattr(args, k) not in (None, False)]
    if given:
        raise ValueError(f"{', '.join(given)}: only with --plan")

    run(cfg)
    return 0


def run(cfg: TrainConfig) -> Path:
    """``nvlm train`` without ``--plan``: the training run of ``cfg``, its process group torn down after;
    returns the directory of the saved model."""
    path = train(cfg)
    teardown()
    print(f"model saved to {path}")
    return path


def _plan(cfg: TrainConfig, args: argparse.Namespace) -> int:
    config = model_config(cfg)
    per_node = args.devices_per_node if args.devices_per_node is not None else 8
    memory = args.device_memory if args.device_memory is not None else 80.0
    devices = args.devices if args.devices is not None else per_node
    p = plan(config, cfg, devices, memory, devices_per_node=per_node, hsdp=args.hsdp)
    fit = smallest_fit(config, cfg, memory, devices_per_node=per_node, hsdp=args.hsdp)
    if args.json:
        print(json.dumps({"plan": p.to_dict(), "smallest_fit": fit and fit.to_dict()}, indent=2))
    else:
        label = f"NVLM-{config.arch} stage {cfg.stage} ({args.config or 'no recipe'})"
        print(format_table(p, fit, label))
    return 0


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train an NVLM (stage 1 or 2) from a YAML recipe",
        allow_abbrev=False,
        description="Any recipe field can be overridden: --steps 100 --lr 1e-5 --data '[{path: a.jsonl}]'",
    )
    p.add_argument("--config", default=None, help="YAML recipe (see recipes/)")
    plan = p.add_argument_group("memory plan (no weights read, no step run)")
    plan.add_argument(
        "--plan", action="store_true", help="print the per-device memory and the smallest device count that fits"
    )
    plan.add_argument("--devices", type=int, default=None, help="devices to plan for (default: one node)")
    plan.add_argument("--device-memory", type=float, default=None, help="GiB per device (default 80)")
    plan.add_argument("--devices-per-node", type=int, default=None, help="devices per node (default 8)")
    plan.add_argument("--hsdp", action="store_true", help="shard within a node, replicate across nodes")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_train, overrides=[])
