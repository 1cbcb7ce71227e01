"""``nvlm eval --model DIR --tasks chartqa,docvqa_val,... --data DIR [--limit N]``: benchmarks, as NVLM evaluates.

Under ``torchrun --nproc_per_node N -m nvlm.cli eval ...`` the samples are split over the N processes.
"""

from __future__ import annotations

import argparse

from nvlm.quant import add_quantize_argument


def _eval(args: argparse.Namespace) -> int:
    from nvlm.eval.runner import EvalConfig, evaluate, markdown, rank_world
    from nvlm.eval.tasks import TASKS, get_task

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
    cfg = EvalConfig(
        model=args.model,
        tasks=names,
        data=args.data,
        out=args.out,
        limit=args.limit,
        profile=args.profile,
        max_tiles=args.max_tiles,
        dtype=args.dtype,
        device=args.device,
        quantize=args.quantize,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        merge_timeout=args.merge_timeout,
    )
    results = evaluate(cfg)
    if rank_world()[0] != 0:
        return 0
    print(markdown(results), end="")
    failed = [n for n in names if "error" in results["tasks"].get(get_task(n).name, {})]
    return 1 if failed else 0


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate on benchmarks (MMMU, DocVQA, ...) beside the paper's numbers",
        description="Each task reads DATA/<its folder> (see docs/EVAL.md, or --list-tasks); "
        "predictions are cached in OUT/predictions, so a rerun resumes.",
    )
    p.add_argument("--model", help="checkpoint directory (NVLM-D, -X or -H)")
    p.add_argument("--tasks", help="comma-separated task names, 'all', or jsonl:PATH for your own data")
    p.add_argument("--data", default=None, help="directory holding one folder per benchmark")
    p.add_argument("--out", default=None, help="output directory (default runs/eval/<model name>)")
    p.add_argument("--limit", type=int, default=None, help="only the first N samples of each task")
    p.add_argument(
        "--profile",
        choices=["official", "nvlm"],
        default="official",
        help="official: NVLM prompts + official scoring; nvlm: Megatron NVLM-1.0 prompts and scoring",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None, help="override every task's token budget")
    p.add_argument("--max-tiles", type=int, default=None, help="tiles per image (default: the checkpoint's, 6)")
    p.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: the checkpoint's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 or auto (default: cuda:LOCAL_RANK if any)")
    add_quantize_argument(p)
    p.add_argument(
        "--merge-timeout", type=float, default=24 * 3600.0, help="seconds rank 0 waits for the other ranks' predictions"
    )
    p.add_argument("--list-tasks", action="store_true", help="list the tasks and their data folders")
    p.set_defaults(func=_eval)
