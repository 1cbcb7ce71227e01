"""The server's side of generation: one thread that owns the model and steps ``nvlm.engine.Engine``.

Requests are added from the event loop's workers (``submit``), each choice a sequence tagged with the
callback its events go to: ``("delta", text)`` ... then ``("done", finish_reason)`` or ``("error",
message)``. Continuous batching, per-row sampling, stop tokens and strings, and failure isolation are the
engine's (see there); this thread only steps it while there is work, and sleeps until a submit otherwise.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from nvlm.engine import Engine, Sequence
from nvlm.pretrained import NVLM
from nvlm.processor import Encoded, Processor
from nvlm.sampling import SamplingParams
from nvlm.serve.limits import Limits

Emit = Callable[[str, Any], None]
MAX_BATCH = 32  # sequences decoded together
MAX_WAITING = Limits.max_queue  # waiting sequences before a new one is refused


class QueueFull(RuntimeError):
    """More sequences are waiting than the server accepts."""


@dataclass
class Job:
    """One choice of a chat completion: an encoded prompt, its images' crops, its sampling, its callback."""

    prompt: Encoded
    pixels: list[torch.Tensor]  # per image: (n_crops, 3, S, S)
    params: SamplingParams
    emit: Emit


class EngineThread:
    def __init__(
        self, model: NVLM, processor: Processor, max_batch: int = MAX_BATCH, max_waiting: int = MAX_WAITING
    ) -> None:
        self.engine = Engine(model, processor, max_batch)
        self.model, self.processor, self.max_waiting = model, processor, max_waiting
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="nvlm-engine", daemon=True)
        self._thread.start()

    def submit(self, requests: list[Job]) -> list[Sequence]:
        """Queue a request's choices (admitted and prefilled together); ``QueueFull`` past ``max_waiting``."""
        with self._lock:
            waiting = self.engine.num_waiting
            if waiting + len(requests) > self.max_waiting:
                raise QueueFull(f"{waiting} sequences are already waiting")
            seqs = self.engine.add(
                [r.prompt for r in requests],
                [r.pixels for r in requests],
                [r.params for r in requests],
                [r.emit for r in requests],
            )
        self._wake.set()
        return seqs

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    @property
    def running(self) -> list[Sequence]:
        return self.engine.running

    @property
    def steps(self) -> int:
        return self.engine.steps

    @property
    def load(self) -> dict[str, int]:
        return {"running": len(self.engine.running), "waiting": self.engine.num_waiting, "steps": self.engine.steps}

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.engine.has_work:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                updates = self.engine.step()
            except Exception as e:  # not the model's (the engine keeps those with their sequences): fail the batch
                updates = [self.engine._fail(s, e) for s in self.engine.running]
                self.engine._reset()
            for u in updates:
                s, emit = u.seq, u.seq.tag
                if u.text:
                    emit("delta", u.text)
                if s.finish_reason == "error":
                    emit("error", f"generation failed: {s.error}")
                elif s.finish_reason in ("stop", "length"):
                    emit("done", s.finish_reason)
