"""The tensor merge engine: kernels, lazy tensor readers, the streaming merge loop (stream.py) and a sharded writer.

Import the submodules you need; this package imports nothing heavy on its own.
"""
