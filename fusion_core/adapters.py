"""The model-adapter protocol: how data-driven methods run models and read data, on any architecture.

Data-driven, adaptive and mixture-of-experts methods (Fisher, RegMean, AdaMerging,
WEMoE, ensembles...) are written once against this small protocol and run on every
pool that implements it.  What a pool provides:

Model pool (:class:`~fusion_core.components.ModelPool`)

- ``load_model(name)``: the base (``None``) or a fine-tuned ``nn.Module``, loaded lazily.
- ``data(name, split)``: labelled batches of model ``name``'s task for ``split``
  (``"train"``, ``"val"``...): an iterable of ``(inputs, labels)`` pairs, or ``None``
  when the pool has no such data.  Re-iterable (a list, a DataLoader) is best; a
  one-shot iterator is cached by :func:`cycle` the first time through.
- ``forward(model, inputs)``: run a model on one batch's inputs; the default is
  :func:`forward` (``model(**inputs)`` for a mapping, else ``model(inputs)``).  Pools
  whose models need a different call (``model(pixel_values=x).pooler_output``) override it.

Task pool (:class:`~fusion_core.components.TaskPool`)

- ``classifier(task)``: the task's head, a callable mapping the model's output to
  logits ``(batch, classes)``, or ``None`` when the model's output already is the logits
  (:func:`output_tensor` reads ``.logits`` or the first element of a tuple).
  Heads are fixed: methods never train or merge them.
- ``unlabelled_batches(task)``: the task's *test* inputs without labels, for
  test-time adaptation (AdaMerging, WEMoE): an iterable of ``inputs``.  Methods that
  read it declare ``capabilities.transductive = True`` and record it in the report.
- ``evaluate(model, tasks=..., ctx=...)``: as everywhere.  To score an output of kind
  ``ensemble`` correctly, a task pool computes logits with :func:`logits` (which lets an
  ensemble apply the head to each member) instead of ``head(model(x))``.  An output of kind
  ``per_task`` (:class:`PerTaskModels`) needs nothing of the task pool: the run program asks
  it for each task's own model and scores that model on that task only.

Model names are task names: fine-tuned model ``name`` was trained on task ``name``.

Functional forward passes.  Methods that train merge coefficients never build a
merged module: they call :func:`functional_forward` with a dict of merged tensors
(``torch.func.functional_call``), so memory stays near base + N task vectors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from .components import ModelPool, forward
from .errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .components import TaskPool


# --------------------------------------------------------------------------- running a model




def pool_forward(pool: "ModelPool | None") -> Callable[[Any, Any], Any]:
    """The pool's ``forward(model, inputs)`` (or :func:`forward` without a pool or override)."""
    fn = getattr(pool, "forward", None) if pool is not None else None
    return fn if callable(fn) else forward


def _has_custom_forward(pool: "ModelPool | None") -> bool:
    if pool is None:
        return False
    method = getattr(type(pool), "forward", None)
    return method is not None and method is not ModelPool.forward


def _pool_call_module(pool: "ModelPool", model: Any):
    """A throwaway wrapper module whose ``forward(inputs)`` is ``pool.forward(model, inputs)``."""
    import torch

    class PoolCall(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, inputs: Any) -> Any:
            return pool.forward(self.model, inputs)

    return PoolCall()


def functional_forward(model: Any, params: Mapping[str, "torch.Tensor"], inputs: Any, pool: "ModelPool | None" = None) -> Any:
    """Run ``model`` on ``inputs`` with the tensors ``params`` (by state-dict name) in place of its own.

    Nothing is copied: the module keeps its own tensors, and the call sees ``params``
    (which may carry autograd history, e.g. ``base + λ·τ``).  Names not in ``params``
    use the module's own tensors.  With a pool that overrides ``forward``, that
    override runs under the replaced tensors.
    """
    from torch.func import functional_call

    if _has_custom_forward(pool):
        wrapper = _pool_call_module(pool, model)  # type: ignore[arg-type]
        renamed = {f"model.{name}": tensor for name, tensor in params.items()}
        return functional_call(wrapper, renamed, args=(inputs,), tie_weights=True, strict=False)

    if isinstance(inputs, Mapping):
        return functional_call(model, dict(params), args=(), kwargs=dict(inputs), tie_weights=True, strict=False)
    return functional_call(model, dict(params), args=(inputs,), tie_weights=True, strict=False)


def output_tensor(output: Any) -> "torch.Tensor":
    """The tensor of a model's output: itself, its ``.logits``, a mapping's ``"logits"``, or a tuple's first item."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    value = getattr(output, "logits", None)
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise InputError(
        f"cannot read logits from a model output of type {type(output).__name__}; "
        "give the task a classifier (TaskPool.classifier) or a pool forward() that returns a tensor"
    )


def apply_classifier(classifier: Callable | None, output: Any) -> "torch.Tensor":
    """Logits from a model output: ``classifier(output)``, or the output's own tensor without a classifier."""
    if classifier is None:
        return output_tensor(output)
    return output_tensor(classifier(output))


def logits(model: Any, inputs: Any, classifier: Callable | None = None, pool: "ModelPool | None" = None) -> "torch.Tensor":
    """The logits of ``model`` on one batch, through the task's ``classifier``.

    Task pools should score models with this function: a model that defines
    ``ensemble_logits(inputs, classifier)`` (an ensemble) applies the head to each
    member and combines the members' logits itself.
    """
    combine = getattr(model, "ensemble_logits", None)
    if callable(combine):
        return combine(inputs, classifier)
    return apply_classifier(classifier, pool_forward(pool)(model, inputs))


# --------------------------------------------------------------------------- one model per task


class PerTaskModels:
    """The output of a method of kind ``per_task``: each task is scored with its own model.

    ``shared`` is the model the run keeps (saved with ``save_model``: EMR's unified model, a
    merged model before representation surgery); ``build(task)`` returns task ``task``'s own
    model (a module or a state dict), called once per evaluated task, when its turn comes, so at
    most one per-task model is alive at a time.  A task outside ``tasks`` is scored with
    ``shared``.  The run program evaluates such an output task by task
    (``taskpool.evaluate(model_for(task), tasks=[task])``), so every task pool honours it.
    """

    def __init__(self, shared: Any, build: Callable[[str], Any], tasks: Iterable[str]) -> None:
        self.shared = shared
        self._build = build
        self.tasks = list(tasks)

    def model_for(self, task: str) -> Any:
        """Task ``task``'s own model (``shared`` for a task without one)."""
        return self._build(task) if task in self.tasks else self.shared


def inner_method(wrapper: str, name: str, fields: Mapping[str, Any] | None = None) -> Any:
    """The method ``name`` (with config ``fields``) that method ``wrapper`` runs first (SVC, representation surgery).

    Built from the registry of the installed plugins; it must output one model.  Unknown names, the
    wrapper itself and methods of other output kinds are one-line ``ConfigError`` messages.
    """
    from .config import make_config
    from .errors import ConfigError, did_you_mean
    from .plugins import get_plugin_manager
    from .registry import build_registry

    registry = build_registry(get_plugin_manager())
    choices = [n for n in registry.names("method") if n != wrapper]
    if name not in choices:
        raise ConfigError(f"method {wrapper}: base={name!r} is not a method it can run first{did_you_mean(str(name), choices)}; "
                          "`fuse list methods` shows them")
    cls = registry.get("method", name).cls
    method = cls(make_config(cls.Config, dict(fields or {}), where=f"method {wrapper} base_config ({name})"))
    if method.capabilities.output != "model":  # the instance's: a config may make several (a list of λ)
        raise ConfigError(f"method {wrapper}: base method {name!r} outputs {method.capabilities.output!r}, not one model; "
                          "choose a method that merges into one model")
    return method


# --------------------------------------------------------------------------- getting data and heads


def get_classifier(taskpool: "TaskPool | None", task: str) -> Callable | None:
    """The task pool's head for ``task`` (``None``: no task pool, or the model outputs logits)."""
    if taskpool is None:
        return None
    method = getattr(taskpool, "classifier", None)
    return method(task) if callable(method) else None


def require_data(pool: "ModelPool", name: str, split: str, *, method: str) -> Iterable:
    """``pool.data(name, split)``, or an :class:`InputError` naming the missing split."""
    data = pool.data(name, split) if callable(getattr(pool, "data", None)) else None
    if data is None:
        raise InputError(
            f"method {method!r} needs the {split!r} split of model {name!r}, but model pool "
            f"{getattr(pool, 'name', type(pool).__name__)!r} gives no {split!r} data for it "
            f"(ModelPool.data({name!r}, {split!r}) returned None); use a pool with data or a data-free method"
        )
    return data


def labelled(batches: Iterable, *, method: str, name: str, split: str) -> Iterator[tuple[Any, "torch.Tensor"]]:
    """Iterate ``(inputs, labels)`` batches, raising :class:`InputError` on a batch without labels."""
    import torch

    for batch in batches:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], torch.Tensor)):
            raise InputError(
                f"method {method!r} needs labelled batches, but the {split!r} data of model {name!r} "
                f"gives {_describe_batch(batch)} instead of (inputs, labels) pairs with a label tensor"
            )
        yield batch[0], batch[1]


def _describe_batch(batch: Any) -> str:
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} of {len(batch)} item(s) ({', '.join(type(b).__name__ for b in batch[:3])})"
    return f"a {type(batch).__name__}"


def require_unlabelled(taskpool: "TaskPool | None", task: str, *, method: str) -> Iterable:
    """``taskpool.unlabelled_batches(task)``, or an :class:`InputError` saying what is missing."""
    if taskpool is None:
        raise InputError(
            f"method {method!r} adapts on unlabelled test batches of each task, but the run has no task pool; "
            "add one (taskpool=...) whose unlabelled_batches(task) gives test inputs"
        )
    if task not in taskpool.task_names:
        from .errors import did_you_mean

        raise InputError(
            f"method {method!r} needs test batches of task {task!r} (a model of the pool), but task pool "
            f"{taskpool.name!r} has no such task{did_you_mean(task, taskpool.task_names)}"
        )
    getter = getattr(taskpool, "unlabelled_batches", None)
    data = getter(task) if callable(getter) else None
    if data is None:
        raise InputError(
            f"method {method!r} needs the unlabelled 'test' split of task {task!r}, but task pool "
            f"{taskpool.name!r} gives none (TaskPool.unlabelled_batches({task!r}) returned None)"
        )
    return data


def cycle(batches: Iterable) -> Iterator:
    """Repeat ``batches`` forever.  A one-shot iterator is cached on the first pass; an empty one raises."""
    if iter(batches) is batches:  # an iterator: remember what it gave
        cache: list = []
        for batch in batches:
            cache.append(batch)
            yield batch
        source: Iterable = cache
    else:
        source = batches
    while True:
        empty = True
        for batch in source:
            empty = False
            yield batch
        if empty:
            raise InputError("a data split gave no batches")


__all__ = [
    "PerTaskModels",
    "apply_classifier",
    "cycle",
    "forward",
    "functional_forward",
    "get_classifier",
    "inner_method",
    "labelled",
    "logits",
    "output_tensor",
    "pool_forward",
    "require_data",
    "require_unlabelled",
]
