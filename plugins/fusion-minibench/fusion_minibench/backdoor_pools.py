"""The pools of ``mini-backdoor``: the mini benchmark with backdoored experts, scored for clean accuracy and ASR.

``minibench-backdoor`` (model pool): as ``minibench``, built from a recipe with the fields of
:class:`~fusion_minibench.backdoor.BackdoorFields` (the experts of ``backdoor_tasks`` fine-tuned on
poisoned texts).  ``minibench-backdoor`` (task pool): as ``minibench``, and a
:class:`fusion_core.backdoor.TriggerableTaskPool`: every task's test texts with the trigger are
the ``test_triggered`` split, so ``evaluate`` reports ``accuracy`` (clean) and ``asr`` (attack
success rate: triggered test texts of non-target classes classified as ``target_class``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from fusion_core import ConfigError
from fusion_core.backdoor import BackdoorTaskPool

from .backdoor import TRIGGERED_SPLIT, BackdoorFields, check_backdoor_tasks
from .pools import EVAL_BATCH, REFERENCE, MiniBenchConfig, MiniBenchModelPool, MiniBenchTaskPool, MiniBenchTaskPoolConfig
from .recipe import Recipe

if TYPE_CHECKING:  # pragma: no cover
    from .batching import Batches


@attrs.frozen
class BackdoorRecipe(Recipe, BackdoorFields):
    """The mini recipe plus the backdoor fields (its hash, hence its cache folder, differs from mini's)."""


@attrs.frozen
class MiniBackdoorConfig(MiniBenchConfig, BackdoorFields):
    """The recipe fields, the backdoor fields and where to cache the build."""


@attrs.frozen
class MiniBackdoorTaskPoolConfig(MiniBenchTaskPoolConfig, BackdoorFields):
    """The recipe fields, the backdoor fields and the split that is scored (ASR: always the triggered test split)."""


def backdoor_recipe(config: Any) -> BackdoorRecipe:
    """The :class:`BackdoorRecipe` carried by a pool config."""
    return BackdoorRecipe(**{f.name: getattr(config, f.name) for f in attrs.fields(BackdoorRecipe)})


class _BackdoorShared:
    config: MiniBackdoorConfig

    @property
    def recipe(self) -> BackdoorRecipe:
        return backdoor_recipe(self.config)

    def validate(self) -> None:
        from . import data

        cfg = self.config
        check_backdoor_tasks(cfg)
        for task in cfg.tasks:
            classes = len(data.CLASS_PROMPTS[task])
            if cfg.target_class >= classes:
                raise ConfigError(f"target_class {cfg.target_class} is not a class of task {task!r} ({classes} classes: 0 to "
                                  f"{classes - 1}); choose a smaller target_class")
        super().validate()  # type: ignore[misc]


class MiniBackdoorModelPool(_BackdoorShared, MiniBenchModelPool):
    """The mini benchmark's encoders, some experts fine-tuned on poisoned texts."""

    name = "minibench-backdoor"
    summary = "the mini benchmark with backdoored experts (trigger word → target class in some tasks' training texts)"
    Config = MiniBackdoorConfig
    reference_url = REFERENCE


class MiniBackdoorTaskPool(_BackdoorShared, BackdoorTaskPool, MiniBenchTaskPool):
    """The mini benchmark's tasks, scored for clean accuracy and attack success rate (``asr``)."""

    name = "minibench-backdoor"
    summary = "the mini benchmark's tasks: clean accuracy and attack success rate (ASR) of a trigger word, per task"
    Config = MiniBackdoorTaskPoolConfig
    reference_url = REFERENCE

    def backdoor_target(self, task: str) -> int:
        return int(self.config.target_class)

    def triggered_batches(self, task: str) -> "Batches":
        from .batching import Batches

        ids, labels = self.built().split(task, TRIGGERED_SPLIT)
        return Batches(ids, labels, EVAL_BATCH)

    def check_pool(self, pool) -> None:
        if isinstance(pool, MiniBenchModelPool) and not isinstance(pool, MiniBackdoorModelPool):
            raise ConfigError("the minibench-backdoor task pool scores the backdoored build: use modelpool=minibench-backdoor "
                              "(or benchmark=mini-backdoor)")
        super().check_pool(pool)
