"""The ``fuse bench`` and ``fuse sweep`` commands."""
