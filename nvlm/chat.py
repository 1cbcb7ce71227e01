"""A multi-turn conversation with images, streamed token by token.

Each turn renders the whole conversation (images included, as HF ``chat()`` does with its history) and
generates the assistant's answer, which joins the history.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from nvlm.engine import Engine, first_error
from nvlm.pretrained import NVLM
from nvlm.processor import Processor
from nvlm.quant import add_quantize_argument
from nvlm.sampling import SamplingParams


class Chat:
    def __init__(self, model: NVLM, processor: Processor, system: str | None = None, **sampling: Any) -> None:
        self.model, self.processor = model, processor
        self.system = system
        self.sampling = {"max_new_tokens": 1024, **sampling}
        self.messages: list[dict[str, Any]] = []

    def reset(self) -> None:
        self.messages = []

    def stream(self, text: str, images: Sequence[Any] = (), **sampling: Any) -> Iterator[str]:
        """Ask ``text`` about ``images`` (PIL images, paths or bytes); yield the answer as it is decoded.

        The answer's surrounding whitespace is stripped, as the released ``chat()`` strips it: nothing is
        yielded before its first non-space character, whitespace is held back until more text follows it,
        so the pieces join to ``answer.strip()``, which is also what joins the history."""
        content = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": text}]
        system = [{"role": "system", "content": self.system}] if self.system is not None else []
        messages = system + self.messages + [{"role": "user", "content": content}]
        inputs = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        params = SamplingParams(**{"eos_token_id": self.processor.eos_token_ids, **self.sampling, **sampling})
        engine = Engine(self.model, self.processor, max_batch=1)
        (seq,) = engine.add_batch(inputs, params)
        held, started = "", False  # whitespace not yet yielded: dropped at the start, yielded if text follows
        while engine.has_work:
            for update in engine.step():
                piece = held + update.text if started else update.text.lstrip()
                body = piece.rstrip()
                held, started = piece[len(body) :], started or bool(body)
                if body:
                    yield body
        first_error([seq])
        self.messages += [{"role": "user", "content": content}, {"role": "assistant", "content": seq.text.strip()}]

    def ask(self, text: str, images: Sequence[Any] = (), **sampling: Any) -> str:
        """The whole answer at once, stripped of surrounding whitespace."""
        return "".join(self.stream(text, images, **sampling))


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


def add_subcommand(sub: argparse._SubParsersAction) -> None:
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
