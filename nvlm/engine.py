"""The one generation engine: a step-based scheduler over sequences (add, step, cancel).

Every way of generating is a client of it: ``model.generate`` and ``nvlm.generation.stream`` (tensors in,
token ids out), ``nvlm.Chat``, ``nvlm eval`` and the server (whose thread only steps it).

Each ``step`` admits waiting sequences, prefilling them as one left-padded batch (prompts added one by one
are collated together; a pre-collated batch is prefilled as it is) and merging them into the running batch,
then runs one decode step for every running sequence. The running rows share one KV cache right-aligned at
a common length (``nvlm.models.cache``): a newly prefilled batch is merged by left-padding the shorter side,
padding columns are masked, every row keeps its own positions, and NVLM-X/H's cross-attention memory moves
with its rows, so a sequence computes what it would alone. Finished and cancelled rows leave at once and
the padding no row needs is trimmed.

Each row samples with its own settings (temperature, top-k, top-p, repetition penalty, a generator of its
own seed) and stops at its stop tokens, at a stop string (the text is cut before it, and a streamed text
holds back what may still become one) or at ``max_new_tokens``. Text is detokenised as it streams (with a
tokenizer: the processor's). Failures stay with their owners: a failed joint prefill is retried sequence by
sequence, so only the culprit fails, and a row whose sampling fails fails alone; only a failing decode step
or merge, which belongs to the whole batch, fails every running sequence. A failed sequence keeps its
exception (``Sequence.error``) for the client to raise or report.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from nvlm.models.cache import KVCache
from nvlm.models.llm import position_ids_from_mask
from nvlm.models.nvlm import NVLMModel
from nvlm.processor import Encoded, Processor
from nvlm.sampling import SamplingParams, no_placeholder, penalize_repetition, sample
from nvlm.tokenizer import StreamDecoder

_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One generated answer: its prompt's ids, the new tokens (a final stop token included), the text."""

    prompt_ids: list[int]
    params: SamplingParams
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # decoded so far, cut before a stop string (needs a tokenizer)
    sent: int = 0  # characters of ``text`` already handed out by ``step``
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
    error: BaseException | None = None
    id: int = field(default_factory=lambda: next(_ids))
    tag: Any = None  # the client's handle (the server's: where the text goes)
    _cancel: bool = False
    _stops: frozenset[int] = frozenset()
    _generator: torch.Generator | None = None
    _decoder: StreamDecoder | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Leave the batch at the next step (safe to call from another thread)."""
        self._cancel = True


@dataclass
class Update:
    """What one step did to a sequence: its new token (None at a failure), the text it may show now."""

    seq: Sequence
    token: int | None
    text: str


@dataclass
class _Group:
    seqs: list[Sequence]
    prompts: list[Encoded] = field(default_factory=list)  # collated with the other prompts admitted together
    pixels: list[list[torch.Tensor]] = field(default_factory=list)
    batch: dict[str, Any] | None = None  # or pre-collated model inputs (no prompts), prefilled as they are


class Engine:
    def __init__(self, model: NVLMModel, processor: Processor | None = None, max_batch: int = 32) -> None:
        self.model, self.processor, self.max_batch = model, processor, max_batch
        self.waiting: deque[_Group] = deque()
        self.running: list[Sequence] = []
        self.steps = 0
        self._reset()

    def _reset(self) -> None:
        self.running = []
        self.cache: KVCache | None = None
        self.mask: torch.Tensor | None = None  # (B, L) 1 = real token, 0 = padding
        self.positions: torch.Tensor | None = None  # (B,) position of each row's next token
        self.last: torch.Tensor | None = None  # (B,) each row's latest token, the next step's input

    # ------------------------------------------------------------------------------------ clients

    def add(
        self,
        prompts: list[Encoded],
        pixels: list[list[torch.Tensor]],
        params: list[SamplingParams],
        tags: list[Any] | None = None,
    ) -> list[Sequence]:
        """Prompts from ``processor.encode``, each with its images' crops (each (n_crops, 3, S, S)), admitted
        together (and collated with the other prompts admitted in the same step). ``tags``: the client's
        handle of each sequence (``Sequence.tag``). Safe to call while another thread steps the engine."""
        if self.processor is None:
            raise ValueError("adding encoded prompts needs an engine with a processor")
        seqs = self._new([p.input_ids for p in prompts], params, tags)
        self.waiting.append(_Group(seqs, list(prompts), list(pixels)))  # one append: atomic
        return seqs

    def add_batch(self, batch: dict[str, Any], params: SamplingParams | list[SamplingParams]) -> list[Sequence]:
        """Pre-collated model inputs (``input_ids`` (B, T) left-padded, ``attention_mask``, pixels, NVLM-X/H's
        memory inputs); one ``SamplingParams`` for all rows (row i's seed: seed + i) or one per row."""
        ids = batch["input_ids"] if batch["input_ids"].dim() == 2 else batch["input_ids"][None]
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask.reshape(ids.shape)
        batch = {**batch, "input_ids": ids, "attention_mask": mask.long()}
        if isinstance(params, SamplingParams):
            params = [
                params if params.seed is None or i == 0 else replace(params, seed=params.seed + i)
                for i in range(ids.shape[0])
            ]
        prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]
        seqs = self._new(prompts, params)
        self.waiting.append(_Group(seqs, batch=batch))
        return seqs

    def cancel(self, seq: Sequence) -> None:
        seq.cancel()

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    @property
    def num_waiting(self) -> int:
        return sum(len(g.seqs) for g in list(self.waiting))

    def run(self) -> None:
        """Step until every sequence has finished."""
        while self.has_work:
            self.step()

    def _new(
        self, prompts: list[list[int]], params: list[SamplingParams], tags: list[Any] | None = None
    ) -> list[Sequence]:
        seqs = []
        device = self.model.language_model.lm_head.weight.device
        for ids, p, tag in zip(prompts, params, tags or [None] * len(prompts), strict=True):
            s = Sequence(list(ids), p, tag=tag, _stops=frozenset(p.stop_ids(self.model.config.llm.eos_token_id)))
            if p.seed is not None and not p.greedy:
                s._generator = torch.Generator(device=device).manual_seed(p.seed)
            if self.processor is not None:
                s._decoder = StreamDecoder(self.processor.tokenizer, skip_special_tokens=True)
            if p.max_new_tokens == 0:
                s.finish_reason = "length"
            seqs.append(s)
        return seqs

    # ------------------------------------------------------------------------------------ one step

    @torch.inference_mode()
    def step(self) -> list[Update]:
        """Admit what fits, then decode one token for every running sequence; what changed, in order."""
        updates: list[Update] = []
        self._drop_cancelled()
        new = self._admit()
        try:
            self._prefill_and_merge(new, updates)
            if self.running:
                self._decode(updates)
        except Exception as e:  # a merge or decode step is the whole batch's: fail it, keep going
            for s in self.running:
                if not s.finished:
                    updates.append(self._fail(s, e))
            self._reset()
        self.steps += 1
        return updates

    def _admit(self) -> list[_Group]:
        """The waiting groups that fit in the batch (a group larger than ``max_batch`` enters an empty one)."""
        new: list[_Group] = []
        room = self.max_batch - len(self.running)
        while self.waiting and (len(self.waiting[0].seqs) <= room or not (self.running or new)):
            group = self.waiting.popleft()
            for s in group.seqs:
                if s._cancel and not s.finished:
                    s.finish_reason = "cancelled"
            if not all(s.finished for s in group.seqs):  # (max_new_tokens 0 finishes a sequence at once)
                new.append(group)
                room -= len(group.seqs)
        return new

    def _prefill_and_merge(self, groups: list[_Group], updates: list[Update]) -> None:
        """Prefill the admitted groups (prompts together, batches each alone); on a failure, one sequence at a
        time, so that only the culprits fail. A failed prefill leaves the running batch as it was."""
        prompt_groups = [g for g in groups if g.batch is None]
        jobs: list[_Group] = [g for g in groups if g.batch is not None]
        if prompt_groups:
            jobs.append(
                _Group(
                    [s for g in prompt_groups for s in g.seqs],
                    [p for g in prompt_groups for p in g.prompts],
                    [x for g in prompt_groups for x in g.pixels],
                )
            )
        for job in jobs:
            try:
                state = self._prefill(job)
            except Exception as e:
                if job.batch is not None or len(job.seqs) == 1:
                    updates += [self._fail(s, e) for s in job.seqs if not s.finished]
                    continue
                for one in (_Group([s], [p], [x]) for s, p, x in zip(job.seqs, job.prompts, job.pixels, strict=True)):
                    try:
                        self._merge(one.seqs, *self._prefill(one), updates)
                    except Exception as e1:
                        updates.append(self._fail(one.seqs[0], e1))
                continue
            self._merge(job.seqs, *state, updates)

    def _prefill(self, job: _Group) -> tuple[KVCache, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run a job's prompts: (their KV cache, attention mask, next positions, first tokens)."""
        if job.batch is not None:
            raw = job.batch
        else:
            assert self.processor is not None  # add() refuses prompts without one
            raw = self.processor.collate(job.prompts, job.pixels)
        batch = {k: v.to(self.model.device) for k, v in raw.items() if v is not None}
        mask = batch.pop("attention_mask")
        cache = KVCache(self.model.config.llm.num_layers, mask.shape[1])
        positions = position_ids_from_mask(mask)
        logits = self.model(
            **batch, attention_mask=mask, position_ids=positions, cache=cache, num_logits_to_keep=1
        ).logits[:, -1]
        return cache, mask, positions[:, -1] + 1, self._sample(job.seqs, logits)

    def _merge(
        self,
        new: list[Sequence],
        cache: KVCache,
        mask: torch.Tensor,
        next_pos: torch.Tensor,
        first: torch.Tensor,
        updates: list[Update],
    ) -> None:
        """Join prefilled rows to the running batch (left-padding the shorter side), then deliver their first tokens."""
        caches = [c for c in (self.cache, cache) if c is not None]
        length = max(c.length for c in caches)
        room = max(s.params.max_new_tokens - len(s.tokens) for s in self.running + new)
        self.cache = KVCache.concat(caches, length + room + 1)
        masks = [m for m in (self.mask, mask) if m is not None]
        self.mask = torch.cat([F.pad(m, (length - m.shape[1], 0)) for m in masks])
        self.positions = next_pos if self.positions is None else torch.cat([self.positions, next_pos])
        self.last = first if self.last is None else torch.cat([self.last, first])
        self.running = self.running + new
        self._deliver(new, first, updates)

    def _decode(self, updates: list[Update]) -> None:
        assert self.mask is not None and self.last is not None and self.positions is not None  # a running batch
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        logits = self.model(
            self.last[:, None],
            attention_mask=self.mask,
            position_ids=self.positions[:, None],
            cache=self.cache,
            num_logits_to_keep=1,
        ).logits[:, -1]
        self.positions = self.positions + 1
        self.last = self._sample(self.running, logits)
        self._deliver(self.running, self.last, updates)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        """One token per row (all greedy: one argmax); a row whose sampling fails fails alone and leaves."""
        logits = no_placeholder(logits.float(), self.model.config.image_token_id)
        if all(s.params.greedy and s.params.repetition_penalty == 1.0 for s in seqs):
            return logits.argmax(-1)
        out = []
        for s, row in zip(seqs, logits, strict=True):
            try:
                seen = torch.tensor(s.prompt_ids + s.tokens, dtype=torch.long, device=row.device).unique()
                row = penalize_repetition(row, seen, s.params.repetition_penalty)
                out.append(sample(row[None], s.params, s._generator)[0])
            except RuntimeError as e:
                s.error, s.finish_reason = e, "error"
                out.append(row.new_zeros((), dtype=torch.long))
        return torch.stack(out)

    def _deliver(self, seqs: list[Sequence], tokens: torch.Tensor, updates: list[Update]) -> None:
        """Hand each sequence its new token; drop the finished and cancelled rows from the batch."""
        for s, t in zip(seqs, tokens.tolist(), strict=True):
            if s.finish_reason == "error":  # its sampling failed just now
                updates.append(Update(s, None, ""))
                continue
            if s.finished:
                continue
            s.tokens.append(t)
            if t in s._stops:
                s.finish_reason = "stop"
            elif s._decoder is not None:
                self._add_text(s, s._decoder.feed(t))
            if not s.finished and len(s.tokens) >= s.params.max_new_tokens:
                s.finish_reason = "length"
            if s.finished and s._decoder is not None:  # what the decoder still holds (not after a stop string)
                self._add_text(s, s._decoder.flush())
            updates.append(Update(s, t, self._release(s)))
        self._drop_finished()

    # ------------------------------------------------------------------------------------ text

    def _add_text(self, s: Sequence, delta: str) -> None:
        """Append decoded text; a stop string ends the sequence, the text cut before it."""
        if not delta:
            return
        start = max(0, len(s.text) - max((len(x) for x in s.params.stop), default=0))
        s.text += delta
        cuts = [i for i in (s.text.find(x, start) for x in s.params.stop) if i >= 0]
        if cuts:
            s.text, s.finish_reason = s.text[: min(cuts)], "stop"
            s._decoder = None  # nothing after a stop string is shown

    @staticmethod
    def _release(s: Sequence) -> str:
        """The text the client may show now: all once finished, else all but what may still become a stop string."""
        hold = 0 if s.finished else max((len(x) - 1 for x in s.params.stop), default=0)
        end = max(s.sent, len(s.text) - hold)
        out, s.sent = s.text[s.sent : end], end
        return out

    # ------------------------------------------------------------------------------------ rows

    def _fail(self, s: Sequence, e: BaseException) -> Update:
        s.error, s.finish_reason = e, "error"
        return Update(s, None, "")

    def _drop_cancelled(self) -> None:
        for s in self.running:
            if s._cancel and not s.finished:
                s.finish_reason = "cancelled"
        self._drop_finished()

    def _drop_finished(self) -> None:
        keep = [i for i, s in enumerate(self.running) if not s.finished]
        if len(keep) == len(self.running):
            return
        if not keep:
            return self._reset()
        assert self.mask is not None and self.positions is not None and self.last is not None
        assert self.cache is not None  # rows are running
        idx = torch.tensor(keep, device=self.mask.device)
        self.running = [self.running[i] for i in keep]
        self.mask, self.positions, self.last = self.mask[idx], self.positions[idx], self.last[idx]
        cache = self.cache.select(idx)
        unused = int(self.mask.any(0).nonzero()[0])  # leading columns no row needs
        length = cache.length - unused
        room = max(s.params.max_new_tokens - len(s.tokens) for s in self.running)
        self.cache = cache.realign(length, length + room + 1) if unused else cache
        self.mask = self.mask[:, unused:]


def first_error(seqs: Iterable[Sequence]) -> None:
    """Raise the first failed sequence's exception (clients that generate for one caller)."""
    for s in seqs:
        if s.error is not None:
            raise s.error
