"""Confinement of model folders: every file fuse opens on behalf of a folder stays inside it.

A model folder is untrusted input (it may come from the Hub).  Names read from its files (shard
index entries) must be plain relative paths; symlinks may point inside the folder or into the
Hugging Face cache's blob store (``.../models--*/blobs/``, where snapshot folders link);
anything else (``../``, absolute paths, links to ``/etc/shadow``) is refused by name.  FIFOs and
devices are refused from ``stat`` alone, before any ``open`` that could block.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path, PurePosixPath

from ..errors import InputError

_BLOB_STORE = re.compile(r"/models--[^/]+/blobs/[^/]+$")


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def inside(folder: str | os.PathLike, path: str | os.PathLike, *, what: str = "file") -> Path:
    """The real path of ``path`` if it resolves inside ``folder`` (or into the HF blob store), else an error."""
    real = Path(os.path.realpath(path))
    if _within(real, Path(os.path.realpath(folder))) or _BLOB_STORE.search(str(real)):
        return real
    raise InputError(
        f"{path} points outside the model folder {folder}; fuse never reads files outside a model folder "
        f"(replace the link by the {what} itself)"
    )


def member(folder: str | os.PathLike, name: object, *, named_in: str | os.PathLike) -> Path:
    """The file ``name`` (read from ``named_in``, e.g. a shard index) inside ``folder``, confined."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise InputError(f"{named_in} names an invalid file {str(name)[:80]!r}; expected a file name inside {folder}")
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or os.path.isabs(name) or ".." in parts or re.match(r"^[A-Za-z]:", name):
        raise InputError(
            f"{named_in} names {name[:200]!r}, outside the model folder {folder}; fuse reads only files inside it"
        )
    return inside(folder, Path(folder) / name, what="shard")


def regular(path: str | os.PathLike) -> os.stat_result:
    """``stat`` of ``path`` (following links) if it is a regular file; FIFOs, devices, sockets and folders are refused."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = (
            "a FIFO" if stat.S_ISFIFO(st.st_mode)
            else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
            else "a socket" if stat.S_ISSOCK(st.st_mode)
            else "a folder" if stat.S_ISDIR(st.st_mode)
            else "not a regular file"
        )
        raise InputError(f"{path} is {kind}, not a regular file; fuse reads only regular files")
    return st


def open_regular(path: str | os.PathLike) -> int:
    """A read-only descriptor of the regular file ``path`` (checked before and after opening; never blocks)."""
    regular(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped between stat and open
        os.close(fd)
        raise InputError(f"{path} is not a regular file; fuse reads only regular files")
    return fd
