"""Writing outputs so that nothing is lost or half-written, and nothing the user did not ask for is replaced.

Every output goes to a hidden temporary path beside it (``.NAME.fuse-tmp-<owner>-<hex>``) and is
renamed into place when complete, with a rename that never replaces what appeared meanwhile.
``overwrite`` replaces only what fuse itself wrote: a folder holding :data:`MARKER` (or a model
card or run report fuse wrote), a ``.safetensors`` file whose metadata names fuse, or an empty
folder.  Inputs, folders holding inputs, the working directory and its parents are never outputs.
Temporary paths of processes that died (``kill -9``) are removed by the next write to that folder.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from .cleanup import OLD_TAG, TEMP_TAG, owner_tag, remove_path, remove_stale_temps
from .errors import InputError

MARKER = ".fuse-output.json"
"""The file in every output folder fuse writes: the tool and version that wrote it."""
SAFETENSORS_MARK = "fusion"
"""The ``__metadata__`` key of every safetensors file fuse writes."""
_CARD_SIGNS = ("This model was made with `fuse", "Made with fusion (`fuse run`)")

_FIXES = {
    errno.ENOSPC: "the disk is full: free space or write the output elsewhere",
    errno.EDQUOT: "the disk quota is exhausted: free space or write the output elsewhere",
    errno.EFBIG: "the file is too large for this file system: use a smaller --shard-size or another disk",
    errno.EROFS: "the file system is read-only: write the output elsewhere",
    errno.EACCES: "permission denied: write the output to a folder you can write",
    errno.EPERM: "operation not permitted: write the output to a folder you can write",
    errno.EBUSY: "the path is in use: close the program using it or write the output elsewhere",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another output path",
    errno.EISDIR: "a folder is in the way: choose another output path",
    errno.EEXIST: "something appeared at that path: choose another output path",
    errno.ENAMETOOLONG: "the name is too long: choose a shorter output path",
}


class OutputError(InputError):
    """An output cannot be written (or would replace something fuse did not write)."""


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


def os_error_line(exc: OSError, path: str | os.PathLike, doing: str = "write") -> str:
    """One line for an OSError met at ``path``: what failed, why, and the fix."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    fix = _FIXES.get(exc.errno or 0, "check the path and try again")
    where = exc.filename if isinstance(exc.filename, str) and exc.filename and TEMP_TAG not in exc.filename else str(path)
    return f"cannot {doing} {where}: {reason}; {fix}"


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(path))


def _named(path: Path) -> Path:
    """The absolute path of ``path`` with its folders resolved but not its last part (a link stays a link)."""
    return _real(path.parent) / path.name if path.name not in ("", ".", "..") else _real(path)


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def is_fuse_output(path: str | os.PathLike) -> bool:
    """Whether ``path`` is something fuse wrote (and may replace): see the module docstring."""
    path = Path(path)
    if path.is_symlink():
        return False
    if path.is_dir():
        try:
            names = set(os.listdir(path))
        except OSError:
            return False
        if not names:
            return True
        if MARKER in names and (path / MARKER).is_file():
            return True
        card = path / "README.md"
        if "README.md" in names and card.is_file() and card.stat().st_size < 1_000_000:
            with contextlib.suppress(OSError, UnicodeDecodeError):
                text = card.read_text(encoding="utf-8")
                if any(sign in text for sign in _CARD_SIGNS):
                    return True
        report = path / "report.json"
        if "report.json" in names and report.is_file() and report.stat().st_size < 50_000_000:
            with contextlib.suppress(OSError, ValueError):
                return isinstance(data := json.loads(report.read_text()), dict) and "fusion_report" in data
        return False
    if path.is_file() and path.suffix == ".safetensors":
        return _safetensors_written_by_fuse(path)
    return False


def _safetensors_written_by_fuse(path: Path) -> bool:
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n <= 1 or 8 + n > size or n > 100 * 2**20:
                return False
            header = json.loads(fh.read(n))
    except (OSError, ValueError):
        return False
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(meta, dict) and SAFETENSORS_MARK in meta


def marker_data() -> dict[str, str]:
    from . import __version__

    return {"written_by": "fusion", "tool": "fuse", "version": __version__}


class OutputTarget:
    """A checked output path: where it goes and, when it replaces an earlier fuse output, which one."""

    def __init__(self, path: Path, replaces: tuple[int, int] | None) -> None:
        self.path, self.replaces = path, replaces


def check_output_path(
    path: str | os.PathLike,
    *,
    overwrite: bool,
    inputs: Iterable[str | os.PathLike] = (),
    make_parent: bool = False,
) -> OutputTarget:
    """Refuse, before any work, an output that would destroy what the user did not ask to destroy.

    Refused: the working directory or a folder holding it, an input, a folder holding an input,
    a path inside an input folder, an existing path without ``overwrite``, an existing path fuse
    did not write (even with ``overwrite``), a missing parent folder (with ``make_parent``, one
    missing level is allowed: :func:`atomic_output` creates it) and an unwritable parent.
    """
    raw = str(path)
    if not raw.strip():
        raise OutputError("the output path is empty: give a new file or folder name")
    path = Path(path)
    absolute = _named(path)
    cwd = _real(os.getcwd())
    if _within(cwd, absolute):
        raise OutputError(
            f"output {raw} is the working directory; fuse never replaces it: give a new name, e.g. -o {raw.rstrip('/')}/merged"
            if absolute == cwd
            else f"output {raw} holds the working directory; fuse never replaces it: give a new output path"
        )
    for given in inputs:
        if given is None:
            continue
        # the input as named (a link is an input too) and where it leads
        for source in {_named(Path(given)), _real(given)}:
            if absolute == source:
                raise OutputError(f"output {raw} is the input {given}; write the result to a new path")
            if _within(source, absolute):
                raise OutputError(f"output {raw} holds the input {given}; write the result to a new path")
            if source.is_dir() and _within(absolute, source):
                raise OutputError(f"output {raw} is inside the input folder {given}; write the result outside it")
    parent = absolute.parent
    probe = parent  # the folder that must be writable: the parent, or with make_parent its parent
    if not os.path.lexists(parent):
        if not (make_parent and parent.parent.is_dir()):
            raise OutputError(
                f"the folder {path.parent} of output {raw} does not exist; create it first (mkdir -p {path.parent}) or choose another output"
            )
        probe = parent.parent
    elif not parent.is_dir():
        raise OutputError(f"output location not writable: {path.parent} is not a folder (choose another output path)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"output location not writable: {probe} (choose another output path)")
    replaces = None
    if os.path.lexists(absolute):
        if not is_fuse_output(absolute):
            raise OutputError(
                f"output {raw} already exists and was not written by fuse; fuse replaces only its own outputs: choose another path"
            )
        if not overwrite:
            raise OutputError(f"output {raw} already exists; pass --overwrite to replace it")
        st = os.lstat(absolute)
        replaces = (st.st_dev, st.st_ino)
    return OutputTarget(absolute, replaces)


# ---------------------------------------------------------------------------
# renames that never replace


_renameat2: Any = None


def rename_noreplace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename ``src`` to ``dst``; ``FileExistsError`` if ``dst`` exists (atomically where the OS can)."""
    global _renameat2
    if _renameat2 is None:
        _renameat2 = False
        with contextlib.suppress(Exception):
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            func = libc.renameat2
            func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            _renameat2 = (func, ctypes)
    if _renameat2:
        func, ctypes = _renameat2
        at_fdcwd, noreplace = -100, 1
        if func(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), noreplace) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):  # no renameat2 here: check, then rename (a tiny window remains)
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _commit(tmp: Path, target: OutputTarget, raw: str) -> None:
    path = target.path
    appeared = OutputError(
        f"output {raw} appeared while this run was writing (another fuse run?); it was left as it is and nothing was written: choose another path"
    )
    if target.replaces is None:
        try:
            rename_noreplace(tmp, path)
        except FileExistsError:
            raise appeared from None
        return
    trash = path.parent / f".{path.name}{OLD_TAG}{owner_tag()}-{secrets.token_hex(4)}"
    try:
        rename_noreplace(path, trash)
    except FileNotFoundError:
        trash = None
    if trash is not None:
        st = os.lstat(trash)
        if (st.st_dev, st.st_ino) != target.replaces:
            rename_noreplace(trash, path)
            raise appeared
    try:
        rename_noreplace(tmp, path)
    except FileExistsError:
        raise appeared from None
    finally:
        if trash is not None:
            remove_path(trash)


@contextlib.contextmanager
def atomic_output(
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
    make_parent: bool = False,
    notify: Callable[[str], None] | None = None,
) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (the caller makes a file or folder there); on success
    it is renamed to ``path``, on any error or Ctrl-C it is removed and ``path`` is untouched.

    ``path`` is checked by :func:`check_output_path` first.  A folder gets :data:`MARKER`.
    OSErrors (disk full, read-only, permission) become one :class:`OutputError` line.
    """
    raw = str(path)
    target = check_output_path(path, overwrite=overwrite, inputs=inputs, make_parent=make_parent)
    parent = target.path.parent
    made_parent = False
    if not parent.exists():  # make_parent: one level, removed again if nothing lands in it
        try:
            parent.mkdir()
        except OSError as exc:
            raise OutputError(os_error_line(exc, parent, "create")) from None
        made_parent = True
    remove_stale_temps(parent, notify or _note)
    tmp = parent / f".{target.path.name}{TEMP_TAG}{owner_tag()}-{secrets.token_hex(4)}"
    try:
        yield tmp
        if tmp.is_dir() and not tmp.is_symlink():
            (tmp / MARKER).write_text(json.dumps(marker_data(), indent=2) + "\n")
        _commit(tmp, target, raw)
    except BaseException as exc:
        remove_path(tmp)
        if made_parent:
            with contextlib.suppress(OSError):
                parent.rmdir()
        if not isinstance(exc, OSError) or TEMP_TAG in raw:  # nested: the outer output names the user's path
            raise
        raise OutputError(os_error_line(exc, raw)) from None


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


def _note(message: str) -> None:
    import click

    click.echo(message, err=True)
