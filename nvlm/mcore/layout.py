"""Where a legacy Megatron checkpoint keeps its rank files (``megatron/training/checkpointing.py``, MCORE_SPEC 1.2).

``ROOT/latest_checkpointed_iteration.txt`` names the iteration (an integer or ``release``); ``ROOT/iter_0031500/``
(or ``ROOT/release/``) holds one ``mp_rank_TT/model_optim_rng.pt`` per TP rank (``mp_rank_TT_PPP`` with
pipeline parallelism). We accept the root, an iteration directory, or a Hugging Face download whose root holds
``checkpoints/`` (``nvidia/NVLM-D-72B-mcore``). The TP x PP grid is taken from the directory names (the ``args``
of split pipeline files may be stale, MCORE_SPEC 9) and must be complete.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from nvlm.checkpoint import CheckpointError

TRACKER = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")
ITER_DIR = re.compile(r"^(iter_\d{7}|release)$")


@dataclass(frozen=True)
class Layout:
    root: Path  # the iteration directory
    tp: int
    pp: int
    files: dict[tuple[int, int], Path]  # (tp rank, pp rank) -> model_optim_rng.pt


def _has_ranks(path: Path) -> bool:
    return path.is_dir() and any(RANK_DIR.match(p.name) for p in path.iterdir())


def _base(path: Path) -> Path:
    """The checkpoint root: ``path``, or its ``checkpoints/`` (a Hugging Face download)."""
    sub = path / "checkpoints"
    if not (path / TRACKER).is_file() and sub.is_dir():
        return sub
    return path


def is_mcore(path: str | Path) -> bool:
    """Whether ``path`` looks like a legacy Megatron checkpoint (tracker file, iteration or rank directories)."""
    path = Path(path)
    if not path.is_dir():
        return False
    if _has_ranks(path):
        return True
    base = _base(path)
    return (base / TRACKER).is_file() or any(ITER_DIR.match(p.name) and _has_ranks(p) for p in base.iterdir())


def iteration_dir(path: str | Path) -> Path:
    """The iteration directory to read: the tracker's, or the only one there is."""
    path = Path(path)
    if _has_ranks(path):
        return path
    base = _base(path)
    tracker = base / TRACKER
    if tracker.is_file():
        text = tracker.read_text(errors="replace").strip()
        if text == "release":
            name = "release"
        elif text.isdigit():
            name = f"iter_{int(text):07d}"
        else:
            raise CheckpointError(f"{tracker}: holds {text[:40]!r}, not an iteration number or 'release'")
        if not _has_ranks(base / name):
            raise CheckpointError(
                f"{tracker}: names iteration {text}, but {base / name} holds no mp_rank_* directories"
            )
        return base / name
    found = sorted(p for p in base.iterdir() if ITER_DIR.match(p.name) and _has_ranks(p))
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise CheckpointError(
            f"{base}: no {TRACKER}, and {len(found)} iteration directories ({names}): give one of them"
        )
    return found[0]


def scan(path: str | Path) -> Layout:
    """The rank files of the checkpoint at ``path``: a complete TP x PP grid, each with its file."""
    root = iteration_dir(path)
    ranks: dict[tuple[int, int], Path] = {}
    suffixed = set()
    for d in sorted(root.iterdir()):
        if not d.name.startswith("mp_rank_"):
            continue
        m = RANK_DIR.match(d.name)
        if m is None:
            raise CheckpointError(
                f"{d}: not a rank directory this reader knows (mp_rank_TT or mp_rank_TT_PPP; "
                "expert parallelism is not supported)"
            )
        suffixed.add(m.group(2) is not None)
        ranks[(int(m.group(1)), int(m.group(2) or 0))] = d / RANK_FILE
    if len(suffixed) > 1:
        raise CheckpointError(f"{root}: mixes mp_rank_TT and mp_rank_TT_PPP directories (two checkpoints in one?)")
    tp = max(t for t, _ in ranks) + 1
    pp = max(p for _, p in ranks) + 1
    for t in range(tp):
        for p in range(pp):
            name = f"mp_rank_{t:02d}" + (f"_{p:03d}" if suffixed == {True} else "")
            if (t, p) not in ranks:
                raise CheckpointError(f"{root}: {name} is missing from the {tp} x {pp} (TP x PP) rank directories")
            if not ranks[(t, p)].is_file():
                raise CheckpointError(f"{ranks[(t, p)]}: missing (each rank directory holds a {RANK_FILE})")
    return Layout(root, tp, pp, ranks)
