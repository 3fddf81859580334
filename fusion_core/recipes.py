"""Foreign merge recipes: the formats plugins register for ``fuse merge`` (hook ``fusion_register_recipe_formats``).

The core knows nothing of any recipe's methods or fields: a format's ``load``
returns an :class:`ImportedMerge`, which the merge command hands to the engine.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from .errors import ConfigError, PluginError, did_you_mean


@attrs.define
class ImportedMerge:
    """A recipe translated into what the merge engine runs."""

    method: Any
    """A method instance the engine streams (a per-tensor kernel or a passthrough plan)."""
    base: Any
    """The base's :class:`~fusion_core.engine.readers.TensorReader` (``None`` without a base)."""
    models: list
    """The other inputs' readers, in the order the method expects."""
    out_dtype: str | None = None
    """Output dtype of float tensors (``None``: the base's)."""
    record: dict = attrs.field(factory=dict)
    """What the model card records (method, fields, inputs, the recipe file)."""
    finish: Callable[[Path], None] | None = None
    """Called with the (temporary) output folder after the tensors and the base's files are written."""
    close: Callable[[], None] | None = None
    """Releases whatever ``load`` opened (the readers are closed by the caller)."""


@attrs.frozen
class RecipeFormat:
    name: str
    load: Callable[..., ImportedMerge]
    summary: str = ""
    plugin: str | None = None


def recipe_formats(pm) -> dict[str, RecipeFormat]:
    """Every registered recipe format by name (a duplicate name is a plugin error)."""
    formats: dict[str, RecipeFormat] = {}
    for impl in pm.hook.fusion_register_recipe_formats.get_hookimpls():
        plugin = impl.plugin_name

        def register(name: str, load: Callable[..., ImportedMerge], *, summary: str = "", _plugin=plugin) -> None:
            if name in formats:
                raise PluginError(f"recipe format {name!r} is registered by both {formats[name].plugin} and {_plugin}")
            formats[name] = RecipeFormat(name, load, summary, _plugin)

        impl.function(register=register)
    return formats


def import_recipe(pm, name: str, path: str, *, allow_pickle: bool = False) -> ImportedMerge:
    """Read ``path`` with the recipe format ``name``."""
    formats = recipe_formats(pm)
    if name not in formats:
        known = ", ".join(sorted(formats)) or "none (install fusion-merging for mergekit YAML)"
        raise ConfigError(f"unknown recipe format {name!r}{did_you_mean(name, formats)}; registered formats: {known}")
    if not Path(path).is_file():
        raise ConfigError(f"recipe file {path} does not exist")
    return formats[name].load(str(path), allow_pickle=allow_pickle)
