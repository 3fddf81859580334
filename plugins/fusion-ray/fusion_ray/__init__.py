"""fusion-ray: the ``ray`` executor of ``fuse sweep`` (a local Ray, or a cluster with ``--address``)."""

__version__ = "0.1.0"
