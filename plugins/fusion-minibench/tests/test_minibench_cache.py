"""Recipe hashing and the cache: hits do not rebuild, corrupt or partial builds are rebuilt, read-only fails clearly."""

from __future__ import annotations

import builtins
import errno
import json
import os
import stat
import warnings

import attrs
import pytest
from fusion_minibench import cache
from fusion_minibench.recipe import Recipe, recipe_hash

from fusion_core.errors import FuseError


def test_hash_changes_with_every_field():
    base = Recipe()
    assert recipe_hash(base) == recipe_hash(Recipe())
    assert len(recipe_hash(base)) == 16
    seen = {recipe_hash(base)}
    for field in attrs.fields(Recipe):
        value = getattr(base, field.name)
        if field.name == "tasks":
            changed = value[:-1]
        elif isinstance(value, float):
            changed = value * 2
        elif field.name == "layers":
            changed = value - 1
        else:
            changed = value + 1
        seen.add(recipe_hash(attrs.evolve(base, **{field.name: changed})))
    assert len(seen) == len(attrs.fields(Recipe)) + 1


def test_recipe_rejects_unknown_tasks():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        Recipe(tasks=("nope",))


def refuse(*args, **kwargs):
    raise PermissionError(errno.EACCES, "Permission denied")


def open_read_only(path, mode="r", *args, **kwargs):
    """``open`` as on a read-only folder: reading works, writing is refused."""
    if any(flag in mode for flag in "wax+"):
        refuse()
    return builtins.open(path, mode, *args, **kwargs)


class FakeBuilder:
    """Writes a tiny build like the real one (same file names) and counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, recipe, out_dir, *, show_progress=True):
        import torch
        from safetensors.torch import save_file

        self.calls += 1
        save_file({"w": torch.arange(1000, dtype=torch.float32)}, str(out_dir / "encoder-base.safetensors"))
        (out_dir / "meta.json").write_text(json.dumps({"recipe": recipe.to_dict(), "build": self.calls}))


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "_verified", {})
    return tmp_path / "root"


def test_a_build_is_its_meta_and_its_safetensors_whatever_the_builder(tmp_path):
    """The text build's encoder files and the vision build's base/expert files both count; a manifest of meta alone does not."""
    for weights in ("encoder-base.safetensors", "base.safetensors"):
        folder = tmp_path / weights
        folder.mkdir()
        (folder / "meta.json").write_text("{}")
        cache.write_manifest(folder)
        assert cache.check(folder) == "manifest lists no build"
        (folder / weights).write_bytes(b"tensors")
        cache.write_manifest(folder)
        assert cache.check(folder) is None


def test_cache_hit_does_not_rebuild(fresh, monkeypatch):
    builder = FakeBuilder()
    recipe = Recipe(seed=7)
    folder = cache.ensure_built(recipe, str(fresh), builder=builder)
    assert folder == fresh / "minibench" / recipe_hash(recipe)
    assert builder.calls == 1 and cache.check(folder) is None
    assert cache.ensure_built(recipe, str(fresh), builder=builder) == folder
    monkeypatch.setattr(cache, "_verified", {})  # a new process re-verifies from disk, still no build
    assert cache.ensure_built(recipe, str(fresh), builder=builder) == folder
    assert builder.calls == 1
    cache.ensure_built(Recipe(seed=8), str(fresh), builder=builder)  # another recipe, another folder
    assert builder.calls == 2
    assert sorted(p.name for p in (fresh / "minibench").iterdir() if not p.name.endswith(".lock")) == sorted(
        [recipe_hash(Recipe(seed=7)), recipe_hash(Recipe(seed=8))]
    )


def test_env_var_and_xdg_choose_the_root(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSE_CACHE_DIR", str(tmp_path / "a"))
    assert cache.cache_root() == tmp_path / "a"
    assert cache.cache_root(str(tmp_path / "b")) == tmp_path / "b"
    monkeypatch.delenv("FUSE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache.build_dir(Recipe()) == tmp_path / "x" / "fusion" / "minibench" / recipe_hash(Recipe())


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest", "partial"])
def test_corrupt_or_partial_cache_is_rebuilt_with_a_warning(fresh, monkeypatch, damage):
    builder = FakeBuilder()
    recipe = Recipe()
    folder = cache.ensure_built(recipe, str(fresh), builder=builder)
    weights = folder / "encoder-base.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "flip":  # same size, other bytes: only the checksum sees it
        blob = bytearray(weights.read_bytes())
        blob[-1] ^= 0xFF
        weights.write_bytes(bytes(blob))
    elif damage == "delete":
        (folder / "meta.json").unlink()
    elif damage == "manifest":
        (folder / "manifest.json").write_text("{not json")
    else:  # an interrupted build renamed by hand: files but no manifest
        (folder / "manifest.json").unlink()
    monkeypatch.setattr(cache, "_verified", {})
    with pytest.warns(cache.CacheRebuiltWarning, match="corrupt"):
        again = cache.ensure_built(recipe, str(fresh), builder=builder)
    assert again == folder and builder.calls == 2
    assert cache.check(folder) is None
    assert json.loads((folder / "meta.json").read_text())["build"] == 2
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == []  # no temp folders left


def test_a_failed_build_leaves_nothing_behind(fresh):
    def broken(recipe, out_dir, *, show_progress=True):
        (out_dir / "meta.json").write_text("{}")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        cache.ensure_built(Recipe(), str(fresh), builder=broken)
    assert [p.name for p in (fresh / "minibench").iterdir() if not p.name.endswith(".lock")] == []


def test_builds_abandoned_by_a_killed_process_are_removed(fresh):
    recipe = Recipe(seed=3)
    root = fresh / "minibench"
    stale = root / f".{recipe_hash(recipe)}.building-killed"
    stale.mkdir(parents=True)
    (stale / "encoder-base.safetensors").write_bytes(b"half")
    other = root / f".{recipe_hash(Recipe(seed=4))}.building-alive"  # another recipe's build: not ours to touch
    other.mkdir()
    folder = cache.ensure_built(recipe, str(fresh), builder=FakeBuilder())
    assert not stale.exists() and other.exists() and cache.check(folder) is None


def test_read_only_cache_dir_is_one_clear_error(fresh, monkeypatch):
    root = fresh
    (root / "minibench").mkdir(parents=True)
    for folder in (root / "minibench", root):
        folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    if os.geteuid() == 0:  # root ignores permission bits: make the kernel's answer explicit
        monkeypatch.setattr(cache.tempfile, "mkdtemp", refuse)
        monkeypatch.setattr(cache, "open", open_read_only, raising=False)
    try:
        with pytest.raises(FuseError) as info:
            cache.ensure_built(Recipe(), str(root), builder=FakeBuilder())
    finally:
        for folder in (root, root / "minibench"):
            folder.chmod(stat.S_IRWXU)
    message = str(info.value)
    assert "\n" not in message
    assert str(root / "minibench") in message and "FUSE_CACHE_DIR" in message and "Permission denied" in message


def test_read_only_cache_with_an_intact_build_is_used(fresh, monkeypatch):
    builder = FakeBuilder()
    folder = cache.ensure_built(Recipe(), str(fresh), builder=builder)
    monkeypatch.setattr(cache, "_verified", {})
    monkeypatch.setattr(cache.tempfile, "mkdtemp", refuse)
    monkeypatch.setattr(cache, "open", open_read_only, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.ensure_built(Recipe(), str(fresh), builder=builder) == folder
    assert builder.calls == 1
