"""Duplicate inputs: the same model given twice (same file, or same bytes) would silently count double.

Paths are compared after resolving links; contents by a cheap fingerprint of each model's
safetensors files (headers plus a few sampled blocks), confirmed by a full hash only when two
fingerprints agree, so distinct models cost a few small reads.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import InputError

SAMPLES = 16
SAMPLE_BYTES = 4096


def _files(reader) -> list:
    files = getattr(reader, "source_files", None)
    return list(files()) if callable(files) else []


def _digest(files, full: bool) -> str | None:
    if not files:
        return None
    digest = hashlib.blake2b(digest_size=16)
    for file in files:
        data_size = file.size - file.data_start
        digest.update(repr(sorted((k, str(v[0]), v[1], v[2], v[3]) for k, v in file.entries.items())).encode())
        fd = os.open(file.path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            if full:
                position = file.data_start
                while chunk := os.pread(fd, 8 << 20, position):
                    digest.update(chunk)
                    position += len(chunk)
            else:
                step = max(1, data_size // SAMPLES)
                for i in range(SAMPLES):
                    digest.update(os.pread(fd, SAMPLE_BYTES, file.data_start + min(i * step, max(0, data_size - SAMPLE_BYTES))))
        finally:
            os.close(fd)
    return digest.hexdigest()


def check_duplicates(paths: Sequence[str], readers: Sequence, *, flag: str = "--allow-duplicates") -> None:
    """Refuse two inputs that are the same file/folder or hold the same tensors byte for byte."""
    seen: dict[object, str] = {}
    for path in paths:
        real = Path(os.path.realpath(path))
        try:
            st = os.stat(real)
            key: object = (st.st_dev, st.st_ino)
        except OSError:
            key = str(real)
        if key in seen:
            raise InputError(f"{path} is given twice (also as {seen[key]}), so it would count double; drop one or pass {flag}")
        seen[key] = str(path)
    samples: dict[str, int] = {}
    for i, reader in enumerate(readers):
        fingerprint = _digest(_files(reader), full=False)
        if fingerprint is None:
            continue
        if fingerprint in samples:
            j = samples[fingerprint]
            if _digest(_files(readers[j]), full=True) == _digest(_files(reader), full=True):
                raise InputError(
                    f"{paths[i]} holds the same weights as {paths[j]}, so they would count double; drop one or pass {flag}"
                )
        samples.setdefault(fingerprint, i)
