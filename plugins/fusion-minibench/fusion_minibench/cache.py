"""Where the built pool lives, and how a complete, intact build is recognised.

Layout: ``<root>/minibench/<recipe hash>/`` with the builder's files plus ``manifest.json``
(size and SHA-256 of every file), written last.  ``<root>`` is, in order: the pool's
``cache_dir`` field, ``$FUSE_CACHE_DIR``, ``$XDG_CACHE_HOME/fusion``, ``~/.cache/fusion``.

A build runs in a temporary sibling folder that is renamed into place when complete, so a
crash never leaves a half-written cache under the final name; a lock file next to it makes a
second process wait for the first build instead of building the same recipe again.  A folder whose manifest is
missing or does not match its files (truncated or edited file, missing file) is moved aside
with a :class:`CacheRebuiltWarning` and rebuilt.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

from fusion_core import FuseError

from .recipe import Recipe, build, recipe_hash

ENV_VAR = "FUSE_CACHE_DIR"
MANIFEST = "manifest.json"
_verified: dict[tuple[str, float], bool] = {}
_lock = threading.Lock()


class CacheRebuiltWarning(UserWarning):
    """A cached build was corrupt or incomplete and is being rebuilt."""


def cache_root(cache_dir: str | None = None) -> Path:
    """The folder that holds ``minibench/<hash>/`` (not created here)."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "fusion"


def build_dir(recipe: Recipe, cache_dir: str | None = None) -> Path:
    return cache_root(cache_dir) / "minibench" / recipe_hash(recipe)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    manifest = {name: {"bytes": (folder / name).stat().st_size, "sha256": _sha256(folder / name)} for name in files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))


def check(folder: Path) -> str | None:
    """``None`` when ``folder`` holds a complete build matching its manifest, else what is wrong."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return "no manifest (an interrupted build?)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        return f"unreadable manifest ({exc})"
    if not isinstance(manifest, dict) or "meta.json" not in manifest or not any(name.endswith(".safetensors") for name in manifest):
        return "manifest lists no build"  # every builder (text, vision) writes meta.json and its tensors as safetensors
    for name, entry in manifest.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry.get("bytes"):
            return f"{name} has {path.stat().st_size} bytes, the manifest says {entry.get('bytes')}"
        if _sha256(path) != entry.get("sha256"):
            return f"{name} does not match its checksum"
    return None


_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EBUSY, errno.EFBIG}


def _not_writable(root: Path, exc: OSError) -> FuseError:
    reason = exc.strerror or type(exc).__name__
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = f"free space there, or set {ENV_VAR} (or the pool's cache_dir) to a folder on another disk"
    else:
        fix = f"set {ENV_VAR} (or the pool's cache_dir) to a writable folder"
    return FuseError(f"cannot write the mini-benchmark cache in {root} ({reason}); {fix}")


def ensure_built(
    recipe: Recipe,
    cache_dir: str | None = None,
    *,
    show_progress: bool = True,
    builder: Callable[..., object] | None = None,
) -> Path:
    """Return the folder of an intact build of ``recipe``, building it first when needed.

    Verification (checksums) runs once per folder per process.  ``builder`` replaces
    :func:`fusion_minibench.recipe.build` (tests).
    """
    target = build_dir(recipe, cache_dir)
    with _lock:
        key = (str(target), _mtime(target / MANIFEST))
        if _verified.get(key):
            return target
        if target.exists() and check(target) is None:
            _verified[key] = True
            return target
        with _build_lock(target):  # another process may be building it: wait, then look again
            problem = check(target) if target.exists() else "not built"
            if problem is not None:
                if target.exists():
                    warnings.warn(
                        f"mini-benchmark cache {target} is corrupt ({problem}); rebuilding it", CacheRebuiltWarning, stacklevel=2
                    )
                _remove_abandoned_builds(target)
                _build_into(recipe, target, show_progress=show_progress, builder=builder or build)
        _verified[(str(target), _mtime(target / MANIFEST))] = True
        return target


@contextlib.contextmanager
def _build_lock(target: Path):
    """An exclusive lock on ``<hash>.lock`` next to the build folder (POSIX ``flock``)."""
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        handle = open(parent / f"{target.name}.lock", "a")
    except OSError as exc:
        raise _not_writable(parent, exc) from None
    try:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: concurrent builds just race (the rename settles it)
            fcntl = None
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield
    finally:
        handle.close()


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return -1.0


def _remove_abandoned_builds(target: Path) -> None:
    """Drop temp folders of builds of ``target`` that a killed process left behind.

    Safe only under the build lock: no live process is building this recipe then.
    """
    for stale in target.parent.glob(f".{target.name}.building-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _build_into(recipe: Recipe, target: Path, *, show_progress: bool, builder: Callable[..., object]) -> None:
    parent = target.parent
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=parent))
    except OSError as exc:
        raise _not_writable(parent, exc) from None
    try:
        builder(recipe, tmp, show_progress=show_progress)
        write_manifest(tmp)
        if target.exists():  # corrupt: move it aside first, then drop it
            aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.corrupt-", dir=parent))
            os.replace(target, aside / "old")
            shutil.rmtree(aside, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if check(target) is None:  # another process finished the same build first
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                raise
    except OSError as exc:  # disk full, read-only, permission: one line, nothing left behind
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno not in _WRITE_ERRORS:
            raise
        raise _not_writable(parent, exc) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
