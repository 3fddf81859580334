"""Settings for every test of the repository (core, plugins, template): offline hub, one torch thread."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _one_thread_and_clean_env(monkeypatch, tmp_path_factory):
    for key in ("FUSE_LOAD_PLUGINS", "FUSE_DISABLE_PLUGINS", "FUSE_STRICT_PLUGINS", "FUSE_TRACE_PLUGINS", "FUSE_DEBUG"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("FUSE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "fuse-cache"))
    import torch

    torch.set_num_threads(1)


