"""fusion: a plugin-based framework and benchmark for deep model fusion.

The public API, for plugins and scripts: import these names from ``fusion_core`` rather
than from its internal modules (which may move).  Everything but :data:`hookimpl` is
imported on first use, so ``import fusion_core`` (and ``fuse --help``) stays light.

- plugins: :data:`hookimpl`; components :class:`Method`, :class:`KernelMethod`,
  :class:`TwoPhaseKernel`, :class:`PassthroughMethod`, :class:`ModelPool`, :class:`TaskPool`,
  :class:`Capabilities`, :class:`KernelContext`, :class:`RunContext`;
- configs: :func:`option`, :func:`in_range`, :func:`positive`, :func:`make_config`;
- errors: :class:`FuseError`, :class:`ConfigError`, :class:`InputError`, :class:`PluginError`,
  :func:`did_you_mean`;
- running: :func:`run` (like ``fuse run``), :func:`load_config`, :func:`get_plugin_manager`,
  :func:`build_registry`, :mod:`adapters` (the model-adapter protocol).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .hookspecs import hookimpl

__version__ = "0.1.0"

#: public name → the module (relative to this package) that defines it
_EXPORTS = {
    "Method": ".components", "ModelPool": ".components", "TaskPool": ".components", "Capabilities": ".components",
    "Component": ".components",
    "KernelMethod": ".engine.kernel", "KernelContext": ".engine.kernel", "TwoPhaseKernel": ".engine.kernel",
    "PassthroughMethod": ".engine.kernel",
    "RunContext": ".run_context",
    "option": ".config", "in_range": ".config", "positive": ".config", "make_config": ".config",
    "FuseError": ".errors", "ConfigError": ".errors", "InputError": ".errors", "PluginError": ".errors",
    "did_you_mean": ".errors",
    "get_plugin_manager": ".plugins", "build_registry": ".registry",
}
_MODULES = {"adapters": ".adapters"}

__all__ = ["__version__", "hookimpl", "run", "load_config", *_EXPORTS, *_MODULES]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from . import adapters  # noqa: F401
    from .components import Capabilities, Component, Method, ModelPool, TaskPool  # noqa: F401
    from .config import in_range, make_config, option, positive  # noqa: F401
    from .engine.kernel import KernelContext, KernelMethod, PassthroughMethod, TwoPhaseKernel  # noqa: F401
    from .errors import ConfigError, FuseError, InputError, PluginError, did_you_mean  # noqa: F401
    from .plugins import get_plugin_manager  # noqa: F401
    from .registry import build_registry  # noqa: F401
    from .run_context import RunContext  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    elif name in _MODULES:
        value = importlib.import_module(_MODULES[name], __name__)
    else:
        raise AttributeError(f"module 'fusion_core' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def run(config=None, **kwargs):
    """Run model pool → method → task pool → report; see :func:`fusion_core.program.run`."""
    from .program import run as _run  # noqa: F401

    return _run(config, **kwargs)


def load_config(*args, **kwargs):
    """Load and validate a run config; see :func:`fusion_core.runconfig.load_run_config`."""
    from .runconfig import load_run_config  # noqa: F401

    return load_run_config(*args, **kwargs)
