"""Streaming safetensors output: planned shards, positioned writes, atomic rename.

The shapes and dtypes of every output tensor are known before merging starts
(they come from the input headers), so each shard's header is written first and
each tensor (or block of rows) is written straight to its place in the file as
soon as it is computed.  Nothing is buffered beyond the block being written,
whatever ``shard_size`` is.

Everything goes to a hidden temporary path beside the output, which is renamed
into place only when complete; an error or Ctrl-C removes it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from ..errors import ConfigError, InputError
from ..output import SAFETENSORS_MARK, atomic_output, plain_data
from .confine import inside, open_regular, regular
from .readers import DTYPE_CODES, find_aliases

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_SHARD_SIZE = 5 * 1000**3

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
COPIED_PATTERNS = ("*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "tokenizer*", "*.py")
CODE_SUFFIXES = (".py",)
SKIPPED_NAMES = {"README.md"}


def parse_size(text: str | int) -> int:
    """``"2GB"`` → 2·10⁹ bytes; ``"500MB"``, ``"1.5GiB"``, ``"4096"`` (bytes) work too."""
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        unit = match.group(2).lower() if match else None
        if not match or unit not in _UNITS:
            raise ConfigError(f"bad size {text!r}: use a number of bytes with an optional unit, e.g. 2GB, 500MB, 1GiB")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ConfigError(f"bad size {text!r}: must be positive")
    return value


def _version() -> str:
    from .. import __version__

    return __version__


def tensor_bytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


# ---------------------------------------------------------------------------
# atomic output


# ---------------------------------------------------------------------------
# shard planning and writing


class SafetensorsFileWriter:
    """One safetensors file whose header is written first; tensors are written in place with ``pwrite``."""

    def __init__(
        self, path: Path, entries: Sequence[tuple[str, tuple[int, ...], torch.dtype]], metadata: Mapping[str, str] | None = None
    ) -> None:
        self.path = path
        # widest dtypes first keeps every tensor aligned to its element size
        ordered = sorted(entries, key=lambda e: -e[2].itemsize)
        header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
        self.offsets: dict[str, tuple[int, int, int]] = {}
        offset = 0
        for name, shape, dtype in ordered:
            nbytes = tensor_bytes(shape, dtype)
            header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            row = math.prod(shape[1:]) * dtype.itemsize if shape else nbytes
            self.offsets[name] = (offset, nbytes, row)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.data_start = 8 + len(raw)
        self.size = self.data_start + offset
        self.written: dict[str, int] = {name: 0 for name in self.offsets}
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self.fd, self.size)
        self._write(len(raw).to_bytes(8, "little") + raw, 0)

    def _write(self, data, position: int) -> None:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], position + done)

    def write(self, name: str, tensor: torch.Tensor, row_start: int = 0) -> None:
        offset, nbytes, row = self.offsets[name]
        tensor = tensor.detach().cpu().contiguous()
        if tensor.numel() == 0:
            return
        data = tensor.reshape(-1).view(torch.uint8).numpy()
        start = row_start * row
        if start + data.nbytes > nbytes:
            raise InputError(f"internal error: write past the end of tensor {name!r}")
        self._write(data, self.data_start + offset + start)
        self.written[name] += data.nbytes

    def missing(self) -> list[str]:
        return [name for name, (_, nbytes, _) in self.offsets.items() if self.written[name] != nbytes]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class ModelWriter:
    """Writes planned tensors to one ``.safetensors`` file or to a sharded HF folder.

    :param target: the (temporary) output path: a file when ``single_file``, else a folder.
    :param entries: ``(name, shape, dtype)`` of every output tensor in the order they will arrive.
    :param shard_size: the most bytes per shard (a tensor larger than that gets its own shard).
    """

    def __init__(
        self,
        target: Path,
        entries: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
        *,
        shard_size: int = DEFAULT_SHARD_SIZE,
        single_file: bool = False,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.target = Path(target)
        self.single_file = single_file
        shards: list[list] = [[]]
        size = 0
        for entry in entries:
            nbytes = tensor_bytes(entry[1], entry[2])
            if not single_file and shards[-1] and size + nbytes > shard_size:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += nbytes
        if single_file:
            names = [self.target]
        else:
            self.target.mkdir(parents=True, exist_ok=True)
            n = len(shards)
            names = [self.target / (SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors") for i in range(n)]
        meta = {"format": "pt", SAFETENSORS_MARK: _version(), **dict(metadata or {})}
        self.files: list[SafetensorsFileWriter] = []
        self.where: dict[str, SafetensorsFileWriter] = {}
        try:
            for path, shard in zip(names, shards, strict=True):
                file = SafetensorsFileWriter(path, shard, meta)
                self.files.append(file)
                for name, _, _ in shard:
                    self.where[name] = file
        except BaseException:
            self.close()
            raise
        self.total_size = sum(tensor_bytes(e[1], e[2]) for e in entries)

    def write(self, name: str, tensor: torch.Tensor, row_start: int = 0) -> None:
        self.where[name].write(name, tensor, row_start)

    def finish(self) -> None:
        """Check every byte was written, close the files and write the index (sharded folders)."""
        missing = [name for file in self.files for name in file.missing()]
        self.close()
        if missing:
            raise InputError(f"internal error: output tensors not written: {', '.join(missing[:5])}")
        if not self.single_file and len(self.files) > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": {name: file.path.name for name, file in sorted(self.where.items())},
            }
            (self.target / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def close(self) -> None:
        for file in self.files:
            file.close()


# ---------------------------------------------------------------------------
# folder extras: config/tokenizer files and the model card


@attrs.frozen
class FilePlan:
    """The files of a source HF folder to copy into an output folder (checked before any work)."""

    source: Path | None = None
    files: tuple[tuple[str, Path], ...] = ()
    """``(name, real path)``, each a regular file inside the folder (or the HF blob store)."""
    skipped_code: tuple[str, ...] = ()
    config_invalid: str | None = None
    """Why ``config.json`` is not a JSON object (``None`` when it is, or is absent)."""


def plan_model_files(source: str | os.PathLike | None, *, copy_code: bool = False) -> FilePlan:
    """Which config/tokenizer/small files of ``source`` an output folder gets; refuses links out of it and special files.

    Weights, shard indexes and the model card are not copied; code files (``*.py``) only with ``copy_code``.
    """
    if source is None or not Path(source).is_dir():
        return FilePlan()
    source = Path(source)
    files: dict[str, Path] = {}
    code: list[str] = []
    for pattern in COPIED_PATTERNS:
        for path in sorted(source.glob(pattern)):
            name = path.name
            if name in files or name in code or name in SKIPPED_NAMES or name.endswith(".index.json"):
                continue
            if path.suffix in CODE_SUFFIXES and not copy_code:
                code.append(name)
                continue
            real = inside(source, path)  # links out of the folder are refused, even dangling ones
            if path.is_dir() or not os.path.exists(real):
                continue
            regular(path)
            files[name] = real
    problem = None
    if "config.json" in files:
        try:
            data = json.loads(files["config.json"].read_bytes().decode("utf-8"))
            if not isinstance(data, dict):
                problem = "not a JSON object"
        except (OSError, ValueError, RecursionError) as exc:
            problem = "not valid JSON" if not isinstance(exc, OSError) else (exc.strerror or "unreadable")
    return FilePlan(source, tuple(files.items()), tuple(code), problem)


def copy_planned(plan: FilePlan, folder: Path, *, dtype: torch.dtype | None = None) -> list[str]:
    """Copy the files of ``plan`` into ``folder`` (mode 0644, never the source's), updating the config's dtype."""
    copied = []
    for name, real in plan.files:
        target = folder / name
        if os.path.lexists(target):
            continue
        src = open_regular(real)
        try:
            dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
            try:
                while chunk := os.read(src, 1 << 20):
                    os.write(dst, chunk)
                os.fchmod(dst, 0o644)
            finally:
                os.close(dst)
        finally:
            os.close(src)
        copied.append(name)
    if plan.source is not None:
        copied += copy_referenced_folders(plan.source, folder)
    config = folder / "config.json"
    if dtype is not None and "config.json" in copied and plan.config_invalid is None:
        data = json.loads(config.read_text())
        name = str(dtype).removeprefix("torch.")
        changed = False
        for key in ("torch_dtype", "dtype"):
            if key in data and data[key] != name:
                data[key] = name
                changed = True
        if changed:
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return copied


def copy_model_files(
    source: Path | None, folder: Path, *, dtype: torch.dtype | None = None, copy_code: bool = False
) -> list[str]:
    """Copy config, tokenizer and other small files of the HF folder ``source`` into ``folder``.

    See :func:`plan_model_files` (what is copied and refused) and :func:`copy_planned`.
    """
    return copy_planned(plan_model_files(source, copy_code=copy_code), folder, dtype=dtype)


def referenced_folders(source: Path) -> list[str]:
    """Sub-folders the model's own files name: sentence-transformers' ``modules.json`` (``1_Pooling`` ...).

    Only plain folders inside ``source`` count (no ``..``, no absolute paths, no symlinks).
    """
    modules = source / "modules.json"
    if not modules.is_file():
        return []
    try:
        entries = json.loads(modules.read_text())
    except ValueError:
        return []
    root = source.resolve()
    found = []
    for entry in entries if isinstance(entries, list) else []:
        rel = entry.get("path") if isinstance(entry, dict) else None
        if not isinstance(rel, str) or not rel or Path(rel).is_absolute():
            continue
        path = source / rel
        if path.is_symlink() or not path.is_dir() or root not in path.resolve().parents:
            continue
        found.append(rel)
    return found


def copy_referenced_folders(source: Path, folder: Path) -> list[str]:
    """Copy the :func:`referenced_folders` of ``source`` into ``folder`` (regular files only, no symlinks)."""
    copied = []
    for rel in referenced_folders(source):
        (folder / rel).mkdir(parents=True, exist_ok=True)
        for path in sorted((source / rel).rglob("*")):
            rel_path = path.relative_to(source)
            if path.is_symlink() or not path.is_file() or any((source / p).is_symlink() for p in rel_path.parents):
                continue
            target = folder / rel_path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        copied.append(rel)
    return copied


def write_model_card(folder: Path, recipe: Mapping[str, Any]) -> None:
    """Write ``README.md`` recording ``recipe`` (method, fields, inputs, seed, versions)."""
    import yaml

    recipe = dict(recipe)
    if "versions" not in recipe:
        import safetensors  # noqa: F401 - loaded, so its version is recorded

        from ..report import versions

        recipe["versions"] = versions()
    method = recipe.get("method", "?")
    if isinstance(method, Mapping):  # a `fuse run` config: {"name": ..., **fields}
        method = method.get("name", "?")
    tool = "fuse run" if "modelpool" in recipe else "fuse merge"
    base = recipe.get("base") or (recipe.get("modelpool") or {}).get("base")
    inputs = [str(base)] if base else []
    front: dict[str, Any] = {"tags": ["merge", "fusion", f"fusion-{method}"]}
    if (folder / "config.json").exists():
        front["library_name"] = "transformers"
    if inputs:
        front["base_model"] = inputs
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        "# Merged model",
        "",
        f"This model was made with `{tool}` (fusion) using the method **{method}**.",
        "",
        "## Recipe",
        "",
        "```yaml",
        yaml.safe_dump(plain_data(recipe), sort_keys=False, allow_unicode=True).rstrip(),
        "```",
        "",
    ]
    (folder / "README.md").write_text("\n".join(lines), encoding="utf-8")




# ---------------------------------------------------------------------------


def save_state_dict_folder(
    state: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    recipe: Mapping[str, Any] | None = None,
    files_from: str | os.PathLike | None = None,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
) -> Path:
    """Write an in-memory state dict as an HF-style folder (or one file if ``path`` ends in ``.safetensors``).

    Tied tensors (names sharing storage with an earlier name) are stored once, as
    ``save_pretrained`` does; the model card lists them.  ``files_from``: an HF folder
    whose config/tokenizer files are copied.
    """
    path = Path(path)
    aliases = find_aliases(state)
    entries = []
    for name, tensor in state.items():
        if name in aliases:
            continue
        if tensor.dtype not in DTYPE_CODES:
            raise InputError(f"cannot save tensor {name!r}: dtype {tensor.dtype} has no safetensors code")
        entries.append((name, tuple(tensor.shape), tensor.dtype))
    single = path.suffix == ".safetensors"
    with atomic_output(path, overwrite=overwrite) as tmp:
        writer = ModelWriter(tmp, entries, shard_size=parse_size(shard_size), single_file=single)
        try:
            for name, _, _ in entries:
                writer.write(name, state[name])
            writer.finish()
        finally:
            writer.close()
        if not single:
            copy_model_files(Path(files_from) if files_from else None, tmp)
            card = dict(recipe or {})
            if aliases:
                card.setdefault("tied", dict(aliases))
            write_model_card(tmp, card)
    return path
