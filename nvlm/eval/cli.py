"""``nvlm eval --model DIR --tasks chartqa,docvqa_val,... --data DIR [--limit N]``: benchmarks, as NVLM evaluates.

Under ``torchrun --nproc_per_node N -m nvlm.cli eval ...`` the samples are split over the N processes.
"""

from __future__ import annotations

import argparse

from nvlm.eval.runner import EvalConfig, evaluate, markdown, rank_world
from nvlm.eval.tasks import TASKS, get_task
from nvlm.options import add_options, from_args
from nvlm.quant import add_quantize_argument


def _eval(args: argparse.Namespace) -> int:
    if args.list_tasks:
        for name, task in TASKS.items():
            print(f"{name:20s} {task.dirname}/  ({task.split})")
        print(f"{'jsonl:PATH':20s} your own JSONL file (see docs/EVAL.md)")
        return 0
    if not args.model or not args.tasks:
        raise ValueError("nvlm eval needs --model and --tasks (or --list-tasks)")
    names: list[str] = []
    for t in (t.strip() for t in args.tasks.split(",")):
        names += list(TASKS) if t == "all" else [t] if t else []
    cfg = from_args(EvalConfig, args, tasks=names)
    return run(cfg)


def run(cfg: EvalConfig) -> int:
    """``nvlm eval`` of ``cfg``: evaluate, print the results table (rank 0); 1 when a task failed, else 0."""
    results = evaluate(cfg)
    if rank_world()[0] != 0:
        return 0
    print(markdown(results), end="")
    failed = [n for n in cfg.tasks if "error" in results["tasks"].get(get_task(n).name, {})]
    return 1 if failed else 0


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate on benchmarks (MMMU, DocVQA, ...) beside the paper's numbers",
        description="Each task reads DATA/<its folder> (see docs/EVAL.md, or --list-tasks); "
        "predictions are cached in OUT/predictions, so a rerun resumes.",
    )
    p.add_argument("--tasks", help="comma-separated task names, 'all', or jsonl:PATH for your own data")
    add_options(p, EvalConfig)
    add_quantize_argument(p)
    p.add_argument("--list-tasks", action="store_true", help="list the tasks and their data folders")
    p.set_defaults(func=_eval)
