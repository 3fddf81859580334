"""The ``fuse`` command line: one module per command group."""
