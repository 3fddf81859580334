"""Shared fixtures: offline hub, one torch thread, fresh plugin managers, throwaway distributions."""

from __future__ import annotations

import os
import textwrap

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


@pytest.fixture
def make_dist(tmp_path, monkeypatch):
    """Create a real (throwaway) installed distribution on sys.path: dist-info + module source.

    ``make_dist("fusion-demo", "fusion_demo", source, entry="demo")`` makes
    ``importlib.metadata`` see a distribution with an entry point in group ``fusion``.
    """
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    monkeypatch.syspath_prepend(str(site))

    def make(dist: str, module: str, source: str, *, entry: str, version: str = "1.2.3", target: str | None = None):
        (site / f"{module}.py").write_text(textwrap.dedent(source))
        info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[fusion]\n{entry} = {target or module}\n")
        import importlib

        importlib.invalidate_caches()
        return site

    return make


@pytest.fixture
def write_safetensors():
    """``write_safetensors(path, {name: tensor})`` → str(path)."""

    def write(path, tensors):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        return str(path)

    return write
