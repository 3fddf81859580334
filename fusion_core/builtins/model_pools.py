"""Built-in model pool over plain safetensors files or HF folders (state dicts, no architecture)."""

from __future__ import annotations

import os

import attrs

from ..components import ModelPool
from ..config import option
from ..errors import ConfigError, InputError
from ..hookspecs import hookimpl


@attrs.frozen
class FilesPoolConfig:
    base: str | None = option(None, help="Base (pretrained) model: a .safetensors file or an HF model folder.")
    models: dict[str, str] = option(factory=dict, help="Fine-tuned models: {name: path to .safetensors file or HF folder}.")
    allow_pickle: bool = option(False, help="Allow pickle checkpoints (.bin/.pt); only for files you trust.")


class FilesPool(ModelPool):
    """Models as state dicts read from safetensors files or HF folders, tensor by tensor."""

    name = "files"
    summary = "State dicts from .safetensors files or HF folders (no architecture needed)."
    Config = FilesPoolConfig

    @property
    def model_names(self) -> list[str]:
        return list(self.config.models)

    @property
    def has_base(self) -> bool:
        return self.config.base is not None

    def _path(self, name: str | None) -> str:
        if name is None:
            if self.config.base is None:
                raise InputError("model pool 'files' has no base model; set modelpool.base=PATH")
            return self.config.base
        if name not in self.config.models:
            from ..errors import did_you_mean

            raise InputError(f"model pool 'files' has no model {name!r}{did_you_mean(name, self.config.models)}")
        return self.config.models[name]

    def validate(self) -> None:
        if not self.config.models:
            raise ConfigError("model pool 'files' has no models; set modelpool.models={name: path, ...}")
        paths = ([("base", self.config.base)] if self.config.base else []) + list(self.config.models.items())
        for label, path in paths:
            if not os.path.exists(path):
                raise InputError(f"model {label!r}: path not found: {path}")

    def describe(self) -> dict:
        return {"base": self.config.base, "models": dict(self.config.models)}

    def reader(self, name: str | None = None):
        from ..engine.readers import open_reader

        return open_reader(self._path(name), allow_pickle=self.config.allow_pickle)

    def load_model(self, name: str | None = None):
        reader = self.reader(name)
        try:
            return {key: reader.get(key) for key in reader.keys()}
        finally:
            reader.close()

    def model_from_state_dict(self, state_dict):
        return dict(state_dict)


@hookimpl
def fusion_register_model_pools(register):
    register(FilesPool)
