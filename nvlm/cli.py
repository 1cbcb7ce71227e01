"""The ``nvlm`` command: ``nvlm chat --model DIR [--image FILE ...] [QUESTION]``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from nvlm.chat import Chat
from nvlm.data.cli import add_subcommand as add_data
from nvlm.demo import add_subcommand as add_demo
from nvlm.eval.cli import add_subcommand as add_eval
from nvlm.logs import setup_logging
from nvlm.mcore.cli import add_subcommand as add_convert
from nvlm.pretrained import NVLM
from nvlm.processor import Processor
from nvlm.quant import add_quantize_argument
from nvlm.serve.cli import add_subcommand as add_serve
from nvlm.train.cli import add_subcommand as add_train

HELP_INTERACTIVE = "Type a question. /image PATH attaches an image to the next question; /reset; /exit."


def _chat(args: argparse.Namespace) -> int:
    model = NVLM.from_pretrained(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize)
    processor = Processor.from_pretrained(args.model, max_tiles=args.max_tiles)
    sampling = {
        "max_new_tokens": args.max_new_tokens,
        "do_sample": args.temperature > 0,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
    }
    chat = Chat(model, processor, system=args.system, **sampling)

    def answer(question: str, images: list[str]) -> None:
        for delta in chat.stream(question, images):
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")

    if args.question:
        answer(" ".join(args.question), args.image)
        return 0
    print(HELP_INTERACTIVE, file=sys.stderr)
    pending = list(args.image)
    while True:
        try:
            line = input(">>> ").strip()
        except EOFError:
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            chat.reset()
        elif line.startswith("/image "):
            pending.append(line.removeprefix("/image ").strip())
        elif line:
            try:
                answer(line, pending)
            except ValueError as e:  # a bad image or prompt: say so and keep the session
                print(f"error: {e}", file=sys.stderr)
            pending = []


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nvlm", description="NVLM 1.0 in pure PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    chat = sub.add_parser("chat", help="chat with a model, streaming its answers")
    chat.add_argument("--model", required=True, help="checkpoint directory (NVLM-D-72B layout)")
    chat.add_argument("--image", action="append", default=[], help="image file for the first question (repeatable)")
    chat.add_argument("--system", default=None, help="system prompt (default: the checkpoint's chat format)")
    chat.add_argument("--max-new-tokens", type=int, default=1024)
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    chat.add_argument("--top-p", type=float, default=1.0)
    chat.add_argument("--top-k", type=int, default=0)
    chat.add_argument("--seed", type=int, default=None)
    chat.add_argument("--max-tiles", type=int, default=None, help="fewer tiles per image (saves memory)")
    chat.add_argument("--dtype", default=None, help="e.g. bfloat16, float32 (default: the checkpoint's)")
    chat.add_argument("--device", default=None, help="cpu, cuda, cuda:1 or auto (split across GPUs)")
    add_quantize_argument(chat)
    chat.add_argument("question", nargs="*", help="ask this and exit; interactive when absent")
    chat.set_defaults(func=_chat)
    add_train(sub)
    add_serve(sub)
    add_eval(sub)
    add_data(sub)
    add_demo(sub)
    add_convert(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = extra  # `nvlm train --config r.yaml --steps 10`: recipe overrides
    try:
        setup_logging()
        return args.func(args)
    except (ValueError, OSError) as e:
        print(f"nvlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
