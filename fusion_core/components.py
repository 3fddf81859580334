"""The three kinds of component (methods, model pools, task pools) and what they share.

A component is a class with a few class attributes that describe it, so that
``fuse list`` and ``fuse show`` can render it and configs can be validated
against it *before* anything heavy is imported:

- ``name``: the registry name used in configs (``method=ties``).
- ``summary``: one line.
- ``Config``: a frozen attrs class; each field has a type, a default and
  ``metadata={"help": ...}`` (use :func:`fusion_core.config.option`).
- ``reference_url``: the paper or documentation (required of methods unless ``from_paper = False``).
- ``fusionbench_config``: the FusionBench method config whose defaults the method's are, if any.
- ``capabilities``: what the component needs and gives (:class:`Capabilities`).

Modules that define components must not import torch/transformers/datasets at
module level: import them inside the methods that need them.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

if TYPE_CHECKING:  # pragma: no cover
    from .run_context import RunContext

OUTPUT_KINDS = ("model", "models", "ensemble", "state_dict", "per_task")


@attrs.frozen
class Capabilities:
    """What a component needs and what it gives; shown by ``fuse list``/``fuse show``."""

    needs_base: bool = False
    """The method needs the pretrained (base) model of the pool."""
    needs_data: bool = False
    """The method reads data batches (train split unless ``transductive``)."""
    needs_labels: bool = False
    """The data must carry labels (Fisher, RegMean)."""
    trains: bool = False
    """The method runs gradient steps."""
    transductive: bool = False
    """The method adapts on unlabelled *test* inputs (AdaMerging, WEMoE)."""
    random: bool = False
    """The output depends on the seed (DARE, DELLA)."""
    output: str = attrs.field(default="model", validator=attrs.validators.in_(OUTPUT_KINDS))
    """``model`` (one merged model), ``models`` (several named), ``ensemble``, ``state_dict``, or ``per_task``
    (a :class:`~fusion_core.adapters.PerTaskModels`: each task scored with its own model, e.g. EMR's modulators)."""

    def flags(self) -> list[str]:
        """Short labels of the capabilities that are set, for tables."""
        out = [f.name.replace("_", "-") for f in attrs.fields(Capabilities) if f.type in (bool, "bool") and getattr(self, f.name)]
        if self.output != "model":
            out.append(f"output={self.output}")
        return out


@attrs.frozen
class EmptyConfig:
    """A component with no fields."""


class Component(abc.ABC):  # noqa: B024 - the kinds below declare the abstract methods
    """Base of every registered component.  Subclasses set the class attributes."""

    kind: ClassVar[str] = "component"
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Config: ClassVar[type] = EmptyConfig
    reference_url: ClassVar[str | None] = None
    from_paper: ClassVar[bool] = True
    """False for a component that comes from no paper or document (``dummy``): it then needs no ``reference_url``."""
    fusionbench_config: ClassVar[str | None] = None
    """The FusionBench 0.2.33 config whose settings this method's defaults are (a path under
    ``fusion_bench_config/method/``, e.g. ``ties_merging.yaml``); ``fuse show`` prints it and the parity
    suite (``tests/parity/test_defaults.py``) checks every mapped field against it."""
    capabilities: ClassVar[Capabilities] = Capabilities()

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.Config()

    def __repr__(self) -> str:
        return f"<{self.kind} {self.name} {self.config!r}>"


class Method(Component):
    """A fusion method: turns the models of a pool into one or more models.

    Override :meth:`run`.  Tensor-by-tensor methods should instead subclass
    :class:`fusion_core.engine.KernelMethod` and write only the kernel.
    """

    kind = "method"
    min_models: ClassVar[int] = 0
    """Fewest fine-tuned models the method accepts (checked by :meth:`check_inputs`)."""
    max_models: ClassVar[int | None] = None
    """Most fine-tuned models the method accepts (``None``: no limit)."""

    def check_inputs(self, n_models: int, has_base: bool) -> None:
        """Raise :class:`~fusion_core.errors.InputError` when a pool of ``n_models`` fine-tuned models
        (with or without a base) does not fit this method.

        Called before anything is loaded, by the run program (``fuse run`` and ``--dry-run``
        alike) and by the merge engine.  The default checks ``capabilities.needs_base``,
        ``min_models`` and ``max_models``; override to add checks (call ``super()``).
        """
        from .errors import InputError

        if self.capabilities.needs_base and not has_base:
            raise InputError(f"method {self.name!r} needs a base model; give one with --base (or `base:` in the model pool)")
        if n_models < self.min_models:
            raise InputError(f"method {self.name!r} needs at least {self.min_models} fine-tuned model(s), got {n_models}")
        if self.max_models is not None and n_models > self.max_models:
            raise InputError(f"method {self.name!r} takes at most {self.max_models} fine-tuned model(s), got {n_models}")

    @abc.abstractmethod
    def run(self, pool: "ModelPool", ctx: "RunContext") -> Any:
        """Fuse the pool's models.

        :returns: an ``nn.Module``, a state dict (``Mapping[str, Tensor]``, turned into a
            module by :meth:`ModelPool.model_from_state_dict`), or a ``dict`` of such,
            keyed by a label, when ``capabilities.output == "models"`` (a sweep), or a
            :class:`~fusion_core.adapters.PerTaskModels` when it is ``"per_task"``.
        """


class ModelPool(Component):
    """A set of models to fuse: a base (pretrained) model and named fine-tuned models.

    Model names conventionally equal task names of the matching task pool, so
    that each fine-tuned model can be scored on its own task ("individual").
    Loading is lazy: nothing heavy happens before :meth:`load_model`/:meth:`reader`.
    """

    kind = "model-pool"

    @property
    @abc.abstractmethod
    def model_names(self) -> list[str]:
        """Names of the fine-tuned models (the base excluded)."""

    @property
    def has_base(self) -> bool:
        """Whether the pool has a base (pretrained) model."""
        return False

    def validate(self) -> None:
        """Check everything that can be checked cheaply (files exist, names); load nothing heavy."""

    def materialize(self, ctx: "RunContext | None" = None) -> None:
        """Build or fetch what the pool needs before the method runs (timed as the run's ``prepare`` phase).

        Show progress only when ``ctx.show_progress`` (the run's ``progress`` setting) is on.
        """

    def describe(self) -> dict:
        """Inputs for the report (paths, revisions...)."""
        return {"models": self.model_names, "has_base": self.has_base}

    @abc.abstractmethod
    def load_model(self, name: str | None = None):
        """Return the ``nn.Module`` of model ``name`` (``None`` = the base)."""

    def reader(self, name: str | None = None):
        """Return a :class:`fusion_core.engine.TensorReader` over model ``name``'s mergeable tensors
        (``None`` = the base).  The default wraps :meth:`load_model`'s state dict."""
        from .engine.readers import StateDictReader

        model = self.load_model(name)
        return StateDictReader(model.state_dict(), label=name or "base")

    def model_from_state_dict(self, state_dict: Mapping[str, Any]):
        """Build a module of the pool's architecture holding ``state_dict`` (for evaluation)."""
        model = self.load_model(None) if self.has_base else self.load_model(self.model_names[0])
        if isinstance(model, Mapping):  # a pool of plain state dicts
            return dict(state_dict)
        missing, unexpected = model.load_state_dict(dict(state_dict), strict=False)
        if unexpected:
            from .errors import InputError

            raise InputError(f"merged state dict has keys the model lacks: {', '.join(unexpected[:5])}")
        return model

    def save_model(self, model: Any, path: str, *, recipe: Mapping[str, Any]) -> None:
        """Write ``model`` to the folder ``path`` (safetensors), recording ``recipe``."""
        from .engine.writer import save_state_dict_folder

        state = model if isinstance(model, Mapping) else model.state_dict()
        save_state_dict_folder(state, path, recipe=recipe)

    def data(self, name: str, split: str):
        """Data for data-driven methods: an iterable of batches of model ``name``'s task, or ``None``."""
        return None

    def forward(self, model: Any, inputs: Any) -> Any:
        """Run ``model`` on one batch's inputs (see :mod:`fusion_core.adapters`); override for other calls."""
        return forward(model, inputs)


class TaskPool(Component):
    """A set of evaluation tasks: scores a model on each task."""

    kind = "task-pool"

    @property
    @abc.abstractmethod
    def task_names(self) -> list[str]:
        """Names of the tasks."""

    def validate(self) -> None:
        """Check what can be checked cheaply; load nothing heavy."""

    def materialize(self, ctx: "RunContext | None" = None) -> None:
        """Build or fetch what the task pool needs before evaluating (timed as the run's ``prepare`` phase)."""

    def describe(self) -> dict:
        return {"tasks": self.task_names}

    @abc.abstractmethod
    def evaluate(self, model: Any, *, tasks: list[str] | None = None, ctx: "RunContext | None" = None) -> dict[str, dict[str, float]]:
        """Score ``model`` on ``tasks`` (all when ``None``): ``{task: {metric: value}}``."""

    def check_pool(self, pool: ModelPool) -> None:
        """Refuse, before anything is loaded, a model pool whose models this task pool cannot score.

        Called by ``fuse run`` (and ``--dry-run``) with the run's model pool.  Raise a
        :class:`~fusion_core.errors.ConfigError` naming the mismatch and the override that fixes it.
        """

    def primary_metric(self) -> str:
        """The metric averaged in summary tables."""
        return "accuracy"

    def classifier(self, task: str):
        """The fixed head mapping a model's output to ``task``'s logits, or ``None`` (the output is the logits)."""
        return None

    def unlabelled_batches(self, task: str):
        """Unlabelled test inputs of ``task`` for test-time adaptation (an iterable of inputs), or ``None``."""
        return None


def forward(model: Any, inputs: Any) -> Any:
    """Run ``model`` on one batch: ``model(**inputs)`` for a mapping, else ``model(inputs)``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


KINDS = {"method": Method, "model-pool": ModelPool, "task-pool": TaskPool}
