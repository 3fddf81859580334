"""Lazy tensor readers: one interface over safetensors files, HF folders, state dicts and modules.

Every reader answers ``keys()``, ``shape(name)`` and ``dtype(name)`` from headers
alone, and reads one tensor (``get``) or a block of its rows (``get_rows``) on
demand.  File readers parse the safetensors header themselves and read with
``os.preadv`` straight into the tensor's buffer: nothing is memory-mapped, so
the pages of inputs already merged never count in the process's RSS, and a row
block is one contiguous byte range of the file.

Tensors returned by in-memory readers share storage with the caller's state
dict (``owns_tensors`` is ``False``): treat them as read-only.
"""

from __future__ import annotations

import abc
import json
import math
import os
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from .confine import inside, member, open_regular, regular

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "C64": torch.complex64,
}
DTYPE_CODES: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
MAX_HEADER_BYTES = 100 * 1024 * 1024


def _numel(shape: Iterable[int]) -> int:
    return math.prod(shape)


class TensorReader(abc.ABC):
    """Read-only, lazy access to the named tensors of one model."""

    label: str = ""
    """A short name for messages (the path, or the pool's model name)."""
    owns_tensors: bool = True
    """``True`` when :meth:`get` returns a fresh tensor the caller may modify."""
    folder: Path | None = None
    """The HF folder the tensors come from (config and tokenizer files), if any."""

    @abc.abstractmethod
    def keys(self) -> list[str]:
        """Tensor names, in storage order."""

    @abc.abstractmethod
    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor ``name`` (from the header; nothing is read)."""

    @abc.abstractmethod
    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype of tensor ``name``."""

    @abc.abstractmethod
    def get(self, name: str) -> torch.Tensor:
        """Read tensor ``name`` (a CPU tensor)."""

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of tensor ``name`` along dim 0 (the default reads the whole tensor)."""
        return self.get(name)[start:stop]

    def aliases(self) -> dict[str, str]:
        """``{name: earlier name}`` for names that share storage with an earlier one (tied weights)."""
        return {}

    def location(self, name: str) -> tuple[str, int]:
        """A sort key giving the storage order of ``name`` (file, offset)."""
        return ("", 0)

    def close(self) -> None:  # noqa: B027 - optional hook: in-memory readers hold no files
        """Release open files."""

    def __contains__(self, name: str) -> bool:
        return name in set(self.keys())

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.label}>"


# ---------------------------------------------------------------------------
# safetensors files


def parse_header(raw: bytes, data_size: int, where: str = "file") -> tuple[dict[str, str], dict[str, tuple]]:
    """Validate a safetensors header as the safetensors library does; ``(metadata, entries)``.

    ``entries`` maps each tensor name to ``(dtype, shape, begin, end)``.  Offsets must be
    non-negative integers, tensors must not overlap and must cover the ``data_size`` bytes
    after the header exactly; shapes are lists of non-negative integers; dtypes are known.
    Anything else raises one :class:`InputError` line naming ``where``.
    """
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
        raise InputError(f"{where} has a corrupt safetensors header ({reason}); the file is truncated or not safetensors") from None
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InputError(f"{where} has a corrupt safetensors header (__metadata__ is not a map of strings)")
    entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
    for name, info in header.items():
        shown = name[:200]
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise InputError(f"{where} has a corrupt header entry for tensor {shown!r} (needs dtype, shape and data_offsets)")
        code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
            raise InputError(f"{where}: tensor {shown!r} has an invalid shape (not a list of non-negative integers)")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) and o >= 0 for o in offsets):
            raise InputError(f"{where}: tensor {shown!r} has invalid data_offsets (not two non-negative integers)")
        dtype = SAFETENSORS_DTYPES.get(code) if isinstance(code, str) else None
        if dtype is None:
            raise InputError(f"{where}: tensor {shown!r} has unsupported dtype {str(code)[:40]!r}")
        begin, end = offsets
        nbytes = _numel(shape) * dtype.itemsize
        if end < begin or end - begin != nbytes:
            raise InputError(f"{where} is corrupt: tensor {shown!r} spans {end - begin} bytes, its shape needs {nbytes}")
        if end > data_size:
            raise InputError(
                f"{where} is truncated: tensor {shown!r} ends at byte {end} of the data but the file has {data_size} data bytes"
            )
        entries[name] = (dtype, tuple(shape), begin, end)
    expected = 0
    for name in sorted(entries, key=lambda k: (entries[k][2], entries[k][3])):
        begin, end = entries[name][2:]
        if begin != expected:
            what = "overlaps the tensor before it" if begin < expected else f"leaves a gap of {begin - expected} bytes before it"
            raise InputError(f"{where} is corrupt: tensor {name[:200]!r} {what} (offsets must be contiguous)")
        expected = end
    if expected != data_size:
        raise InputError(f"{where} is corrupt: the tensors cover {expected} data bytes but the file holds {data_size}")
    return metadata, entries


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class SafetensorsFile:
    """The parsed header of one safetensors file and positioned reads of its tensors."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self._lock = threading.Lock()
        fd = open_regular(self.path)
        try:
            size = os.fstat(fd).st_size
            head = os.pread(fd, 8, 0)
            if len(head) < 8:
                raise InputError(f"{self.path} is not a safetensors file (only {size} bytes): truncated or corrupt")
            n = int.from_bytes(head, "little")
            if n <= 1 or n > MAX_HEADER_BYTES or 8 + n > size:
                raise InputError(
                    f"{self.path} is not a valid safetensors file (header length {n} for a {size}-byte file): truncated or corrupt"
                )
            raw = os.pread(fd, n, 8)
        except OSError as exc:
            raise InputError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)
        self.size = size
        self.data_start = 8 + n
        self.metadata, self.entries = parse_header(raw, size - self.data_start, str(self.path))
        self.names = sorted(self.entries, key=lambda k: self.entries[k][2])

    def _descriptor(self) -> int:
        with self._lock:
            if self._fd is None:
                self._fd = open_regular(self.path)
            return self._fd

    def _read_into(self, out: torch.Tensor, offset: int) -> None:
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        fd, done, total = self._descriptor(), 0, len(view)
        while done < total:
            got = os.preadv(fd, [view[done:]], self.data_start + offset + done)
            if got <= 0:
                raise InputError(f"{self.path} is truncated: short read at byte {self.data_start + offset + done}")
            done += got

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Read tensor ``name`` (rows ``[start, stop)`` along dim 0 if given)."""
        dtype, shape, begin, _ = self.entries[name]
        if start is None or not shape:
            out = torch.empty(shape, dtype=dtype)
            self._read_into(out, begin)
            return out
        start, stop = max(0, start), min(shape[0], stop)
        row = _numel(shape[1:]) * dtype.itemsize
        out = torch.empty((max(0, stop - start),) + shape[1:], dtype=dtype)
        self._read_into(out, begin + start * row)
        return out

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


class SafetensorsReader(TensorReader):
    """One ``.safetensors`` file."""

    def __init__(self, path: str | os.PathLike, label: str | None = None) -> None:
        self.file = SafetensorsFile(path)
        self.label = label or str(path)

    @property
    def metadata(self) -> dict[str, str]:
        return self.file.metadata

    def keys(self) -> list[str]:
        return list(self.file.names)

    def _entry(self, name: str):
        try:
            return self.file.entries[name]
        except KeyError:
            raise InputError(f"{self.label} has no tensor {name!r}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1]

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name)[0]

    def get(self, name: str) -> torch.Tensor:
        self._entry(name)
        return self.file.read(name)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        self._entry(name)
        return self.file.read(name, start, stop)

    def location(self, name: str) -> tuple[str, int]:
        return ("", self._entry(name)[2])

    def source_files(self) -> list[SafetensorsFile]:
        """The safetensors files read (for duplicate detection)."""
        return [self.file]

    def close(self) -> None:
        self.file.close()


MAX_INDEX_BYTES = 64 * 1024 * 1024


def read_shard_index(folder: str | os.PathLike, index_path: str | os.PathLike) -> dict[str, str]:
    """The ``weight_map`` of a ``*.index.json`` in ``folder``: ``{tensor name: shard file name}``, validated."""
    index_path = Path(index_path)
    inside(folder, index_path, what="index")
    size = regular(index_path).st_size
    if size > MAX_INDEX_BYTES:
        raise InputError(f"{index_path} is not a valid shard index ({size} bytes; an index is far smaller)")
    try:
        fd = open_regular(index_path)
        try:
            raw = os.read(fd, MAX_INDEX_BYTES + 1)
        finally:
            os.close(fd)
        index = json.loads(raw.decode("utf-8"))
        if not isinstance(index, dict) or "weight_map" not in index:
            raise ValueError("no weight_map")
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError("weight_map is not a map of tensor names to file names")
    except (OSError, ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(getattr(exc, "strerror", None) or exc)[:200]
        raise InputError(f"{index_path} is not a valid shard index ({reason})") from None
    return weight_map


class ShardedReader(TensorReader):
    """An HF model folder: ``*.safetensors.index.json`` plus shards, or a single ``*.safetensors``."""

    def __init__(self, folder: str | os.PathLike, label: str | None = None) -> None:
        self.folder = Path(folder)
        self.label = label or str(folder)
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        indexes = sorted(self.folder.glob("*.safetensors.index.json"))
        singles = sorted(self.folder.glob("*.safetensors"))
        if len(indexes) > 1 and (self.folder / "model.safetensors.index.json").exists():
            indexes = [self.folder / "model.safetensors.index.json"]
        if len(indexes) > 1:
            raise InputError(
                f"{self.folder} holds several shard indexes ({', '.join(p.name for p in indexes)}); give the file or a folder with one model"
            )
        if indexes:
            self._open_index(indexes[0])
        elif singles:
            if len(singles) > 1 and (self.folder / "model.safetensors").exists():
                singles = [self.folder / "model.safetensors"]
            if len(singles) > 1:
                raise InputError(
                    f"{self.folder} holds {len(singles)} safetensors files but no *.safetensors.index.json; give one file as the model"
                )
            inside(self.folder, singles[0])
            file = SafetensorsFile(singles[0])
            self._files[singles[0].name] = file
            self._where = {name: singles[0].name for name in file.names}
        else:
            pickles = sorted(p.name for p in self.folder.iterdir() if p.suffix in PICKLE_SUFFIXES) if self.folder.is_dir() else []
            hint = f" (it has {', '.join(pickles[:3])}: a pickle checkpoint; see --allow-pickle)" if pickles else ""
            raise InputError(f"{self.folder} has no model.safetensors or *.safetensors.index.json{hint}")
        order = {fname: i for i, fname in enumerate(sorted(self._files))}
        self._keys = sorted(self._where, key=lambda k: (order[self._where[k]], self._files[self._where[k]].entries[k][2]))

    def _open_index(self, index_path: Path) -> None:
        weight_map = read_shard_index(self.folder, index_path)
        for name, fname in weight_map.items():
            if fname not in self._files:
                member(self.folder, fname, named_in=index_path)
                path = self.folder / fname
                if not path.exists():
                    raise InputError(f"{index_path} names shard {fname} which is missing from {self.folder}")
                self._files[fname] = SafetensorsFile(path)
            if name not in self._files[fname].entries:
                raise InputError(f"{index_path} puts tensor {name!r} in {fname}, which does not hold it")
            self._where[name] = fname

    def keys(self) -> list[str]:
        return list(self._keys)

    def _file(self, name: str) -> SafetensorsFile:
        try:
            return self._files[self._where[name]]
        except KeyError:
            raise InputError(f"{self.label} has no tensor {name!r}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self._file(name).entries[name][0]

    def get(self, name: str) -> torch.Tensor:
        return self._file(name).read(name)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._file(name).read(name, start, stop)

    def location(self, name: str) -> tuple[str, int]:
        return (self._where[name], self._file(name).entries[name][2])

    def source_files(self) -> list[SafetensorsFile]:
        """The safetensors files read, by shard name (for duplicate detection)."""
        return [self._files[name] for name in sorted(self._files)]

    def close(self) -> None:
        for file in self._files.values():
            file.close()


# ---------------------------------------------------------------------------
# in-memory


def find_aliases(state: Mapping[str, Any]) -> dict[str, str]:
    """``{name: first name}`` for tensors that are the same view of the same storage (tied weights)."""
    seen: dict[tuple, str] = {}
    out: dict[str, str] = {}
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor) or tensor.numel() == 0:
            continue
        key = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tuple(tensor.stride()),
            tensor.dtype,
            tensor.device,
        )
        if key in seen:
            out[name] = seen[key]
        else:
            seen[key] = name
    return out


class StateDictReader(TensorReader):
    """A mapping of names to tensors (e.g. ``model.state_dict()``); tensors are not copied."""

    owns_tensors = False

    def __init__(self, state_dict: Mapping[str, Any], label: str = "state dict") -> None:
        self.label = label
        bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise InputError(f"{label}: entry {bad[0]!r} is a {type(state_dict[bad[0]]).__name__}, not a tensor")
        self._state = dict(state_dict)
        self._aliases = find_aliases(self._state)

    def keys(self) -> list[str]:
        return list(self._state)

    def _tensor(self, name: str) -> torch.Tensor:
        try:
            return self._state[name]
        except KeyError:
            raise InputError(f"{self.label} has no tensor {name!r}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensor(name).shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._tensor(name).dtype

    def get(self, name: str) -> torch.Tensor:
        return self._tensor(name).detach().cpu()

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        tensor = self._tensor(name).detach()
        return (tensor[start:stop] if tensor.dim() else tensor).cpu()

    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    def location(self, name: str) -> tuple[str, int]:
        return ("", list(self._state).index(name))


class ModuleReader(StateDictReader):
    """The state dict (parameters and persistent buffers) of an ``nn.Module``."""

    def __init__(self, module, label: str | None = None) -> None:
        super().__init__(module.state_dict(), label=label or type(module).__name__)


# ---------------------------------------------------------------------------
# pickle (opt-in only)


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    regular(path)
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the unpickler raises many kinds
        raise InputError(f"cannot load pickle checkpoint {path} with weights_only=True: {str(exc).splitlines()[0]}") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise InputError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return dict(obj)


class PickleReader(StateDictReader):
    """A ``torch.save`` checkpoint, or an HF folder of ``pytorch_model*.bin`` shards (opt-in)."""

    def __init__(self, path: str | os.PathLike, label: str | None = None) -> None:
        path = Path(path)
        state: dict[str, torch.Tensor] = {}
        if path.is_dir():
            index = path / "pytorch_model.bin.index.json"
            if index.exists():
                files = sorted(set(read_shard_index(path, index).values()))
                for fname in files:
                    member(path, fname, named_in=index)
            else:
                files = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
                for fname in files:
                    inside(path, path / fname)
            targets = [path / fname for fname in files]
            if not files:
                raise InputError(f"{path} has no safetensors or pickle weights")
            for target in targets:
                state.update(_load_pickle(target))
            self.folder = path
        else:
            state = _load_pickle(path)
        super().__init__(state, label=label or str(path))
        self.owns_tensors = False


# ---------------------------------------------------------------------------


def pickle_refusal(path: str | os.PathLike) -> InputError:
    return InputError(
        f"{path} is a pickle checkpoint, and loading pickle can run arbitrary code: convert it to safetensors, "
        "or pass --allow-pickle if you trust it (it is then read with torch.load(weights_only=True))"
    )


def open_reader(path: str | os.PathLike, *, allow_pickle: bool = False, label: str | None = None) -> TensorReader:
    """Open a model: a ``.safetensors`` file, an HF folder (sharded or not), or (opt-in) a pickle checkpoint."""
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"model path not found: {path} (give a .safetensors file or a local HF model folder)")
    if p.is_dir():
        has_safetensors = any(p.glob("*.safetensors")) or any(p.glob("*.safetensors.index.json"))
        if not has_safetensors and any(q.suffix in PICKLE_SUFFIXES for q in p.iterdir()):
            if not allow_pickle:
                raise pickle_refusal(p)
            return PickleReader(p, label=label)
        return ShardedReader(p, label=label)
    if p.suffix == ".safetensors":
        return SafetensorsReader(p, label=label)
    if p.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise pickle_refusal(p)
        return PickleReader(p, label=label)
    raise InputError(f"{path}: unknown model format {p.suffix!r} (give a .safetensors file or an HF model folder)")


def as_reader(source: Any, *, allow_pickle: bool = False, label: str | None = None) -> TensorReader:
    """A reader over ``source``: a reader, a path, a state dict or an ``nn.Module``."""
    if isinstance(source, TensorReader):
        return source
    if isinstance(source, (str, os.PathLike)):
        return open_reader(source, allow_pickle=allow_pickle, label=label)
    if isinstance(source, Mapping):
        return StateDictReader(source, label=label or "state dict")
    if isinstance(source, torch.nn.Module):
        return ModuleReader(source, label=label)
    raise InputError(f"cannot read tensors from a {type(source).__name__}")
