"""The two rich consoles: results on stdout, messages and progress on stderr."""

from __future__ import annotations

import functools


@functools.cache
def console():
    from rich.console import Console

    return Console()


@functools.cache
def error_console():
    from rich.console import Console

    return Console(stderr=True)
