"""Model entries of a pool: a hub id, a local folder, ``{path, revision, subfolder}`` or ``{adapter: ...}``.

Parsing is pure (no file system); :meth:`ModelSource.locate` looks at the disk and the
hub cache, never at the network.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import attrs

from fusion_core import ConfigError, InputError

from . import hub

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")
ENTRY_KEYS = {"path", "revision", "subfolder", "adapter", "check_base"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
LOCAL, CACHED, REMOTE = "local", "cached", "remote"


@attrs.frozen
class ModelSource:
    """One entry of a model pool, as written in the config."""

    label: str
    """``base`` or ``model 'name'``, for messages."""
    path: str
    """A local folder or a hub id (of the model, or of the adapter when ``adapter``)."""
    revision: str | None = None
    subfolder: str | None = None
    adapter: bool = False
    """A LoRA/PEFT adapter, merged into the pool's base on load."""
    check_base: bool = True
    """Adapters: refuse one whose recorded base differs from the pool's base."""

    @property
    def config_file(self) -> str:
        return "adapter_config.json" if self.adapter else "config.json"

    def spec(self) -> str:
        """``path`` or ``id@revision`` (with ``/subfolder``) for reports."""
        text = self.path + (f"/{self.subfolder}" if self.subfolder and self.is_local_path() else "")
        if not self.is_local_path():
            text = f"{self.path}@{self.revision or 'main'}" + (f" (subfolder {self.subfolder})" if self.subfolder else "")
        return text

    def is_local_path(self) -> bool:
        """True when ``path`` names the local file system (it exists, or it cannot be a hub id)."""
        p = Path(self.path).expanduser()
        if p.exists():
            return True
        text = self.path
        return (os.path.isabs(text) or text.startswith((".", "~")) or "\\" in text or text.count("/") > 1
                or text.endswith("/") or not HUB_ID.match(text))

    def locate(self, cache_dir: str | None = None) -> "Location":
        """Where the entry is: a local folder, a hub-cache snapshot, or only on the hub."""
        if self.is_local_path():
            root = Path(self.path).expanduser()
            if not root.exists():
                kind = "adapter" if self.adapter else "model"
                raise InputError(f"{self.label}: local path not found: {self.path} (give an existing {kind} folder or a hub id like org/name)")
            if self.revision:
                raise ConfigError(f"{self.label}: revision {self.revision!r} applies to hub ids, but {self.path} is a local folder")
            folder = root / self.subfolder if self.subfolder else root
            if not folder.is_dir():
                raise InputError(f"{self.label}: {folder} is not a folder (an HF model folder holds {self.config_file} and the weights)")
            return Location(self, LOCAL, folder)
        filename = f"{self.subfolder}/{self.config_file}" if self.subfolder else self.config_file
        found = hub.cached_file(self.path, filename, revision=self.revision, cache_dir=cache_dir)
        if found is not None:
            return Location(self, CACHED, found.parent)
        return Location(self, REMOTE, None)


@attrs.frozen
class Location:
    source: ModelSource
    kind: str
    folder: Path | None
    """The folder holding ``config.json`` (local or cached); ``None`` for hub-only entries."""

    def describe(self) -> str:
        if self.kind == REMOTE:
            return f"would fetch {self.source.path}@{self.source.revision or 'main'}" + (
                f" (subfolder {self.source.subfolder})" if self.source.subfolder else "")
        if self.kind == CACHED:
            return f"{self.source.spec()} (hub cache: {self.folder})"
        return str(self.folder)

    def read_config(self) -> dict | None:
        """``config.json`` (or ``adapter_config.json``) as a dict; ``None`` for hub-only entries."""
        if self.folder is None:
            return None
        path = self.folder / self.source.config_file
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            what = "a PEFT adapter folder" if self.source.adapter else "an HF model folder"
            raise InputError(f"{self.source.label}: {self.folder} has no {self.source.config_file}; it is not {what}") from None
        except (OSError, ValueError) as exc:
            raise InputError(f"{self.source.label}: cannot read {path}: {exc}") from None
        if not isinstance(data, dict):
            raise InputError(f"{self.source.label}: {path} is not a JSON object")
        return data

    def weight_files(self) -> tuple[list[str], list[str]]:
        """(safetensors files, pickle files) in the folder."""
        if self.folder is None:
            return [], []
        names = [p.name for p in self.folder.iterdir() if p.is_file()]
        safes = sorted(n for n in names if n.endswith(".safetensors") or n.endswith(".safetensors.index.json"))
        pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES) or n.endswith(".bin.index.json"))
        return safes, pickles

    def check_weights(self, allow_pickle: bool) -> None:
        """Refuse pickle-only folders unless allowed; refuse folders without weights."""
        if self.folder is None:
            return
        safes, pickles = self.weight_files()
        if safes:
            return
        if pickles:
            if allow_pickle:
                return
            raise InputError(f"{self.source.label}: {self.folder} holds only pickle weights ({', '.join(pickles[:2])}), and loading pickle "
                             "can run arbitrary code: convert it to safetensors, or set allow_pickle: true if you trust it")
        raise InputError(f"{self.source.label}: {self.folder} has no weights (*.safetensors)")


def parse_entry(label: str, value: Any) -> ModelSource:
    """A config value (string or mapping) → :class:`ModelSource`; shape errors are ConfigErrors."""
    if isinstance(value, str):
        if not value.strip():
            raise ConfigError(f"{label}: empty model path")
        return ModelSource(label=label, path=value)
    if not isinstance(value, dict):
        raise ConfigError(f"{label}: expected a hub id, a folder or a mapping {{path, revision, subfolder}}, got {value!r}")
    unknown = set(value) - ENTRY_KEYS
    if unknown:
        from fusion_core import did_you_mean

        key = sorted(unknown)[0]
        raise ConfigError(f"{label}: unknown key {key!r}{did_you_mean(key, ENTRY_KEYS)}")
    if ("path" in value) == ("adapter" in value):
        raise ConfigError(f"{label}: give exactly one of 'path' (a model) or 'adapter' (a LoRA/PEFT adapter)")
    path = value.get("path", value.get("adapter"))
    if not isinstance(path, str) or not path.strip():
        raise ConfigError(f"{label}: the model path must be a non-empty string, got {path!r}")
    for key in ("revision", "subfolder"):
        if value.get(key) is not None and not isinstance(value[key], str):
            raise ConfigError(f"{label}: {key} must be a string, got {value[key]!r}")
    if not isinstance(value.get("check_base", True), bool):
        raise ConfigError(f"{label}: check_base must be true or false")
    if "check_base" in value and "adapter" not in value:
        raise ConfigError(f"{label}: check_base applies only to adapter entries")
    return ModelSource(label=label, path=path, revision=value.get("revision"), subfolder=value.get("subfolder"),
                       adapter="adapter" in value, check_base=value.get("check_base", True))
