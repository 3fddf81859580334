"""Lazy readers that present a checkpoint's tensors under the names of the model the pool builds.

A full CLIP checkpoint stores ``vision_model.embeddings...`` while ``CLIPVisionModel``'s
state dict says ``embeddings...``; a GPT-2 LM checkpoint prefixes ``transformer.``.
``transformers`` renames keys when it loads; :func:`checkpoint_key_map` asks the same
renaming rules (on a meta-device model: nothing is allocated) for a one-to-one map from
model names to file names.  When a model needs more than renaming (fused tensors), no
map is returned and the pool falls back to loading the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from fusion_core import TensorReader

if TYPE_CHECKING:  # pragma: no cover
    import torch


def checkpoint_key_map(meta, file_keys: Iterable[str]) -> dict[str, str] | None:
    """``{model key: file key}`` for a meta-device ``transformers`` model, or ``None`` when not one-to-one."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # transformers < 5: keys only differ by the base-model prefix
        return _prefix_key_map(meta, file_keys)
    try:
        transforms = get_model_conversion_mapping(meta)
    except Exception:
        return None
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    expected = meta.state_dict()
    prefix = getattr(meta, "base_model_prefix", None)
    mapping: dict[str, str] = {}
    for key in file_keys:
        try:
            renamed, pattern = rename_source_key(key, renamings, converters, prefix, expected)
            if renamed not in expected and key in expected:
                renamed, pattern = rename_source_key(key, [], [], prefix, expected)
        except Exception:
            return None
        if pattern is not None:
            return None  # a converter (fused or split tensors): not a renaming
        if renamed in expected:
            if renamed in mapping:
                return None
            mapping[renamed] = key
    return mapping


def _prefix_key_map(meta, file_keys: Iterable[str]) -> dict[str, str]:
    expected = meta.state_dict()
    prefix = getattr(meta, "base_model_prefix", "") or ""
    mapping: dict[str, str] = {}
    for key in file_keys:
        if key in expected:
            mapping[key] = key
        elif prefix and key.startswith(prefix + ".") and key[len(prefix) + 1:] in expected:
            mapping[key[len(prefix) + 1:]] = key
        elif prefix and f"{prefix}.{key}" in expected:
            mapping[f"{prefix}.{key}"] = key
    return mapping


class MappedReader(TensorReader):
    """A view of another reader: only the mapped tensors, under the model's names."""

    def __init__(self, inner: TensorReader, key_map: dict[str, str], label: str, keep: Callable[[str], bool] | None = None) -> None:
        self.inner = inner
        self.label = label
        self.folder = inner.folder
        self.owns_tensors = inner.owns_tensors
        order = {k: i for i, k in enumerate(inner.keys())}
        self._map = {m: f for m, f in key_map.items() if keep is None or keep(m)}
        self._keys = sorted(self._map, key=lambda m: order.get(self._map[m], 0))
        self._reverse = {f: m for m, f in self._map.items()}

    def keys(self) -> list[str]:
        return list(self._keys)

    def _file_key(self, name: str) -> str:
        try:
            return self._map[name]
        except KeyError:
            from fusion_core import InputError

            raise InputError(f"{self.label} has no tensor {name!r}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.inner.shape(self._file_key(name))

    def dtype(self, name: str) -> "torch.dtype":
        return self.inner.dtype(self._file_key(name))

    def get(self, name: str) -> "torch.Tensor":
        return self.inner.get(self._file_key(name))

    def get_rows(self, name: str, start: int, stop: int) -> "torch.Tensor":
        return self.inner.get_rows(self._file_key(name), start, stop)

    def location(self, name: str) -> tuple[str, int]:
        return self.inner.location(self._file_key(name))

    def aliases(self) -> dict[str, str]:
        out = {}
        for name, source in self.inner.aliases().items():
            if name in self._reverse and source in self._reverse:
                out[self._reverse[name]] = self._reverse[source]
        return out

    def close(self) -> None:
        self.inner.close()
