"""Session fixtures: a float32 and a float64 synthetic world (base, three fine-tunes, three tasks)."""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch

# the suite runs with --import-mode=importlib: make the helper module of this folder importable
sys.path.insert(0, str(pathlib.Path(__file__).parent))

from adaptive_fixtures import World  # noqa: E402


@pytest.fixture(scope="session")
def world() -> World:
    return World()


@pytest.fixture(scope="session")
def world64() -> World:
    return World(dtype=torch.float64)
