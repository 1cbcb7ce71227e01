"""The library's log output: each module logs to ``logging.getLogger(__name__)``; the ``nvlm`` command installs
one stderr handler here (``setup_logging``).

Under torchrun only rank 0 writes info and debug records; every rank writes warnings and errors, prefixed with
its rank. ``NVLM_LOG_LEVEL`` (``DEBUG``, ``INFO``, ``WARNING`` or ``ERROR``; default ``INFO``) sets the level of
the ``nvlm`` loggers. A program that imports nvlm and configures logging itself gets the records through the
root logger as usual; nothing here runs on import.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def env_rank() -> int:
    """This process's global rank as torchrun gives it (``RANK``); 0 outside torchrun."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        raise ValueError(f"RANK must be an integer, got {os.environ['RANK']!r}") from None


class RankFilter(logging.Filter):
    """Passes every record on rank 0 and only warnings and errors on the other ranks."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0 or record.levelno >= logging.WARNING


class _Formatter(logging.Formatter):
    """Info as the bare message (it is the command's progress report); ``warning: ...`` and ``error: ...``
    otherwise; ``[rank N]`` in front on ranks other than 0."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.prefix = f"[rank {rank}] " if rank else ""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname.lower()}: {text}"
        return self.prefix + text


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (pytest and the demo swap it)."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def setup_logging(level: str | None = None, rank: int | None = None) -> None:
    """Send the ``nvlm`` loggers' records at ``level`` and above (default: ``NVLM_LOG_LEVEL``, else ``INFO``) to
    stderr through one handler on the root logger, filtered by ``RankFilter``. Called again, it replaces the
    handler it installed before (the demo runs several commands in one process), so no record is written twice.
    A bad level is a ``ValueError`` naming the accepted ones."""
    name = (level or os.environ.get("NVLM_LOG_LEVEL") or "INFO").upper()
    if name not in LEVELS:
        raise ValueError(f"NVLM_LOG_LEVEL must be one of {', '.join(LEVELS)}, got {name!r}")
    rank = env_rank() if rank is None else rank
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
    handler = _StderrHandler()
    handler.addFilter(RankFilter(rank))
    handler.setFormatter(_Formatter(rank))
    root.addHandler(handler)
    logging.getLogger("nvlm").setLevel(name)
