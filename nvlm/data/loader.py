"""Training micro-batches with the expensive part off the training loop: a stateful loader with worker processes.

``Loader`` yields the micro-batches ``Batcher`` packs from the blend (``nvlm.data.blend``). With
``num_workers=0`` every record is encoded (JSON -> image decode, tiling, tokenization: ``encode_example``) in
this process. With ``num_workers=N`` worker ``w`` encodes the items ``n % N == w`` of this rank's stream (``n``
counted from where the workers started); every worker replays the cheap draws of the whole stream, and the
results are read back in stream order, an unusable record as a ``Skipped`` marker. So the batches, the skip
counts and ``state_dict()`` are bit-identical for every ``num_workers``.

Workers are started from a fork server (spawn where there is none), never forked from the training process:
it has threads by then (gloo, the image pool, CUDA), and a fork of a process with threads can deadlock. They
end with the loader (``close``, garbage collection, interpreter exit after an exception or Ctrl-C); a worker
whose training process is gone (kill -9) ends at its next send, and a worker that raises or dies makes the
next batch fail with a one-line ``RuntimeError`` (its traceback on stderr) instead of a hang.

``state_dict()`` is this rank's position: the stream state after the last example of the last returned batch
(an example packing left waiting is read again on resume), skip counts, rank and world size; a small JSON-able
dict. ``reshard`` converts every rank's states for a different world size.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import os
import pickle
import queue
import signal
import threading
import traceback
import weakref
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from nvlm.data.blend import Blend, Skipped, Source
from nvlm.data.labels import Example
from nvlm.data.packing import collate
from nvlm.processor import BatchInputs, Processor

log = logging.getLogger(__name__)

_CONTEXT = mp.get_context("forkserver") if "forkserver" in mp.get_all_start_methods() else mp.get_context("spawn")


class Batcher:
    """Micro-batches from a blend: rows of ``seq_len`` packed first-fit (or one example per row).

    An example that does not fit waits for the next micro-batch; ``state_dict`` is the stream state before
    it, so resume reads it again.
    """

    def __init__(self, blend: Blend, processor: Processor, rows: int, seq_len: int, pack: bool) -> None:
        self.blend, self.processor, self.rows, self.seq_len, self.pack = blend, processor, rows, seq_len, pack
        self.waiting: tuple[Example, dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        return self.waiting[1] if self.waiting else self.blend.state_dict()

    def _next(self) -> tuple[Example, dict[str, Any]]:
        if self.waiting:
            item, self.waiting = self.waiting, None
            return item
        before = self.blend.state_dict()
        return self.blend.next_example(), before

    def __call__(self) -> BatchInputs:
        if not self.pack:
            return collate(self.processor, [[self._next()[0]] for _ in range(self.rows)])
        rows: list[list[Example]] = [[] for _ in range(self.rows)]
        room = [self.seq_len] * self.rows
        while True:
            ex, before = self._next()
            r = next((i for i, free in enumerate(room) if free >= len(ex)), None)
            if r is None:
                self.waiting = (ex, before)
                return collate(self.processor, [row for row in rows if row], self.seq_len)
            rows[r].append(ex)
            room[r] -= len(ex)


class Loader:
    """This rank's micro-batches (``loader()``), encoded by ``num_workers`` processes (0: this one), each
    holding up to ``prefetch`` encoded examples ahead (plus one in the pipe). Use it as a context manager
    or call ``close``."""

    def __init__(
        self,
        processor: Processor,
        sources: Sequence[Source],
        seq_len: int,
        rows: int,
        pack: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        prefetch: int = 8,
    ) -> None:
        if num_workers < 0 or prefetch < 1:
            raise ValueError(f"num_workers must be >= 0 and prefetch >= 1, not {num_workers} and {prefetch}")
        args = (processor, sources, seq_len, seed, rank, world_size)
        self.blend = _WorkerBlend(*args, num_workers, prefetch) if num_workers else Blend(*args)
        self.batcher = Batcher(self.blend, processor, rows, seq_len, pack)

    def __call__(self) -> BatchInputs:
        return self.batcher()

    @property
    def skipped(self) -> Counter[str]:
        """Unusable records of this rank so far, by reason."""
        return self.blend.skipped

    def state_dict(self) -> dict[str, Any]:
        return {**self.batcher.state_dict(), "rank": self.blend.rank, "world_size": self.blend.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (workers restart there); a state of another world size must go through
        ``reshard`` first. (A state without rank and world size, from before they were saved, is accepted.)"""
        saved = int(state.get("world_size", self.blend.world_size))
        if saved != self.blend.world_size:
            raise ValueError(
                f"this data state was saved by a run of {saved} ranks, this one has {self.blend.world_size}: "
                "convert every rank's saved state with nvlm.data.loader.reshard first"
            )
        self.blend.load_state_dict(state)
        self.batcher.waiting = None

    def close(self) -> None:
        """Stop the workers (a later batch starts new ones where the stream is)."""
        if isinstance(self.blend, _WorkerBlend):
            self.blend.close()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def reshard(states: Sequence[dict[str, Any]], world_size: int) -> list[dict[str, Any]]:
    """Every rank's saved data state (in rank order) -> the states for a run of ``world_size`` ranks.

    The rule: every new rank starts at the smallest saved position ``m``. Each old rank ``r`` at position
    ``p_r >= m`` had consumed exactly its items ``k < p_r`` (``k % len(states) == r``), so every item before
    ``m`` was consumed and every item from ``m`` on is read by a new rank: no sample is skipped. The items
    of ``[m, M)`` (``M`` the largest saved position) that their old rank had consumed are read a second time:
    at most ``M - m`` repeats, exactly the sum over old ranks of ``#{k in [m, p_r): k % len(states) == r}``.
    Skip counts of old rank ``r`` go to new rank ``r % world_size`` (their total is kept; records skipped
    among the repeats are counted again). The same world size returns the states unchanged.
    """
    if world_size < 1 or not states:
        raise ValueError(
            f"reshard needs every rank's saved state and a world size >= 1, not {len(states)} and {world_size}"
        )
    if len(states) == world_size:
        return list(states)
    for r, s in enumerate(states):
        if int(s.get("rank", r)) != r or int(s.get("world_size", len(states))) != len(states):
            raise ValueError(
                f"state {r} is rank {s.get('rank')} of {s.get('world_size')}: give every rank's, in rank order"
            )
    first = min(states, key=lambda s: int(s["position"]))
    counts: list[Counter[str]] = [Counter() for _ in range(world_size)]
    for r, s in enumerate(states):
        counts[r % world_size].update(s.get("skipped", {}))
    return [
        {
            "position": int(first["position"]),
            "drawn": [int(n) for n in first["drawn"]],
            "skipped": dict(counts[j]),
            "rank": j,
            "world_size": world_size,
        }
        for j in range(world_size)
    ]


@dataclass(frozen=True)
class _Failure:
    where: str  # the record being encoded, or "start"
    error: str  # the exception's last traceback line
    traceback: str


class _WorkerBlend(Blend):
    """The blend whose items come from worker processes, in stream order (see the module docstring). The
    records here are read only to check the sources; the position, draws and skip counts are kept here."""

    def __init__(
        self,
        processor: Processor,
        sources: Sequence[Source],
        max_len: int,
        seed: int,
        rank: int,
        world_size: int,
        num_workers: int,
        prefetch: int,
    ) -> None:
        super().__init__(processor, sources, max_len, seed, rank, world_size)
        self.num_workers, self.prefetch = num_workers, prefetch
        self._procs: list[Any] = []
        self._conns: list[Any] = []
        self._read = 0  # items read since the workers started
        self._finalizer: weakref.finalize | None = None

    def next_item(self) -> Example | Skipped:
        if not self._procs:
            self._start()
        w = self._read % self.num_workers
        try:
            msg = pickle.loads(self._conns[w].recv_bytes())
        except (EOFError, OSError):
            proc = self._procs[w]
            proc.join(timeout=5)
            self.close()
            raise RuntimeError(
                f"data worker {w} of rank {self.rank} exited unexpectedly (exit code {proc.exitcode}; "
                "its traceback, if any, is on stderr)"
            ) from None
        if isinstance(msg, _Failure):
            self.close()
            log.error("data worker %d of rank %d:\n%s", w, self.rank, msg.traceback)
            raise RuntimeError(f"data worker {w} of rank {self.rank} failed on {msg.where}: {msg.error}")
        self.position, self.drawn, item = msg
        self._read += 1
        return item

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.close()
        super().load_state_dict(state)

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
        self._procs, self._conns, self._read, self._finalizer = [], [], 0, None

    def _start(self) -> None:
        if _CONTEXT.get_start_method() == "forkserver":
            _CONTEXT.set_forkserver_preload([__name__])  # each worker forks with torch and nvlm imported
        start = {"position": self.position, "drawn": list(self.drawn)}
        self._finalizer = weakref.finalize(self, _stop, self._procs, self._conns)
        for w in range(self.num_workers):
            reader, writer = _CONTEXT.Pipe(duplex=False)
            args = (
                writer,
                self.processor,
                self.sources,
                self.max_len,
                self.seed,
                self.rank,
                self.world_size,
                start,
                w,
                self.num_workers,
                self.prefetch,
            )
            proc = _CONTEXT.Process(target=_work, args=args, name=f"nvlm-data-{self.rank}.{w}", daemon=True)
            self._procs.append(proc)
            self._conns.append(reader)
            proc.start()
            writer.close()  # the worker holds the only writer: its death is an EOF here


def _stop(procs: list[Any], conns: list[Any]) -> None:
    for conn in conns:
        conn.close()  # a worker blocked on a send fails at once and exits
    for proc in procs:
        if proc.pid is not None:
            proc.terminate()
    for proc in procs:
        if proc.pid is not None:
            proc.join(timeout=5)
            if proc.exitcode is None:
                proc.kill()
                proc.join()


def _work(
    conn: Any,
    processor: Processor,
    sources: Sequence[Source],
    max_len: int,
    seed: int,
    rank: int,
    world_size: int,
    start: dict[str, Any],
    index: int,
    count: int,
    prefetch: int,
) -> None:
    """A worker: encode items ``n % count == index`` of the stream from ``start``; send (position after
    the item, draws after it, item) per item, or a ``_Failure`` and stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the training process's to handle
    torch.set_num_threads(1)
    out: queue.Queue[bytes | None] = queue.Queue(prefetch)
    sender = threading.Thread(target=_send, args=(conn, out), daemon=True)
    sender.start()
    where = "start"
    try:
        blend = Blend(processor, sources, max_len, seed, rank, world_size)
        blend.load_state_dict(start)
        for n in itertools.count():
            src, i = blend.next_record()
            if n % count == index:
                where = f"{sources[src].path} line {i + 1}"
                item = blend.encode(src, i)
                out.put(pickle.dumps((blend.position, list(blend.drawn), item), protocol=pickle.HIGHEST_PROTOCOL))
    except Exception as e:
        error = traceback.format_exception_only(type(e), e)[-1].strip()
        out.put(pickle.dumps(_Failure(where, error, traceback.format_exc())))
    out.put(None)
    sender.join()


def _send(conn: Any, out: queue.Queue[bytes | None]) -> None:
    while (data := out.get()) is not None:
        try:
            conn.send_bytes(data)
        except OSError:  # the training process is gone
            os._exit(0)
    conn.close()
