"""fusion-minibench: a miniature, offline, CPU FusionBench built from real data that pip packages ship.

See the README for the recipe, the measured figures and the API for data-driven methods.
Nothing heavy is imported here.
"""

__version__ = "0.1.0"
