"""Finding the layers methods act on: linear layers, target modules by name, execution order.

A *linear layer* is an ``nn.Linear`` (weight ``(out, in)``) or a Hugging Face ``Conv1D``
(GPT-2; weight ``(in, out)``); :func:`weight_out_in` hides the difference.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from fusion_core import InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch


def is_linear(module: Any) -> bool:
    """``nn.Linear``, or a ``Conv1D`` (a 2-D ``weight`` stored ``(in, out)`` and an ``nf`` attribute)."""
    import torch

    if isinstance(module, torch.nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2 and hasattr(module, "nf")


def transposed(module: Any) -> bool:
    """Whether the layer stores its weight as ``(in, out)`` (``Conv1D``)."""
    import torch

    return not isinstance(module, torch.nn.Linear)


def weight_out_in(module: Any, weight: "torch.Tensor | None" = None) -> "torch.Tensor":
    """The layer's weight (or ``weight``, in the layer's layout) as ``(out, in)``."""
    w = module.weight if weight is None else weight
    return w.t() if transposed(module) else w


def linear_layers(model: Any) -> dict[str, Any]:
    """Every linear layer of ``model`` by module name (``""``: the model itself), in registration order."""
    return {name: m for name, m in model.named_modules() if is_linear(m)}


def key(module_name: str, param_name: str) -> str:
    """The state-dict name of parameter ``param_name`` of submodule ``module_name`` (``""`` = the root)."""
    return f"{module_name}.{param_name}" if module_name else param_name


def _shown(names: Sequence[str]) -> str:
    names = list(names)
    return ", ".join(names[:25]) + (f", ... ({len(names)} in all)" if len(names) > 25 else "")


def select_modules(model: Any, patterns: Sequence[str] | None, *, method: str, field: str,
                   linear_only: bool = True, exclude: Sequence[str] = ()) -> dict[str, Any]:
    """Modules whose names match one of the glob ``patterns`` (``None``: every linear layer), minus ``exclude``.

    A pattern that matches nothing is an :class:`InputError` listing the available names.
    """
    candidates = linear_layers(model) if linear_only or patterns is None else {n: m for n, m in model.named_modules() if n}
    kind = "linear layers" if linear_only or patterns is None else "modules"
    if not candidates:
        raise InputError(f"method {method!r}: the model has no {kind} (nn.Linear or Conv1D) to work on")
    if patterns is None:
        chosen = dict(candidates)
    else:
        chosen = {}
        for pattern in patterns:
            hits = {n: m for n, m in candidates.items() if fnmatch.fnmatchcase(n, pattern)}
            if not hits:
                raise InputError(
                    f"method {method!r}: {field} pattern {pattern!r} matches none of the model's {kind}; "
                    f"available: {_shown(candidates)}"
                )
            chosen.update(hits)
    for pattern in exclude:
        chosen = {n: m for n, m in chosen.items() if not fnmatch.fnmatchcase(n, pattern)}
    nested = [n for n in chosen if any(n != o and (o == "" or n.startswith(o + ".")) for o in chosen)]
    if nested:
        raise InputError(f"method {method!r}: {field} selects module {nested[0]!r} and a module containing it; select one of them")
    return dict(sorted(chosen.items(), key=lambda kv: list(candidates).index(kv[0])))


def execution_order(model: Any, run: Callable[[], Any]) -> list[str]:
    """Names of the modules that own parameters directly, in the order ``run()`` first calls them."""
    order: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            def hook(mod, args, name=name):
                if name not in order:
                    order.append(name)
            handles.append(module.register_forward_pre_hook(hook))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return order


def set_submodule(model: Any, name: str, new: Any) -> Any:
    """Replace the submodule ``name`` of ``model`` by ``new``; returns the model (``new`` itself when ``name`` is the root)."""
    if not name:
        return new
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    return model
