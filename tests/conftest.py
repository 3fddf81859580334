"""Core test fixtures: throwaway installed distributions, safetensors files."""

from __future__ import annotations

import textwrap

import pytest


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
