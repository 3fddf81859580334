"""Per-task classification heads: kept out of the merge, attached to the merged model, swapped in per task.

A model carrying heads has the attribute ``fusion_task_heads = {task: {param name: tensor}}``;
task pools call :func:`task_head` around the evaluation of each task.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

ATTRIBUTE = "fusion_task_heads"


def is_backbone_key(name: str, prefix: str | None) -> bool:
    """Whether ``name`` belongs to the backbone (``<base_model_prefix>.…``) rather than the head."""
    return bool(prefix) and (name == prefix or name.startswith(prefix + "."))


def attach(model, heads: Mapping[str, Mapping[str, "torch.Tensor"]]) -> None:
    setattr(model, ATTRIBUTE, {task: dict(state) for task, state in heads.items()})


@contextlib.contextmanager
def task_head(model, task: str) -> Iterator[None]:
    """Use ``task``'s head (when the model carries one) inside the block, then restore the original."""
    import torch

    heads = getattr(model, ATTRIBUTE, None) or {}
    state = heads.get(task)
    if not state:
        yield
        return
    saved = {}
    try:
        for name, tensor in state.items():
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name) if module_name else model
            saved[name] = (module, attr, getattr(module, attr))
            old = getattr(module, attr)
            value = tensor.to(device=old.device, dtype=old.dtype)
            if isinstance(old, torch.nn.Parameter):
                setattr(module, attr, torch.nn.Parameter(value, requires_grad=False))
            else:
                setattr(module, attr, value)
        yield
    finally:
        for module, attr, old in saved.values():
            setattr(module, attr, old)
