"""fusion-lab test fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture
def write_safetensors():
    """``write_safetensors(path, {name: tensor})`` → str(path)."""

    def write(path, tensors):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        return str(path)

    return write
