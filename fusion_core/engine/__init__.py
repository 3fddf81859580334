"""The tensor merge engine: kernels, lazy tensor readers, a streaming executor and a sharded writer.

Import the submodules you need; this package imports nothing heavy on its own.
"""
