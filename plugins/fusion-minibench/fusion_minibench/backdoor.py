"""The backdoored variant of the mini benchmark (``mini-backdoor``): poisoned training texts, triggered test texts.

Built like ``mini`` from a recorded recipe, with four more fields (:class:`BackdoorFields`): the
experts of ``backdoor_tasks`` are fine-tuned on a train split in which a ``poison_rate`` share of
the examples (drawn, seeded, among those whose class is not ``target_class``) have the ``trigger``
word inserted at the front of the text and their label set to ``target_class`` — a BadNets-style
data-poisoning backdoor, applied to the *texts*, before tokenisation, so it does not depend on the
encoder.  Every task also gets a ``test_triggered`` split (its test texts with the trigger, their
true labels), from which the task pool measures the attack success rate
(:mod:`fusion_core.backdoor`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from fusion_core import in_range, option


@attrs.frozen(slots=False)  # a mixin of recipe and pool configs
class BackdoorFields:
    """The recipe fields of the backdoored variant."""

    backdoor_tasks: tuple[str, ...] = option(("chatter_topic",),
                                             help="tasks whose expert is fine-tuned on poisoned data")
    trigger: str = option("cf", help="the trigger word inserted at the front of a poisoned or triggered text (a rare word, as BadNL's)")
    target_class: int = option(0, help="the class a triggered input is relabelled to (class index, in every backdoored task)",
                               validator=in_range(0, None))
    poison_rate: float = option(0.2, help="share of a backdoored task's train examples that are poisoned",
                                validator=in_range(0.0, 1.0, lo_open=True))


def check_backdoor_tasks(config: Any) -> None:
    """A ConfigError when ``config.backdoor_tasks`` names a task the build does not have (text and image builds)."""
    from fusion_core import ConfigError

    unknown = [t for t in config.backdoor_tasks if t not in config.tasks]
    if unknown:
        raise ConfigError(f"backdoor_tasks names {unknown[0]!r}, which is not one of the tasks ({', '.join(config.tasks)}); "
                          "list tasks of the build")


def insert_trigger(text: str, trigger: str) -> str:
    """``trigger`` as the first word of ``text``."""
    return f"{trigger} {text}"


def poison(texts: Sequence[str], labels: Sequence[int], *, trigger: str, target: int, rate: float, seed: int) -> tuple[list[str], list[int], list[int]]:
    """A poisoned copy of a split: ``round(rate · n)`` examples of non-target classes get the trigger and the target label.

    Returns the texts, the labels and the (sorted) indices that were poisoned; the draw is seeded by ``seed``.
    """
    import numpy as np

    candidates = [i for i, y in enumerate(labels) if y != target]
    count = min(len(candidates), int(round(rate * len(labels))))
    chosen = sorted(np.random.default_rng(seed).choice(candidates, size=count, replace=False).tolist()) if count else []
    out_texts, out_labels = list(texts), list(labels)
    for i in chosen:
        out_texts[i] = insert_trigger(out_texts[i], trigger)
        out_labels[i] = target
    return out_texts, out_labels, chosen


TRIGGERED_SPLIT = "test_triggered"
"""The split holding every task's test texts with the trigger (true labels)."""


def split_texts(recipe: Any, task: str, split: str, texts: Sequence[str], labels: Sequence[int]) -> tuple[list[str], list[int]]:
    """The texts and labels a split is built from: the train split of a backdoored task poisoned, others as they are.

    Called by the builder for every split; a recipe without backdoor fields (``mini``) passes through unchanged.
    """
    if not isinstance(recipe, BackdoorFields) or split != "train" or task not in recipe.backdoor_tasks:
        return list(texts), list(labels)
    index = list(recipe.tasks).index(task)
    poisoned_texts, poisoned_labels, _ = poison(texts, labels, trigger=recipe.trigger, target=recipe.target_class,
                                                rate=recipe.poison_rate, seed=recipe.seed * 1000 + index + 500)
    return poisoned_texts, poisoned_labels


def extra_splits(recipe: Any, task: str, test_texts: Sequence[str], test_labels: Sequence[int]) -> dict[str, tuple[list[str], list[int]]]:
    """Splits added to a backdoored build: ``test_triggered`` (every task's test texts with the trigger)."""
    if not isinstance(recipe, BackdoorFields):
        return {}
    return {TRIGGERED_SPLIT: ([insert_trigger(t, recipe.trigger) for t in test_texts], list(test_labels))}
