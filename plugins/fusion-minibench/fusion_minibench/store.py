"""Read access to one built pool (a verified cache folder): encoders, heads, tokenised splits, meta.

Imports torch (through the readers): the pools import it inside their methods only.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusion_core import InputError, SafetensorsFile, TensorReader

if TYPE_CHECKING:  # pragma: no cover
    import torch


class Built:
    """The artefacts of one build; tensors are loaded on first use and kept."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    @functools.cached_property
    def meta(self) -> dict[str, Any]:
        return json.loads((self.folder / "meta.json").read_text())

    @property
    def tasks(self) -> list[str]:
        return list(self.meta["recipe"]["tasks"])

    @property
    def recipe_hash(self) -> str:
        return self.meta["recipe_hash"]

    def check_task(self, name: str) -> None:
        if name not in self.tasks:
            from fusion_core import did_you_mean

            raise InputError(f"the mini benchmark has no task {name!r}{did_you_mean(name, self.tasks)}")

    def state_dict(self, name: str | None) -> dict[str, "torch.Tensor"]:
        """The encoder state dict of the expert ``name`` (``None``: the pretrained base), freshly loaded.

        An expert's file holds the tensors it trained; the frozen embedding tables are the base's.
        """
        from safetensors.torch import load_file

        state = load_file(str(self.folder / "encoder-base.safetensors"))
        if name is not None:
            self.check_task(name)
            state.update(load_file(str(self.folder / f"expert-{name}.safetensors")))
        return state

    def reader(self, name: str | None):
        """A lazy reader of the same tensors as :meth:`state_dict` (read one by one from the files)."""
        if name is not None:
            self.check_task(name)
        return BuildReader(self.folder, name)

    @property
    def bert_config(self) -> dict[str, Any]:
        """The encoder's BERT configuration (MiniLM's, with the recipe's number of layers)."""
        return dict(self.meta["bert_config"])

    def encoder(self, state: "dict[str, torch.Tensor]"):
        """A :class:`~fusion_minibench.model.MiniLMEncoder` in eval mode holding ``state``."""
        from .model import MiniLMEncoder

        return MiniLMEncoder.from_state_dict(self.bert_config, state)

    # Cached tensors must not be inference tensors, even when first read inside
    # ``torch.inference_mode`` (an evaluation): methods that train on them later need autograd.
    @functools.cached_property
    def _heads(self) -> dict[str, "torch.Tensor"]:
        return _load_normal(self.folder / "heads.safetensors")

    @functools.cached_property
    def _data(self) -> dict[str, "torch.Tensor"]:
        return _load_normal(self.folder / "data.safetensors")

    def head(self, task: str):
        """A fresh :class:`~fusion_minibench.model.PromptHead` of ``task`` (fixed; buffers only)."""
        from .model import PromptHead

        self.check_task(task)
        return PromptHead(self._heads[task], self.meta["recipe"]["logit_scale"])

    def split(self, task: str, split: str) -> tuple["torch.Tensor", "torch.Tensor"]:
        """``(ids, labels)`` of a split: padded token ids (int64, 0 = [PAD]), sorted by length, and class labels."""
        from .data import SPLITS

        self.check_task(task)
        if split not in SPLITS:
            raise InputError(f"unknown split {split!r}; choose from: {', '.join(SPLITS)}")
        return self._data[f"{task}/{split}/ids"], self._data[f"{task}/{split}/labels"]


class BuildReader(TensorReader):
    """An expert's tensors read lazily from its file, the frozen ones from the base's file.

    Merges stream tensor by tensor, so memory holds neither six full experts nor six copies of
    the frozen embedding tables.
    """

    def __init__(self, folder: Path, name: str | None) -> None:
        self.label = name or "base"
        self._base = SafetensorsFile(folder / "encoder-base.safetensors")
        self._own = SafetensorsFile(folder / f"expert-{name}.safetensors") if name is not None else self._base
        self._keys = list(self._base.names)

    def _file(self, key: str) -> SafetensorsFile:
        if key in self._own.entries:
            return self._own
        if key in self._base.entries:
            return self._base
        raise InputError(f"minibench {self.label} has no tensor {key!r}")

    def keys(self) -> list[str]:
        return list(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._file(key).entries[key][1]

    def dtype(self, key: str) -> "torch.dtype":
        return self._file(key).entries[key][0]

    def get(self, key: str) -> "torch.Tensor":
        return self._file(key).read(key)

    def get_rows(self, key: str, start: int, stop: int) -> "torch.Tensor":
        return self._file(key).read(key, start, stop)

    def location(self, key: str) -> tuple[str, int]:
        return ("", self._base.entries[key][2])

    def close(self) -> None:
        self._base.close()
        self._own.close()


def _load_normal(path: Path) -> dict[str, "torch.Tensor"]:
    import torch
    from safetensors.torch import load_file

    with torch.inference_mode(False):
        return load_file(str(path))


@functools.lru_cache(maxsize=8)
def _open(folder: str, stamp: float) -> Built:
    return Built(Path(folder))


def open_built(folder: Path) -> Built:
    """The :class:`Built` of ``folder``, shared within the process until the folder is rebuilt."""
    manifest = Path(folder) / "manifest.json"
    return _open(str(folder), manifest.stat().st_mtime_ns if manifest.exists() else -1)
