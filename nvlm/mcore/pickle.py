"""Megatron's legacy ``model_optim_rng.pt`` rank files, read without running any pickled code.

A rank file is a torch zip archive: ``<prefix>/data.pkl`` (the pickled ``state_dict``) and one uncompressed
record ``<prefix>/data/<key>`` per tensor storage. ``data.pkl`` is read by a restricted unpickler whose
``find_class`` knows exactly the globals such files hold (MCORE_SPEC 1.3, 1.4, 9): tensors, ``argparse.Namespace``,
bytes and ``OrderedDict``, ``torch`` dtypes and devices, numpy's RNG state, TE's ``io.BytesIO`` extra states and
Megatron's enums (``ModelType``, ``AttnBackend``, ``Rerun*``). The Megatron and numpy names get inert stand-ins
that only keep their arguments; any other global is refused with ``CheckpointError`` naming it, before anything
is called. Tensors are not read at unpickling: each is a ``TensorRef`` into the file, memory-mapped on
``load()`` and released (``release()``) once merged, so a reader holds only the tensors it is merging.
"""

from __future__ import annotations

import argparse
import collections
import io
import mmap
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nvlm.checkpoint import CheckpointError

# The legacy typed-storage classes torch.save names, and the dtypes they stand for.
STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "ByteStorage": torch.uint8,
    "CharStorage": torch.int8,
    "ShortStorage": torch.int16,
    "IntStorage": torch.int32,
    "LongStorage": torch.int64,
    "BoolStorage": torch.bool,
}


class Inert:
    """Stand-in for a Megatron enum, a numpy object or TE's ``io.BytesIO``: keeps what it was built from."""

    def __init__(self, name: str, args: tuple[Any, ...] = ()) -> None:
        self.name, self.args, self.state = name, args, None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.name}{self.args!r}>"


def _stand_in(name: str) -> type:
    """A class named like the global: calling it, or ``cls.__new__(cls, ...)``, gives an ``Inert``."""

    def new(cls: type, *args: Any) -> Inert:
        return Inert(name, args)

    return type(name.rpartition(".")[2], (), {"__new__": new})


INERT = (
    "megatron.core.enums.ModelType",
    "megatron.core.transformer.enums.AttnBackend",
    "megatron.core.transformer.enums.AttnMaskType",
    "megatron.core.transformer.enums.AttnType",
    "megatron.core.rerun_state_machine.RerunMode",
    "megatron.core.rerun_state_machine.RerunState",
    "megatron.core.rerun_state_machine.RerunDiagnostic",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.dtypes.UInt32DType",
    "_io.BytesIO",
    "io.BytesIO",
)


@dataclass
class TensorRef:
    """A tensor of a rank file, not read yet: ``load()`` maps it, ``release()`` drops its pages again."""

    file: RankFile
    key: str  # the storage record's key
    dtype: torch.dtype
    offset: int  # in elements, into the storage
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    def load(self) -> torch.Tensor:
        """The tensor, viewing the file's pages (copy it before ``release()``)."""
        return self.file.view(self)

    def release(self) -> None:
        self.file.release(self)


class RankFile:
    """One ``model_optim_rng.pt``: its unpickled ``state`` (tensors as ``TensorRef``) and its records."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with zipfile.ZipFile(path) as z:
                infos = z.infolist()
                pkl = [i for i in infos if i.filename.endswith("/data.pkl")]
                if len(pkl) != 1:
                    raise CheckpointError(f"{path}: not a torch checkpoint (no single */data.pkl record)")
                prefix = pkl[0].filename[: -len("data.pkl")]
                data = z.read(pkl[0])
        except (zipfile.BadZipFile, EOFError, OSError, KeyError) as e:
            raise CheckpointError(f"{path}: truncated or not a torch zip file ({e})") from None
        self._records = {i.filename[len(prefix) + 5 :]: i for i in infos if i.filename.startswith(prefix + "data/")}
        self._offsets: dict[str, tuple[int, int]] = {}
        self._file = open(path, "rb")  # noqa: SIM115 (held for lazy reads; close() closes it)
        self._size = path.stat().st_size
        self._map: mmap.mmap | None = None
        try:
            self.state = _Unpickler(data, self).load_state()
        except BaseException:
            self._file.close()
            raise

    # ---- records

    def storage(self, key: str, dtype: torch.dtype, numel: int) -> _Storage:
        """Check that the storage ``key`` is a complete uncompressed record of ``numel`` elements."""
        info = self._records.get(key)
        if info is None:
            raise CheckpointError(f"{self.path}: the pickle names storage {key!r}, which has no record")
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{self.path}: storage record {key!r} is compressed; torch.save writes them stored")
        self._file.seek(info.header_offset)
        head = self._file.read(30)
        if len(head) < 30 or head[:4] != b"PK\x03\x04":
            raise CheckpointError(f"{self.path}: truncated or damaged at storage record {key!r}")
        name_len, extra_len = struct.unpack("<HH", head[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        nbytes = numel * dtype.itemsize
        if info.file_size != nbytes or start + nbytes > self._size:
            raise CheckpointError(
                f"{self.path}: storage record {key!r} holds {info.file_size} bytes, "
                f"{nbytes} expected, or runs past the end of the file (truncated?)"
            )
        self._offsets[key] = (start, nbytes)
        return _Storage(key, dtype, numel)

    def view(self, ref: TensorRef) -> torch.Tensor:
        if self._map is None:
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)
        start, nbytes = self._offsets[ref.key]
        if nbytes == 0:
            return torch.empty(ref.shape, dtype=ref.dtype)
        flat = torch.frombuffer(self._map, dtype=ref.dtype, count=nbytes // ref.dtype.itemsize, offset=start)
        return flat.as_strided(ref.shape, ref.stride, ref.offset)

    def release(self, ref: TensorRef) -> None:
        """Give the pages of ``ref``'s storage back (they are re-read from the file if viewed again)."""
        if self._map is None:
            return
        start, nbytes = self._offsets[ref.key]
        page = mmap.PAGESIZE
        lo, hi = start // page * page, -(-(start + nbytes) // page) * page
        self._map.madvise(mmap.MADV_DONTNEED, lo, min(hi, self._size) - lo)

    def close(self) -> None:
        """Unmap and close (views still alive keep the mapping until they go)."""
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a tensor still views it: the mapping goes with the last view
                pass
            self._map = None
        self._file.close()


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: torch.dtype
    numel: int


@dataclass(frozen=True)
class _Rebuilt:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> _Rebuilt:
    """Stand-in for ``torch._utils._rebuild_tensor_v2``: where the tensor is (``_refs`` checks and wraps it)."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(f"a tensor over {type(storage).__name__}, not a storage record")
    return _Rebuilt(storage, int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


class _Unpickler(pickle.Unpickler):
    """Resolves only the allowed globals; anything else is refused before the pickle can call it."""

    def __init__(self, data: bytes, rank: RankFile) -> None:
        super().__init__(io.BytesIO(data))
        self._rank = rank

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full == "torch._utils._rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if full == "torch.device":
            return torch.device
        if full == "torch.Size":
            return torch.Size
        if full == "collections.OrderedDict":
            return collections.OrderedDict
        if full == "argparse.Namespace":
            return argparse.Namespace
        if full == "_codecs.encode":  # how protocol 2 pickles bytes
            return _latin1
        if full in INERT:
            return _stand_in(full)
        raise CheckpointError(
            f"{self._rank.path}: refused to unpickle the global {full} "
            "(not one a Megatron checkpoint holds); nothing was run"
        )

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self._rank.path}: unexpected persistent id {pid!r:.80}")
        kind, key, numel = pid[1], str(pid[2]), pid[4]
        if not isinstance(kind, _StorageType) or not isinstance(numel, int):
            raise CheckpointError(f"{self._rank.path}: storage {key!r} of unknown type {kind!r:.80}")
        return self._rank.storage(key, kind.dtype, numel)

    def load_state(self) -> dict[str, Any]:
        try:
            state = self.load()
        except CheckpointError:
            raise
        except Exception as e:  # a malformed or cut pickle: any of pickle's many error types
            raise CheckpointError(f"{self._rank.path}: unreadable pickle ({type(e).__name__}: {e})") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{self._rank.path}: a state dict was expected, not {type(state).__name__}")
        return _refs(state, self._rank)


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    if encoding != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r}")
    return text.encode("latin1")


def _refs(obj: Any, rank: RankFile) -> Any:
    """Replace the rebuilt-tensor markers by ``TensorRef`` s, in the dicts, lists and tuples that hold them."""
    if isinstance(obj, _Rebuilt):
        s = obj.storage
        if (
            len(obj.shape) != len(obj.stride)
            or min((*obj.shape, *obj.stride, obj.offset), default=0) < 0
            or (
                all(obj.shape)
                and obj.offset + sum((n - 1) * st for n, st in zip(obj.shape, obj.stride, strict=True)) >= s.numel
            )
        ):
            raise CheckpointError(f"{rank.path}: a tensor {obj.shape} reaches outside its storage {s.key!r}")
        return TensorRef(rank, s.key, s.dtype, obj.offset, obj.shape, obj.stride)
    if isinstance(obj, dict):
        return type(obj)((k, _refs(v, rank)) for k, v in obj.items())
    if isinstance(obj, list):
        return [_refs(v, rank) for v in obj]
    return obj
