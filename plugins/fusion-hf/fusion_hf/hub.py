"""The Hugging Face hub without surprises: offline mode, a fast reachability probe, cache look-ups.

Nothing here downloads.  :func:`require_network` either returns quickly or raises a
one-line :class:`~fusion_core.errors.InputError`: a run never hangs on a hub id the
machine cannot fetch.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

from fusion_core import InputError

TRUE = {"1", "true", "yes", "on"}
DEFAULT_ENDPOINT = "https://huggingface.co"
PROBE_TIMEOUT_S = 3.0


def hub_offline(*, datasets: bool = False) -> bool:
    """Whether the environment asks for offline mode (``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``...)."""
    keys = ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"] + (["HF_DATASETS_OFFLINE"] if datasets else [])
    return any(os.environ.get(key, "").strip().lower() in TRUE for key in keys)


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


def _connect(host: str, port: int, timeout: float, result: list) -> None:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            result.append(None)
    except OSError as exc:
        result.append(exc)


def probe(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """``None`` when the hub endpoint accepts a TCP connection within ``timeout``, else the reason.

    Name resolution runs on a daemon thread so that a stalled DNS cannot block the run.
    """
    url = urlparse(endpoint())
    host = url.hostname or ""
    port = url.port or (443 if url.scheme == "https" else 80)
    result: list = []
    thread = threading.Thread(target=_connect, args=(host, port, timeout, result), daemon=True, name="fuse-hub-probe")
    thread.start()
    thread.join(timeout + 0.5)
    if not result:
        return f"no answer from {host}:{port} within {timeout:g}s"
    if result[0] is not None:
        err = result[0]
        return f"cannot connect to {host}:{port} ({getattr(err, 'strerror', None) or err})"
    return None


def require_network(what: str, *, datasets: bool = False) -> None:
    """Raise a one-line error when ``what`` (e.g. ``"model 'svhn': hub id x@main"``) cannot be fetched."""
    if hub_offline(datasets=datasets):
        flag = "HF_DATASETS_OFFLINE/HF_HUB_OFFLINE" if datasets else "HF_HUB_OFFLINE"
        raise InputError(f"{what} is not in the local cache and the hub is offline ({flag} is set); "
                         "download it on a connected machine or give a local folder")
    reason = probe()
    if reason is not None:
        raise InputError(f"{what} is not in the local cache and the hub is unreachable: {reason}; "
                         "give a local folder, or set HF_HUB_OFFLINE=1 to use only the cache")


def cached_file(repo_id: str, filename: str, *, revision: str | None, cache_dir: str | None, repo_type: str = "model") -> Path | None:
    """The local path of ``filename`` in the hub cache, or ``None`` (no network access)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency of transformers
        return None
    try:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision, repo_type=repo_type)
    except Exception:  # malformed ids raise validation errors; treat as "not cached"
        return None
    return Path(found) if isinstance(found, str) else None
