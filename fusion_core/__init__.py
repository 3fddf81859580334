"""fusion: a plugin-based framework and benchmark for deep model fusion.

The public API: :data:`hookimpl` (plugins), :func:`run` (one run, like ``fuse run``),
:func:`load_config`, and the component base classes in :mod:`fusion_core.components`.
Nothing heavy is imported here.
"""

from __future__ import annotations

from .hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["__version__", "hookimpl", "run", "load_config"]


def run(config, **kwargs):
    """Run model pool → method → task pool → report; see :func:`fusion_core.program.run`."""
    from .program import run as _run

    return _run(config, **kwargs)


def load_config(*args, **kwargs):
    """Load and validate a run config; see :func:`fusion_core.runconfig.load_run_config`."""
    from .runconfig import load_run_config

    return load_run_config(*args, **kwargs)
