"""Errors that reach the user as one line (no traceback unless ``--debug``)."""

from __future__ import annotations


class FuseError(Exception):
    """A user-facing error: bad config, unknown name, missing file, broken plugin...

    The message is one line that names the problem and, where possible, the fix or
    the valid choices.  The CLI prints it without a traceback and exits nonzero.
    """

    exit_code = 2


class ConfigError(FuseError):
    """The configuration (YAML, overrides or a component's fields) is invalid."""


class PluginError(FuseError):
    """A plugin failed to import or register, or two plugins clash."""


class InputError(FuseError):
    """An input (model file, tensor, dataset) is missing or does not fit."""


def did_you_mean(word: str, choices, *, n: int = 3) -> str:
    """Return ``" (did you mean 'x'?)"`` or a list of valid choices, for messages."""
    import difflib

    choices = sorted(choices)
    close = difflib.get_close_matches(word, choices, n=n, cutoff=0.5)
    if close:
        return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"
    if not choices:
        return " (none are available)"
    shown = ", ".join(choices[:20]) + (", ..." if len(choices) > 20 else "")
    return f" (choose from: {shown})"
