"""A multi-turn conversation with images, streamed token by token.

Each turn renders the whole conversation (images included, as HF ``chat()`` does with its history) and
generates the assistant's answer, which joins the history.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from nvlm.engine import Engine, first_error
from nvlm.pretrained import NVLM
from nvlm.processor import Processor
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
