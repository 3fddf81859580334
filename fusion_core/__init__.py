"""fusion: a plugin-based framework and benchmark for deep model fusion.

The public API, for plugins and scripts: import these names from ``fusion_core`` (``from
fusion_core import KernelMethod, option``) rather than from its internal modules, which may move;
a test lists every internal import in the plugins.  Everything but :data:`hookimpl` is imported on
first use, so ``import fusion_core`` (and ``fuse --help``) stays light.

- plugins: :data:`hookimpl`;
- components: :class:`Component`, :class:`Method`, :class:`ModelPool`, :class:`TaskPool`,
  :class:`Capabilities`, :class:`RunContext`;
- the merge engine's method protocol: :class:`KernelMethod`, :class:`TwoPhaseKernel`,
  :class:`PassthroughMethod`, :class:`KernelContext`, :func:`tensor_seed` (the per-tensor seed);
- configs: :func:`option` (:class:`DefaultBy`, :class:`DefaultCase`: a default chosen by another field), :func:`in_range`, :func:`positive`, :func:`make_config`,
  :func:`config_fields`, :func:`config_to_dict`, :func:`describe_fields`, :func:`parse_value`,
  :func:`parse_override`, :func:`plain_override`, :func:`read_yaml`,
  :func:`load_yaml_file`, :func:`dump_yaml`, :func:`clip_text`;
- run configs (for tools that compose runs): :class:`RunSettings`, :func:`raw_run_config`,
  :func:`resolve_run_config`, :data:`COMPONENT_KEYS`, :data:`DEFAULT_BENCHMARK`;
- errors: :class:`FuseError`, :class:`ConfigError`, :class:`InputError`, :class:`PluginError`,
  :func:`did_you_mean`;
- tensors in and out: :class:`TensorReader`, :func:`open_reader`, :class:`StateDictReader`,
  :class:`ShardedReader`, :class:`SafetensorsFile`, :func:`parse_dtype`, :class:`ModelWriter`,
  :func:`save_state_dict_folder`, :func:`write_model_card`;
- outputs (nothing half-written, nothing replaced that fuse did not write):
  :func:`check_output_path`, :func:`atomic_output`, :func:`write_text_atomic`, :func:`plain_data`;
- foreign recipes: :class:`ImportedMerge`;
- reports and listings: :func:`provenance`, :func:`averages`, :class:`Column`, :func:`emit`,
  :func:`default_format`, :func:`console`, :func:`error_console`, :class:`Progress` (plain progress lines of a long phase);
- running: :func:`run` (like ``fuse run``), :func:`load_config` (a validated run config), :func:`get_plugin_manager`,
  :func:`build_registry`; :mod:`fusion_core.adapters` is a public module (the model-adapter
  protocol of data-driven methods: ``forward``, ``functional_forward``, ``apply_classifier``, ...), and so is
  :mod:`fusion_core.backdoor` (task pools whose inputs can carry a trigger, the attack success rate).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .hookspecs import hookimpl

__version__ = "0.1.0"

#: public name → ``".module"`` (relative to this package) that defines it, or ``".module:attr"``
_EXPORTS = {
    "Component": ".components", "Method": ".components", "ModelPool": ".components", "TaskPool": ".components",
    "Capabilities": ".components", "RunContext": ".run_context",
    "KernelMethod": ".engine.kernel", "TwoPhaseKernel": ".engine.kernel", "PassthroughMethod": ".engine.kernel",
    "KernelContext": ".engine.kernel", "tensor_seed": ".engine.kernel",
    "option": ".config", "DefaultBy": ".config", "DefaultCase": ".config", "in_range": ".config", "positive": ".config", "make_config": ".config",
    "config_fields": ".config", "config_to_dict": ".config", "describe_fields": ".config", "parse_value": ".config",
    "parse_override": ".config", "plain_override": ".config", "read_yaml": ".config",
    "load_yaml_file": ".config", "dump_yaml": ".safe_yaml:dump", "clip_text": ".config:clip",
    "RunSettings": ".runconfig", "raw_run_config": ".runconfig", "resolve_run_config": ".runconfig",
    "COMPONENT_KEYS": ".runconfig", "DEFAULT_BENCHMARK": ".runconfig",
    "FuseError": ".errors", "ConfigError": ".errors", "InputError": ".errors", "PluginError": ".errors",
    "did_you_mean": ".errors",
    "TensorReader": ".engine.readers", "open_reader": ".engine.readers", "StateDictReader": ".engine.readers",
    "ShardedReader": ".engine.readers", "SafetensorsFile": ".engine.readers", "parse_dtype": ".engine.validate",
    "ModelWriter": ".engine.writer", "save_state_dict_folder": ".engine.writer", "write_model_card": ".engine.writer",
    "check_output_path": ".output", "atomic_output": ".output", "write_text_atomic": ".output", "plain_data": ".output",
    "ImportedMerge": ".recipes",
    "provenance": ".report", "averages": ".report",
    "Column": ".tables", "emit": ".tables", "default_format": ".tables",
    "console": ".consoles", "error_console": ".consoles", "Progress": ".progress",
    "get_plugin_manager": ".plugins", "build_registry": ".registry",
    "run": ".program", "load_config": ".runconfig:load_run_config",
}
_MODULES = {"adapters": ".adapters", "backdoor": ".backdoor"}

__all__ = ["__version__", "hookimpl", *_EXPORTS, *_MODULES]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from . import adapters, backdoor  # noqa: F401
    from .components import Capabilities, Component, Method, ModelPool, TaskPool  # noqa: F401
    from .config import (  # noqa: F401
        DefaultBy,
        DefaultCase,
        config_fields,
        config_to_dict,
        describe_fields,
        in_range,
        load_yaml_file,
        make_config,
        option,
        parse_override,
        parse_value,
        plain_override,
        positive,
        read_yaml,
    )
    from .config import clip as clip_text  # noqa: F401
    from .consoles import console, error_console  # noqa: F401
    from .engine.kernel import KernelContext, KernelMethod, PassthroughMethod, TwoPhaseKernel, tensor_seed  # noqa: F401
    from .engine.readers import SafetensorsFile, ShardedReader, StateDictReader, TensorReader, open_reader  # noqa: F401
    from .engine.validate import parse_dtype  # noqa: F401
    from .engine.writer import ModelWriter, save_state_dict_folder, write_model_card  # noqa: F401
    from .errors import ConfigError, FuseError, InputError, PluginError, did_you_mean  # noqa: F401
    from .output import atomic_output, check_output_path, plain_data, write_text_atomic  # noqa: F401
    from .plugins import get_plugin_manager  # noqa: F401
    from .program import run  # noqa: F401
    from .progress import Progress  # noqa: F401
    from .recipes import ImportedMerge  # noqa: F401
    from .registry import build_registry  # noqa: F401
    from .report import averages, provenance  # noqa: F401
    from .run_context import RunContext  # noqa: F401
    from .runconfig import COMPONENT_KEYS, DEFAULT_BENCHMARK, RunSettings, raw_run_config, resolve_run_config  # noqa: F401
    from .runconfig import load_run_config as load_config  # noqa: F401
    from .safe_yaml import dump as dump_yaml  # noqa: F401
    from .tables import Column, default_format, emit  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module, _, attr = _EXPORTS[name].partition(":")
        value = getattr(importlib.import_module(module, __name__), attr or name)
    elif name in _MODULES:
        value = importlib.import_module(_MODULES[name], __name__)
    else:
        raise AttributeError(f"module 'fusion_core' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

