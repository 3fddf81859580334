"""What the methods of this plugin share: the base class, task vectors, entropy, the adaptation loop.

Torch is imported inside the functions (this module is imported at registration).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from fusion_core import FuseError, InputError, Method

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fusion_core import ModelPool, RunContext, TaskPool


class AdaptiveMethod(Method):
    """A method of this plugin: checks its inputs before anything is loaded."""

    min_models: ClassVar[int] = 1

    def check_inputs(self, n_models: int, has_base: bool) -> None:
        """:meth:`Method.check_inputs` (model counts), with this plugin's wording for a missing base."""
        if self.capabilities.needs_base and not has_base:
            raise InputError(f"method {self.name!r} needs a base (pretrained) model; give the model pool a base")
        super().check_inputs(n_models, has_base)


# --------------------------------------------------------------------------- report notes


def note(ctx: "RunContext", method: str, **info: Any) -> None:
    """Record facts about the run in ``ctx.extras[method]`` (for the report)."""
    ctx.extras.setdefault(method, {}).update(info)


def mark_transductive(ctx: "RunContext", method: str, tasks: Sequence[str]) -> None:
    """Record that ``method`` adapted on the unlabelled test inputs of ``tasks``."""
    ctx.extras["transductive"] = {"method": method, "split": "test (inputs only, no labels)", "tasks": list(tasks)}


# --------------------------------------------------------------------------- tensors


def to_device(inputs: Any, device: str) -> Any:
    """``inputs`` with every tensor (in mappings, lists, tuples) moved to ``device``."""
    import torch

    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return {k: to_device(v, device) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(to_device(v, device) for v in inputs)
    return inputs


def slice_inputs(inputs: Any, start: int, stop: int) -> Any:
    """Examples ``start:stop`` of a batch (tensors in mappings, lists and tuples are sliced on dim 0)."""
    import torch

    if isinstance(inputs, torch.Tensor):
        return inputs[start:stop]
    if isinstance(inputs, Mapping):
        return {k: slice_inputs(v, start, stop) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(slice_inputs(v, start, stop) for v in inputs)
    return inputs


def batch_size(inputs: Any) -> int:
    """The leading dimension of the first tensor in ``inputs``."""
    import torch

    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0])
    values = inputs.values() if isinstance(inputs, Mapping) else inputs if isinstance(inputs, (list, tuple)) else []
    for value in values:
        try:
            return batch_size(value)
        except InputError:
            continue
    raise InputError(f"cannot find a batch tensor in inputs of type {type(inputs).__name__}")


def float_params(model: Any) -> dict[str, "torch.Tensor"]:
    """The model's floating-point parameters by name, detached (shared storage, no copy)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.is_floating_point()}


def prepare(model: Any, device: str) -> Any:
    """Put ``model`` on ``device`` in eval mode with no parameter requiring gradients.

    Embeddings built with ``sparse=True`` get dense gradients (the same values): gradients through
    merged tensors (``θ₀ + Σ λ·τ``) cannot flow back from a sparse one.
    """
    import torch

    model = model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and module.sparse:
            module.sparse = False
    return model


def load_params(pool: "ModelPool", name: str, reference: Mapping[str, "torch.Tensor"], *, method: str, device: str) -> dict[str, "torch.Tensor"]:
    """Model ``name``'s tensors named as in ``reference`` (same shapes, ``reference``'s dtypes, on ``device``).

    The model is loaded, read and dropped; a missing tensor or a different shape is an InputError.
    """
    model = pool.load_model(name)
    params = dict(model.named_parameters())
    missing = [k for k in reference if k not in params]
    if missing:
        raise InputError(
            f"method {method!r}: model {name!r} lacks parameter(s) of the base: {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}; all models must share the base's architecture"
        )
    out = {}
    for key, ref in reference.items():
        value = params[key].detach().to(device=device, dtype=ref.dtype)
        if value.shape != ref.shape:
            raise InputError(f"method {method!r}: {key!r} of model {name!r} has shape {list(value.shape)}, the base's {list(ref.shape)}")
        out[key] = value
    del model, params
    return out


def task_vector(pool: "ModelPool", name: str, base: Mapping[str, "torch.Tensor"], *, method: str, device: str) -> dict[str, "torch.Tensor"]:
    """``θ_name − θ_base`` for every tensor of ``base`` (model ``name`` is loaded, read and dropped)."""
    return {key: value - base[key] for key, value in load_params(pool, name, base, method=method, device=device).items()}


def tied_aliases(model: Any) -> dict[str, str]:
    """Second names of tied parameters → the first name (the one ``named_parameters()`` gives)."""
    first: dict[int, str] = {}
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out[name] = first[id(p)]
        else:
            first[id(p)] = name
    return out


def with_aliases(model: Any, state: Mapping[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    """``state`` with every tied parameter's second name given the value of its first name."""
    out = dict(state)
    for alias, source in tied_aliases(model).items():
        if source in out:
            out[alias] = out[source]
    return out


def state_with(model: Any, params: Mapping[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    """``model``'s state dict (on CPU, detached, own storage) with the tensors of ``params`` substituted.

    Tied parameters get the value of their first name.
    """
    params = with_aliases(model, params)
    out = {}
    for key, value in model.state_dict().items():
        chosen = params.get(key, value)
        out[key] = chosen.detach().to("cpu").clone()
    return out


def entropy(logits: "torch.Tensor", eps: float = 0.0) -> "torch.Tensor":
    """Mean Shannon entropy of the softmax of ``logits`` (the last dimension is the classes).

    ``eps > 0``: FusionBench's ``entropy_loss``, ``−Σ p·log(p + eps)`` (``eps = 1e-8`` there);
    ``eps = 0``: the exact entropy through ``log_softmax``.
    """
    import torch

    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    if eps > 0:
        p = logits.softmax(dim=-1)
        return -(p * torch.log(p + eps)).sum(dim=-1).mean()
    log_p = logits.log_softmax(dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1).mean()


# --------------------------------------------------------------------------- progress

ESTIMATE_AFTER = 3
"""Steps timed before a loop prints its estimate of the whole (fusion_core.progress.ESTIMATE_AFTER)."""


def progress(ctx: "RunContext", items: Iterable, description: str, total: int | None = None, *, unit: str = "step",
             out: Any = None, clock: Callable[[], float] | None = None) -> Iterator:
    """Iterate ``items``, reporting progress when ``ctx.show_progress``.

    On a terminal: the run context's progress bar.  Otherwise (a log, a pipe): plain lines on
    stderr, ``<description>: <done>/<total> <unit>s, <rate>/s, ETA <time>`` at most every 10 s and at
    the end.  Either way, after the first :data:`ESTIMATE_AFTER` items of a loop with a known total
    (fewer when it has fewer), one line estimates the whole loop's duration (``fusion_core.progress``).
    """
    import sys

    from fusion_core import Progress

    if not getattr(ctx, "show_progress", False):
        yield from items
        return
    out = sys.stderr if out is None else out
    report = Progress(description, total, unit=unit, out=out, clock=clock)
    source = items if report.lines else ctx.track(items, description, total=total)
    for item in source:
        yield item
        report.advance()


# --------------------------------------------------------------------------- test-time adaptation


class AdaptationTask:
    """One task of a test-time adaptation: its head and an endless stream of unlabelled test inputs."""

    def __init__(self, name: str, head: Callable | None, batches: Iterator, device: str) -> None:
        self.name, self.head, self._batches, self.device = name, head, batches, device
        self._pending: list = []

    def next_inputs(self) -> Any:
        batch = self._pending.pop() if self._pending else next(self._batches)
        return to_device(batch, self.device)

    def peek_inputs(self) -> Any:
        """The next batch, left in place for :meth:`next_inputs` (probing a model does not consume data)."""
        if not self._pending:
            self._pending.append(next(self._batches))
        return to_device(self._pending[-1], self.device)


CACHE_BYTES = 512 * 2**20
"""Encoded test batches of one task kept after the first pass (re-encoded each pass beyond this)."""


def tensor_bytes(value: Any) -> int:
    """Bytes of every tensor in ``value`` (mappings, lists, tuples)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, Mapping):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def cached_cycle(batches: Iterable, budget: int = CACHE_BYTES) -> Iterator:
    """Repeat ``batches`` forever, encoding (tokenising, image processing) them once when they fit in ``budget`` bytes.

    The first pass keeps what it gives; when the whole pass fits, later passes replay it, else they
    iterate ``batches`` again (an empty pass raises, as :func:`fusion_core.adapters.cycle`).
    """
    from fusion_core.adapters import cycle

    kept: list = []
    size = 0
    for batch in batches:
        if kept is not None:
            size += tensor_bytes(batch)
            if size <= budget:
                kept.append(batch)
            else:
                kept = None
        yield batch
    if kept:
        yield from cycle(kept)
    else:
        yield from cycle(batches)


def split_batch(batch: Any, size: int) -> list:
    """``batch`` (a tensor, or mappings/lists/tuples of tensors sharing their first dimension) cut along
    its first dimension into pieces of at most ``size`` rows (a batch of ``size`` rows or fewer: itself)."""
    import torch

    rows = batch_size(batch)
    if rows <= size:
        return [batch]

    def piece(value: Any, start: int) -> Any:
        if isinstance(value, torch.Tensor):
            return value[start : start + size] if value.dim() and value.shape[0] == rows else value
        if isinstance(value, Mapping):
            return {k: piece(v, start) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(piece(v, start) for v in value)
        return value

    return [piece(batch, start) for start in range(0, rows, size)]


class Rebatched:
    """Re-iterable: ``batches`` with each one cut into pieces of at most ``size`` rows."""

    def __init__(self, batches: Iterable, size: int) -> None:
        self.batches, self.size = batches, size

    def __iter__(self) -> Iterator:
        for batch in self.batches:
            yield from split_batch(batch, self.size)


def rebatched(batches: Iterable, size: int | None) -> Iterable:
    """``batches`` with each one cut into pieces of at most ``size`` rows (``None``: as they are)."""
    return batches if size is None else Rebatched(batches, size)


def adaptation_tasks(pool: "ModelPool", taskpool: "TaskPool | None", *, method: str, device: str,
                     batch_size: int | None = None) -> list[AdaptationTask]:
    """One :class:`AdaptationTask` per fine-tuned model (its name is the task), or a clear InputError.

    ``batch_size``: each step reads at most this many test inputs per task (the task pool's batches
    are cut to it; ``None``: the task pool's batches as they are)."""
    from fusion_core.adapters import get_classifier, require_unlabelled

    tasks = []
    for name in pool.model_names:
        batches = require_unlabelled(taskpool, name, method=method)
        tasks.append(AdaptationTask(name, get_classifier(taskpool, name), cached_cycle(rebatched(batches, batch_size)), device))
    return tasks


def check_finite(loss: "torch.Tensor", step: int, *, method: str) -> float:
    """Stop the adaptation on a NaN/Inf loss: no output is kept.  Returns the loss's value (one device sync)."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FuseError(
            f"method {method!r}: the adaptation loss became {value} at step {step}; stopped, and no model was output "
            "(lower lr, or check the inputs and heads for NaN/Inf)"
        )
    return value


def adapt(params: Iterable["torch.Tensor"], loss_fn: Callable[[int], "torch.Tensor"], *, steps: int, lr: float, method: str,
          ctx: "RunContext", after_step: Callable[[], None] | None = None) -> list[float]:
    """Minimise ``loss_fn(step)`` over ``params`` with Adam for ``steps`` steps; returns the loss history.

    A non-finite loss (or a non-finite gradient) stops the run with a :class:`FuseError` naming the step.
    The median wall time of a step (the first left out when there are others: it warms caches) is
    noted as ``seconds_per_step`` (what ``fuse show`` durations are measured from).
    """
    import statistics
    import time

    import torch

    params = list(params)
    optimizer = torch.optim.Adam(params, lr=lr)
    history: list[float] = []
    durations: list[float] = []
    for step in progress(ctx, range(steps), f"adapting ({method})", total=steps):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(step)
        value = check_finite(loss, step, method=method)
        loss.backward()
        finite = [torch.isfinite(p.grad).all() for p in params if p.grad is not None]
        if finite and not bool(torch.stack(finite).all()):  # one device sync for all gradients
            raise FuseError(f"method {method!r}: a gradient became NaN/Inf at step {step}; stopped, and no model was output (lower lr)")
        optimizer.step()
        if after_step is not None:
            after_step()
        history.append(value)
        durations.append(time.perf_counter() - started)
    if durations:
        note(ctx, method, seconds_per_step=statistics.median(durations[1:] or durations))
    return history


def summarize_history(history: Sequence[float]) -> dict[str, Any]:
    """First, last and best loss of an adaptation, for the report."""
    if not history:
        return {"steps": 0}
    return {"steps": len(history), "loss_first": history[0], "loss_last": history[-1], "loss_min": min(history)}
