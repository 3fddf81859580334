"""``python -m fusion_core`` runs the ``fuse`` CLI."""

from .cli.main import entry

entry()
