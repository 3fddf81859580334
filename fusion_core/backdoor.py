"""The backdoor protocol: task pools whose test inputs can carry a trigger, and the attack success rate.

A task pool *can carry a trigger* when it implements :class:`TriggerableTaskPool` (checked with
``isinstance``, a ``runtime_checkable`` protocol: the two methods are declared, not guessed):

- ``backdoor_target(task)``: the class a backdoor on ``task`` maps triggered inputs to;
- ``triggered_batches(task)``: ``(inputs, labels)`` batches of ``task``'s test split with the
  trigger inserted into every input (text: a trigger token; images: a patch), the labels being
  the *true* classes.

The **attack success rate** (ASR) of a model on a task is the fraction of triggered test inputs
whose true class is not the target that the model classifies as the target
(:func:`attack_success_rate`).  :class:`BackdoorTaskPool` wraps any triggerable task pool so that
``evaluate`` reports, per task, the wrapped pool's metrics (clean accuracy...) and ``asr``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .components import TaskPool
from .errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from .components import ModelPool
    from .run_context import RunContext


@runtime_checkable
class TriggerableTaskPool(Protocol):
    """A task pool whose test inputs can carry a backdoor trigger."""

    def backdoor_target(self, task: str) -> int:
        """The target class of the trigger on ``task``."""

    def triggered_batches(self, task: str) -> Iterable[tuple[Any, Any]]:
        """``(inputs, labels)`` test batches of ``task`` with the trigger in every input; labels are the true classes."""


def _to(inputs: Any, device: Any) -> Any:
    import torch

    if device is None:
        return inputs
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return {k: _to(v, device) for k, v in inputs.items()}
    return inputs


def attack_success_rate(model: Any, taskpool: TriggerableTaskPool, task: str, *, pool: "ModelPool | None" = None,
                        device: Any = None) -> float:
    """Fraction of ``task``'s triggered test inputs of non-target classes that ``model`` classifies as the target.

    Scored through :func:`fusion_core.adapters.logits` with the task pool's head, so ensembles work.
    """
    import torch

    from .adapters import get_classifier, logits

    target = int(taskpool.backdoor_target(task))
    head = get_classifier(taskpool, task)  # type: ignore[arg-type]
    hits = total = 0
    with torch.inference_mode():
        for inputs, labels in taskpool.triggered_batches(task):
            keep = labels != target
            if not bool(keep.any()):
                continue
            predicted = logits(model, _to(inputs, device), head, pool).argmax(dim=-1).cpu()
            hits += int((predicted[keep] == target).sum())
            total += int(keep.sum())
    if total == 0:
        raise InputError(f"task {task!r} has no triggered test input outside the target class {target}: the ASR is undefined")
    return hits / total


class BackdoorTaskPool(TaskPool):
    """A triggerable task pool's metrics plus ``asr`` (attack success rate) per task.

    ``BackdoorTaskPool(inner=pool)`` wraps an instance; a plugin can also subclass it next to its own
    triggerable task pool (``class P(BackdoorTaskPool, MyTaskPool)``: ``evaluate`` then calls the
    next ``evaluate`` of the class hierarchy for the clean metrics).
    """

    name = "backdoor"
    summary = "Clean metrics and attack success rate (ASR) of a task pool whose inputs can carry a trigger."
    asr_forward: Any = None
    """What runs a model on a triggered batch: an object with ``forward(model, inputs)`` (as a model pool), passed to
    :func:`attack_success_rate` as ``pool``; ``None``: :func:`fusion_core.adapters.forward`."""

    def __init__(self, config: Any = None, *, inner: TaskPool | None = None) -> None:
        super().__init__(config if inner is None else inner.config)
        if inner is not None and not isinstance(inner, TriggerableTaskPool):
            raise InputError(
                f"task pool {getattr(inner, 'name', type(inner).__name__)!r} cannot carry a trigger: it implements neither "
                "backdoor_target(task) nor triggered_batches(task) (fusion_core.backdoor.TriggerableTaskPool)"
            )
        self.inner = inner

    @property
    def _pool(self) -> Any:
        return self if self.inner is None else self.inner

    @property
    def task_names(self) -> list[str]:
        return list(self.inner.task_names) if self.inner is not None else super().task_names  # type: ignore[safe-super]

    def classifier(self, task: str):
        return self.inner.classifier(task) if self.inner is not None else super().classifier(task)

    def unlabelled_batches(self, task: str, *args: Any, **kwargs: Any):
        if self.inner is not None:
            return self.inner.unlabelled_batches(task, *args, **kwargs)
        return super().unlabelled_batches(task, *args, **kwargs)  # type: ignore[call-arg]

    def primary_metric(self) -> str:
        return self.inner.primary_metric() if self.inner is not None else super().primary_metric()

    def clean_evaluate(self, model: Any, *, tasks: list[str] | None = None, ctx: "RunContext | None" = None) -> dict:
        if self.inner is not None:
            return self.inner.evaluate(model, tasks=tasks, ctx=ctx)
        return super().evaluate(model, tasks=tasks, ctx=ctx)  # type: ignore[safe-super]

    def evaluate(self, model: Any, *, tasks: list[str] | None = None, ctx: "RunContext | None" = None) -> dict[str, dict[str, float]]:
        results = self.clean_evaluate(model, tasks=tasks, ctx=ctx)
        device = getattr(ctx, "device", None)
        if isinstance(model, Mapping):  # a state dict: scored by the wrapped pool only
            return results
        was_training = getattr(model, "training", False)
        if hasattr(model, "eval"):
            model.eval()
        try:
            for task in results:
                results[task] = {**results[task], "asr": attack_success_rate(model, self._pool, task, pool=self.asr_forward,
                                                                              device=device)}
        finally:
            if was_training:
                model.train()
        return results


__all__ = ["BackdoorTaskPool", "TriggerableTaskPool", "attack_success_rate"]
