"""A seeded, resumable stream of training examples drawn from several JSONL files with sampling weights.

Global item k picks its source with the weights (a draw seeded by k); the n-th item of a source reads
record ``perm(source, epoch)[n % size]``, a fresh seeded permutation per epoch. The state is the next k
and each source's draw count: a few integers, saved with every checkpoint. Under data parallelism every
rank walks the same global stream and keeps items ``k % world_size == rank``: no record is given to two
ranks within an epoch. Records that cannot be used (a line that is not UTF-8 or not a JSON object, a bad
image field, ``<image>`` or image-token text, a missing or corrupt image, no answer, too long) are skipped,
counted by reason in ``skipped``, and reported (file and line) the first time each reason appears. A blend
with no usable record at all fails fast: after as many unusable records in a row as its weighted sources
hold, one pass over every record decides, and ``DataError`` names the files and the skip reasons.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nvlm.data.labels import Example, encode_example
from nvlm.data.records import JsonlFile, RecordError
from nvlm.processor import Processor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    path: str
    weight: float = 1.0


@dataclass(frozen=True)
class Skipped:
    """An unusable record: the reason it is counted under, and where it is with the full error."""

    reason: str
    message: str


class DataError(ValueError):
    """A blend from which not one training example can be made."""


class Blend:
    def __init__(
        self,
        processor: Processor,
        sources: Sequence[Source],
        max_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not sources:
            raise ValueError("no data sources")
        if any(s.weight < 0 for s in sources) or not sum(s.weight for s in sources) > 0:
            raise ValueError("source weights must be >= 0 and not all 0")
        self.processor, self.max_len, self.seed = processor, max_len, seed
        self.rank, self.world_size = rank, world_size
        self.sources = list(sources)
        self.files = [JsonlFile.read(s.path) for s in sources]
        total = sum(s.weight for s in sources)
        self.cumulative = [sum(s.weight for s in sources[: i + 1]) / total for i in range(len(sources))]
        self.position = 0  # the next global stream item
        self.drawn = [0] * len(sources)  # items each source has given so far
        self.skipped: Counter[str] = Counter()
        self._usable = False  # a pass over the records found one that encodes
        self._order: dict[int, tuple[int, list[int]]] = {}  # source -> (epoch, permutation)

    def _record(self, k: int) -> tuple[int, int]:
        """Advance the stream by item k: (source, record index)."""
        u = random.Random(f"{self.seed}:{k}").random()
        src = next((i for i, c in enumerate(self.cumulative) if u < c), len(self.cumulative) - 1)
        epoch, i = divmod(self.drawn[src], len(self.files[src]))
        self.drawn[src] += 1
        if self._order.get(src, (None,))[0] != epoch:
            order = list(range(len(self.files[src])))
            random.Random(f"{self.seed}:{src}:{epoch}").shuffle(order)
            self._order[src] = (epoch, order)
        return src, self._order[src][1][i]

    def next_record(self) -> tuple[int, int]:
        """Advance the stream past this rank's next item: its (source, record index)."""
        while True:
            k = self.position
            src, i = self._record(k)
            self.position += 1
            if k % self.world_size == self.rank:
                return src, i

    def encode(self, src: int, i: int) -> Example | Skipped:
        """Record i of source src as an example, or why it cannot be used (the stream does not move)."""
        try:
            return encode_example(self.processor, self.files[src].messages(i), self.max_len)
        except RecordError as e:
            return Skipped(_reason(e), f"{self.files[src].where(i)}: {e}")

    def count(self, skip: Skipped) -> None:
        """Count an unusable record by reason, logging (a warning) the first of each reason."""
        if not self.skipped[skip.reason]:
            log.warning("skipping %s (further such records are only counted)", skip.message)
        self.skipped[skip.reason] += 1

    def next_item(self) -> Example | Skipped:
        """Advance past this rank's next item and encode it."""
        return self.encode(*self.next_record())

    def next_example(self) -> Example:
        """This rank's next usable example (skipping, and counting, the unusable ones). After as many misses in
        a row as the weighted sources hold records, one pass over them decides: ``DataError`` if none is usable."""
        misses = 0
        while True:
            item = self.next_item()
            if isinstance(item, Example):
                return item
            self.count(item)
            misses += 1
            if not self._usable and misses >= sum(
                len(f) for f, s in zip(self.files, self.sources, strict=True) if s.weight > 0
            ):
                self._check_usable()

    def _check_usable(self) -> None:
        """One pass over the weighted sources' records, up to the first usable one; ``DataError`` if none is."""
        reasons: Counter[str] = Counter()
        used = [(f, s) for f, s in zip(self.files, self.sources, strict=True) if s.weight > 0]
        for f, _ in used:
            for i in range(len(f)):
                try:
                    encode_example(self.processor, f.messages(i), self.max_len)
                except RecordError as e:
                    reasons[_reason(e)] += 1
                    continue
                self._usable = True
                return
        counts = ", ".join(f"{r} {n}" for r, n in reasons.most_common())
        raise DataError(
            f"no usable training record in {', '.join(s.path for _, s in used)} "
            f"(max_len {self.max_len}); skipped: {counts}"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "drawn": list(self.drawn), "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position, self.drawn = int(state["position"]), [int(n) for n in state["drawn"]]
        self.skipped = Counter(state.get("skipped", {}))
        self._order.clear()


def _reason(e: RecordError) -> str:
    """The counted reason of a skip: the error's text before its first ':'."""
    return str(e).split(":")[0]
