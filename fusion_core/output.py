"""Writing outputs so that nothing is lost or half-written: temp path, then rename."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import InputError


def plain_data(value: Any) -> Any:
    """A JSON/YAML-safe copy: mappings and sequences recursively, tensors/arrays as lists, other objects as strings."""
    if isinstance(value, dict) or hasattr(value, "items") and callable(value.items):
        return {str(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    tolist = getattr(value, "tolist", None)
    return plain_data(tolist()) if callable(tolist) else str(value)


def check_output_path(path: str | os.PathLike, *, overwrite: bool) -> Path:
    """Refuse an existing output (unless ``overwrite``) or an unwritable parent, before any work."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(f"output {path} already exists; pass --overwrite (or overwrite=true) to replace it, or choose another path")
    parent = path.parent if str(path.parent) else Path(".")
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"output location not writable: {probe} (choose another output path)")
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` on success, delete it on any error.

    Refuses an existing ``path`` unless ``overwrite``.  Parent folders created here are
    removed again on failure.
    """
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise InputError(f"output {path} already exists; pass --overwrite to replace it")
    created: list[Path] = []
    parent = path.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.fuse-tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        yield tmp
        if path.exists() or path.is_symlink():
            trash = path.parent / f".{path.name}.fuse-old-{secrets.token_hex(4)}"
            os.replace(path, trash)
            os.replace(tmp, path)
            _remove(trash)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a new temp folder beside ``path``; on success it replaces ``path`` in one rename.

    :func:`check_output_path`'s refusals first, then :func:`atomic_output`
    (on any error or Ctrl-C the temp folder is removed and ``path`` is untouched).
    """
    path = check_output_path(path, overwrite=overwrite)
    with atomic_output(path, overwrite=overwrite) as tmp:
        tmp.mkdir()
        yield tmp


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` (creating its folder) through a temp file in the same folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON to ``path`` through a temp file in the same folder."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
