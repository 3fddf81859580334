"""Leftovers of interrupted runs: temporary paths of dead processes, and SIGTERM handled like Ctrl-C.

Every temporary output path is named ``.NAME.fuse-tmp-<pid>.<start>.<boot>-<hex>`` (and replaced
outputs ``.NAME.fuse-old-...`` until dropped): the owner's pid, its start time in clock ticks and
the boot id, so a later run can tell a live writer from one that was killed (``kill -9``, power
loss) even after the pid is reused, and remove what the dead one left.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

TEMP_TAG = ".fuse-tmp-"
OLD_TAG = ".fuse-old-"
_STALE = re.compile(r"^\..+(?:\.fuse-tmp-|\.fuse-old-)(\d+)(?:\.(\d+)\.([0-9a-f]{8}))?-[0-9a-f]+$")


def owner_tag() -> str:
    return f"{os.getpid()}.{_start_ticks(os.getpid())}.{_boot_id()}"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:8]
    except OSError:
        return "00000000"


def _start_ticks(pid: int) -> int:
    """The process's start time in clock ticks since boot (0 where unknown)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


def _owner_alive(pid: int, start: int | None, boot: str | None) -> bool:
    if boot is not None and boot != _boot_id():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if start and _start_ticks(pid) not in (0, start):
        return False  # the pid was reused by another process
    return True


def _size(path: Path) -> int:
    if path.is_symlink() or not path.is_dir():
        return path.lstat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover


def remove_stale_temps(parent: str | os.PathLike, notify: Callable[[str], None] | None = None) -> int:
    """Remove ``.*.fuse-tmp-*``/``.*.fuse-old-*`` paths in ``parent`` left by processes that died; returns bytes freed."""
    freed = 0
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return 0
    for entry in entries:
        match = _STALE.match(entry.name)
        if not match:
            continue
        pid, start, boot = int(match.group(1)), match.group(2), match.group(3)
        if _owner_alive(pid, int(start) if start else None, boot):
            continue
        path = Path(entry.path)
        try:
            size = _size(path)
            remove_path(path)
        except OSError:
            continue
        freed += size
        if notify is not None:
            notify(f"note: removed {path}, left by an interrupted fuse run (pid {pid}): {human_size(size)} freed")
    return freed


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        with contextlib.suppress(OSError):
            path.unlink()


# ---------------------------------------------------------------------------
# SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that every cleanup path of Ctrl-C runs."""


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`Terminated` (a ``KeyboardInterrupt``): temp outputs are removed."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
