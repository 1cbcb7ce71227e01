"""What every benchmark shares: samples, prompts, the task interface, and readers for local data.

A task turns a benchmark's local copy (the layout of its common public distribution, see docs/EVAL.md)
into :class:`Sample` s, each sample into a :class:`Prompt` for a profile, and the predictions into scores:
- ``official`` (default): the NVLM prompts of the spec's section 8 (Megatron HEAD's system prompts and
  answer suffixes) with the token budgets common harnesses use; scored with the benchmarks' official rules.
- ``nvlm``: Megatron's ``NVLM-1.0`` tag (EVAL_SPEC 1.1, 1.3): its qwen2p0 chat format, system "Answer the
  questions.", 16 new tokens, the answer cut to its first line, and Megatron's scoring.

Parquet images are read lazily (:class:`ParquetImage`), one row group at a time, so a 200k-question split
never sits in memory. A malformed record is a :class:`DataError` naming the file and the record.
"""

from __future__ import annotations

import csv
import functools
import gzip
import json
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from nvlm.eval.metrics import first_line

PROFILES = ("official", "nvlm")
NVLM_SYSTEM = "Answer the questions."  # Megatron NVLM-1.0, every task
FOLLOW_SYSTEM = "Follow the user's instruction and answer questions."  # Megatron HEAD (spec section 8)
VQA_SUFFIX = "Answer the question using a single word or phrase."
NUMBER_SUFFIX = "Answer the question using a single word, phrase, or number."
LETTER_SUFFIX = "Answer with the option's letter from the given choices directly."


class DataError(ValueError):
    """A benchmark file that is there but malformed; the message names the file and the record."""


class MissingData(DataError):
    """A task's data directory or files are missing; the message gives the expected layout."""


@dataclass
class Sample:
    id: str  # unique within the task; the key of the prediction cache
    images: list[Any]  # image sources in prompt order: paths, bytes or ParquetImage (loaded when generating)
    fields: dict[str, Any]  # what the prompt and the scorer read (question, answers, options, ...)


@dataclass
class Prompt:
    system: str | None  # None: the chat format's default system message
    text: str  # the user turn, one "<image>" per image; or, with chat=False, the text to complete
    images: list[Any] = field(default_factory=list)
    chat: bool = True  # False: plain completion of ``text`` (HumanEval), no chat template


class Task:
    """One benchmark split. Subclasses set the class attributes and implement ``load``/``prompt``/``score``."""

    name: str = ""
    dirname: str = ""  # its directory under --data (matched case-insensitively, '-' = '_')
    split: str = ""
    layout: str = ""  # the expected files, for the missing-data error and docs/EVAL.md
    max_tokens: ClassVar[dict[str, int]] = {"official": 32, "nvlm": 16}  # per profile
    stop: tuple[str, ...] = ()  # stop strings: generation of a row ends once one appears
    first_line: bool = True  # nvlm profile: keep the first line of the answer (Megatron's post-processing)
    main_metric: str = "accuracy"
    has_answers: bool = True  # False for test splits with hidden answers: a submission file, no score
    version: str = "1"  # bump when prompts change, so cached predictions are not reused

    def __repr__(self) -> str:
        return f"<task {self.name}>"

    @property
    def key(self) -> str:
        """The task's name as a file name."""
        return "".join(c if c.isalnum() or c in "._-" else "_" for c in self.name)

    def max_new_tokens(self, profile: str) -> int:
        return self.max_tokens[profile]

    def find_dir(self, root: str | Path) -> Path:
        root = Path(root)
        found = find_dir(root, self.dirname)
        if found is None:
            raise MissingData(f"{self.name}: no directory {self.dirname!r} under {root}; expected:\n{self.layout}")
        return found

    def parquet_rows(self, d: Path, what: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """The rows of this split's HF parquet files in ``d``; ``what`` names the files expected when none are."""
        files = parquet_files(d, self.split)
        if not files:
            raise self.missing(d, what)
        return read_parquet(files)

    def missing(self, where: Path, what: str = "") -> MissingData:
        what = what or "its files"
        return MissingData(f"{self.name}: {what} not found under {where}; expected:\n{self.layout}")

    def load(self, root: str | Path) -> list[Sample]:
        raise NotImplementedError

    def prompt(self, sample: Sample, profile: str) -> Prompt:
        raise NotImplementedError

    def postprocess(self, raw: str, profile: str) -> str:
        """The prediction kept from the raw decoded answer (first line only for the nvlm profile)."""
        if profile == "nvlm" and self.first_line:
            return first_line(raw)
        return raw.strip()

    def score(self, predictions: Sequence[str], samples: Sequence[Sample], profile: str) -> dict[str, float]:
        raise NotImplementedError

    def submission(self, predictions: Sequence[str], samples: Sequence[Sample]) -> tuple[str, str] | None:
        """(file name, content) of the file an evaluation server takes, for splits with hidden answers."""
        return None


def mean(xs: Sequence[float]) -> float:
    """Percent; 0 for no samples."""
    return 100.0 * sum(xs) / len(xs) if xs else 0.0


def letters(n: int) -> str:
    return "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:n]


def options_block(options: Sequence[str], fmt: str = "{}. {}") -> str:
    """``A. first\\nB. second\\n...`` (no trailing newline)."""
    return "\n".join(fmt.format(k, o) for k, o in zip(letters(len(options)), options, strict=True))


# ------------------------------------------------------------------------------------------- files


def find_dir(root: Path, name: str) -> Path | None:
    """``root/name``, else a child whose name matches it ignoring case and '-' vs '_'."""
    if (root / name).is_dir():
        return root / name
    if not root.is_dir():
        return None
    want = name.lower().replace("-", "_")
    for child in sorted(root.iterdir()):
        if child.is_dir() and child.name.lower().replace("-", "_") == want:
            return child
    return None


def parquet_files(directory: Path, split: str) -> list[Path]:
    """``<split>-*.parquet`` (or ``<split>.parquet``) anywhere under ``directory``, as in HF dataset repos."""
    files = sorted(set(directory.glob(f"**/{split}-*.parquet")) | set(directory.glob(f"**/{split}.parquet")))
    return [f for f in files if f.is_file()]


def _pyarrow() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading parquet benchmarks needs pyarrow: pip install 'nvlm[eval]'") from None
    return pq


_PARQUET_LOCK = threading.RLock()  # a cached ParquetFile is not safe to read from two threads at once


@functools.lru_cache(maxsize=8)
def _parquet_file(path: str) -> Any:
    return _pyarrow().ParquetFile(path)


def _read_row_group(path: str, row_group: int, columns: list[str]) -> Any:
    with _PARQUET_LOCK:
        return _parquet_file(path).read_row_group(row_group, columns=columns)


@functools.lru_cache(maxsize=8)
def _row_group_column(path: str, row_group: int, column: str) -> list[Any]:
    return _read_row_group(path, row_group, [column]).column(0).to_pylist()


@dataclass(frozen=True)
class ParquetImage:
    """An image cell of a parquet file, read when needed (HF ``Image`` feature: ``{"bytes", "path"}``)."""

    file: str
    row_group: int
    row: int
    column: str

    def load(self) -> bytes | str:
        cell = _row_group_column(self.file, self.row_group, self.column)[self.row]
        if isinstance(cell, dict):
            if cell.get("bytes"):
                return cell["bytes"]
            if cell.get("path"):
                return str(Path(self.file).parent / cell["path"])
        elif isinstance(cell, (bytes, bytearray)) and cell:
            return bytes(cell)
        raise DataError(f"{self.file}: row {self.row} of row group {self.row_group}: no image in {self.column!r}")


def _is_image_type(t: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0


def read_parquet(files: Sequence[Path]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) for every row; image columns (``{"bytes","path"}`` structs) come as ParquetImage."""
    for f in files:
        try:
            with _PARQUET_LOCK:
                pf = _parquet_file(str(f))
        except Exception as e:  # pyarrow raises its own types for a corrupt file
            if isinstance(e, ImportError):
                raise
            raise DataError(f"{f}: not a readable parquet file ({e})") from None
        schema = pf.schema_arrow
        images = [n for n in schema.names if _is_image_type(schema.field(n).type)]
        others = [n for n in schema.names if n not in images]
        for rg in range(pf.num_row_groups):
            rows = _read_row_group(str(f), rg, others).to_pylist() if others else []
            if not others:
                rows = [{} for _ in range(pf.metadata.row_group(rg).num_rows)]
            for i, row in enumerate(rows):
                for n in images:
                    row[n] = ParquetImage(str(f), rg, i, n)
                yield f"{f} (row group {rg}, row {i})", row


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


def read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, record) per non-empty line; ``.gz`` files are decompressed."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{n}", json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e})") from None


def read_csv(path: Path) -> Iterator[tuple[str, list[str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        for n, row in enumerate(csv.reader(f), 1):
            yield f"{path}:{n}", row


def need(record: Any, where: str, *keys: str) -> list[Any]:
    """The values of ``keys`` in a dict record, or a DataError naming the record and the missing key."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object, got {type(record).__name__}")
    missing = [k for k in keys if record.get(k) is None]
    if missing:
        raise DataError(f"{where}: missing field {missing[0]!r} (has {', '.join(sorted(record)) or 'nothing'})")
    return [record[k] for k in keys]


def check_unique(samples: Sequence[Sample], what: str) -> list[Sample]:
    seen: set[str] = set()
    for s in samples:
        if s.id in seen:
            raise DataError(f"{what}: duplicate sample id {s.id!r}")
        seen.add(s.id)
    return list(samples)


def resolve_image(source: Any) -> Any:
    """A sample's image source -> something ``nvlm.image.load_image`` reads."""
    return source.load() if isinstance(source, ParquetImage) else source
