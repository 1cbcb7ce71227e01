"""Continuous batching: one thread owns the model and steps every running sequence together.

Each iteration admits waiting sequences (prefilled together as one left-padded batch; if that prefill
fails, each is prefilled alone, so only the culprit fails), then runs one decode step for all running
ones. The running batch shares one KV cache whose rows are right-aligned at a common length: a newly
prefilled batch is merged by left-padding the shorter side (``KVCache.concat``), padding columns are
masked, and every row keeps its own positions, so a sequence computes exactly what it would alone.
Finished or cancelled rows leave at once and the padding no row needs is trimmed. NVLM-X/H's
cross-attention memory moves with its rows. Sampling is per row: temperature, top-k, top-p, seed,
repetition penalty and stop tokens of its own request (a row whose sampling fails fails alone). Only a
failing decode step or merge, which belongs to the whole batch, fails every running sequence.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from nvlm.generation import SamplingParams, no_placeholder, sample
from nvlm.models.cache import KVCache
from nvlm.models.llm import position_ids_from_mask
from nvlm.processor import Encoded, Processor
from nvlm.tokenizer import StreamDecoder


class QueueFull(RuntimeError):
    """More sequences are waiting than the server accepts."""


@dataclass
class Sequence:
    """One generated answer (a request with ``n`` choices has n of them)."""

    prompt: Encoded
    pixels: list[torch.Tensor]  # per image: (n_crops, 3, S, S)
    max_tokens: int
    emit: Callable[[str, Any], None]  # ("delta", text) ... then ("done", finish_reason) or ("error", message)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    repetition_penalty: float = 1.0
    stop_ids: tuple[int, ...] = ()
    tokens: list[int] = field(default_factory=list)
    cancelled: bool = False  # set by the client side: the client left, a stop string matched, a timeout
    generator: torch.Generator | None = None
    decoder: StreamDecoder | None = None


class Engine:
    def __init__(self, model: Any, processor: Processor, max_batch: int = 32, max_waiting: int = 256) -> None:
        self.model, self.processor = model, processor
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.waiting: queue.Queue[Sequence] = queue.Queue()
        self.running: list[Sequence] = []
        self.cache: KVCache | None = None
        self.mask: torch.Tensor | None = None  # (B, L) 1 = real token, 0 = padding
        self.positions: torch.Tensor | None = None  # (B,) position of each row's next token
        self._last: torch.Tensor | None = None  # (B,) each row's latest token, the next step's input
        self.steps = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="nvlm-engine", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------------------------- client side

    def submit(self, seqs: list[Sequence]) -> None:
        if self.waiting.qsize() + len(seqs) > self.max_waiting:
            raise QueueFull(f"{self.waiting.qsize()} sequences are already waiting")
        for s in seqs:
            s.decoder = StreamDecoder(self.processor.tokenizer, skip_special_tokens=True)
            if s.sampling.seed is not None:
                s.generator = torch.Generator(device=self.model.language_model.lm_head.weight.device)
                s.generator.manual_seed(s.sampling.seed)
            self.waiting.put(s)

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    @property
    def load(self) -> dict[str, int]:
        return {"running": len(self.running), "waiting": self.waiting.qsize(), "steps": self.steps}

    # ---------------------------------------------------------------------------------- model side

    def _loop(self) -> None:
        while not self._stop.is_set():
            new = self._admit()
            try:
                with torch.inference_mode():
                    if new:
                        self._admit_prefilled(new)
                    if self.running:
                        self._decode()
            except Exception as e:  # a merge or decode step is the whole batch's: fail it, keep serving
                self._fail(self.running + new, e)
                self.running, self.cache, self.mask, self.positions, self._last = [], None, None, None, None

    def _admit_prefilled(self, new: list[Sequence]) -> None:
        """Prefill ``new`` together; if that fails, one by one, so that only the culprits fail. A failed
        prefill leaves the running batch as it was: ``_prefill`` only computes, ``_merge`` changes state."""
        try:
            groups = [(new, self._prefill(new))]
        except Exception as e:
            if len(new) == 1:
                return self._fail(new, e)
            groups = []
            for s in new:
                try:
                    groups.append(([s], self._prefill([s])))
                except Exception as e:
                    self._fail([s], e)
        for seqs, state in groups:
            self._merge(seqs, *state)

    @staticmethod
    def _fail(seqs: list[Sequence], e: Exception) -> None:
        for s in seqs:
            if not s.cancelled:
                s.cancelled = True
                s.emit("error", f"generation failed: {e}")

    def _admit(self) -> list[Sequence]:
        new: list[Sequence] = []
        while len(self.running) + len(new) < self.max_batch:
            try:
                s = self.waiting.get(timeout=0.05 if not (self.running or new) else 0)
            except queue.Empty:
                break
            if not s.cancelled:
                new.append(s)
        return new

    def _prefill(self, new: list[Sequence]) -> tuple[KVCache, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run ``new``'s prompts: (their KV cache, attention mask, next positions, first tokens)."""
        batch = self.processor.collate([s.prompt for s in new], [s.pixels for s in new]).to(self.model.device)
        mask = batch["attention_mask"]
        cache = KVCache(self.model.config.llm.num_layers, mask.shape[1])
        positions = position_ids_from_mask(mask)
        logits = self.model(**batch, position_ids=positions, cache=cache, num_logits_to_keep=1).logits[:, -1]
        return cache, mask, positions[:, -1] + 1, self._sample(new, logits)

    def _merge(self, new: list[Sequence], cache: KVCache, mask: torch.Tensor, new_pos: torch.Tensor,
               first: torch.Tensor) -> None:  # fmt: skip
        """Join prefilled rows to the running batch (left-padding the shorter side) and deliver their first tokens."""
        caches = [c for c in (self.cache, cache) if c is not None]
        length = max(c.length for c in caches)
        room = max(s.max_tokens - len(s.tokens) for s in self.running + new)
        self.cache = KVCache.concat(caches, length + room + 1)
        masks = [m for m in (self.mask, mask) if m is not None]
        self.mask = torch.cat([torch.nn.functional.pad(m, (length - m.shape[1], 0)) for m in masks])
        self.positions = new_pos if self.positions is None else torch.cat([self.positions, new_pos])
        self.running = self.running + new
        self._last = first if self._last is None else torch.cat([self._last, first])
        self._deliver(new, first)

    def _decode(self) -> None:
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        logits = self.model(self._last[:, None], attention_mask=self.mask, position_ids=self.positions[:, None],
                            cache=self.cache, num_logits_to_keep=1).logits[:, -1]  # fmt: skip
        self.positions = self.positions + 1
        self.steps += 1
        token = self._sample(self.running, logits)
        self._last = token
        self._deliver(self.running, token)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        """One token per row; a row whose sampling fails (e.g. non-finite logits) fails alone and leaves."""
        out = []
        for s, row in zip(seqs, no_placeholder(self.model, logits.float())):
            try:
                if s.repetition_penalty != 1.0:  # CTRL's penalty on every token seen, prompt included
                    seen = torch.tensor(s.prompt.input_ids + s.tokens, device=row.device).unique()
                    picked = row[seen]
                    row = row.clone()
                    row[seen] = torch.where(picked > 0, picked / s.repetition_penalty, picked * s.repetition_penalty)
                out.append(sample(row[None], s.sampling, s.generator)[0])
            except RuntimeError as e:
                self._fail([s], e)
                out.append(row.new_zeros((), dtype=torch.long))
        return torch.stack(out)

    def _deliver(self, seqs: list[Sequence], tokens: torch.Tensor) -> None:
        """Hand each sequence its new token; drop the finished and cancelled rows from the batch."""
        for s, t in zip(seqs, tokens.tolist()):
            if s.cancelled:
                continue
            if t in s.stop_ids:
                s.cancelled = True
                s.emit("done", "stop")
                continue
            s.tokens.append(t)
            text = s.decoder.feed(t)
            if text:
                s.emit("delta", text)
            if len(s.tokens) >= s.max_tokens:
                rest = s.decoder.flush()
                if rest:
                    s.emit("delta", rest)
                s.cancelled = True
                s.emit("done", "length")
        keep = [i for i, s in enumerate(self.running) if not s.cancelled]
        if len(keep) == len(self.running):
            return
        if not keep:
            self.running, self.cache, self.mask, self.positions, self._last = [], None, None, None, None
            return
        idx = torch.tensor(keep, device=self.mask.device)
        self.running = [self.running[i] for i in keep]
        self.mask, self.positions, self._last = self.mask[idx], self.positions[idx], self._last[idx]
        cache = self.cache.select(idx)
        used = int(self.mask.any(0).nonzero()[0])  # leading columns no row needs
        length = cache.length - used
        room = max(s.max_tokens - len(s.tokens) for s in self.running)
        self.cache = cache.realign(length, length + room + 1) if used else cache
        self.mask = self.mask[:, used:]

