"""The backdoor protocol: ASR in closed form, the wrapper's metrics, refusal of a pool that cannot carry a trigger."""

from __future__ import annotations

import attrs
import pytest

from fusion_core import InputError, TaskPool
from fusion_core.backdoor import BackdoorTaskPool, TriggerableTaskPool, attack_success_rate

torch = pytest.importorskip("torch")

TRIGGER = 9  # a feature value the model below reads as "class 2"


class Model(torch.nn.Module):
    """Logits: one-hot of x[:, 0] (a class index), except that a trigger in x[:, 1] votes for class 2."""

    def forward(self, x):
        out = torch.nn.functional.one_hot(x[:, 0].long(), 3).float()
        return out + 2.0 * (x[:, 1:2] == TRIGGER).float() * torch.tensor([0.0, 0.0, 1.0])


@attrs.frozen
class _Config:
    """The test method takes no fields."""


class Clean(TaskPool):
    name = "clean_toy"
    summary = "toy"
    Config = _Config

    def __init__(self, poisoned_fraction: float = 1.0) -> None:
        super().__init__(_Config())
        self.fraction = poisoned_fraction

    @property
    def task_names(self):
        return ["t"]

    def batches(self, trigger: bool):
        labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
        marks = torch.zeros(8)
        if trigger:
            marks[: int(8 * self.fraction)] = TRIGGER
        return [(torch.stack([labels.float(), marks], 1), labels)]

    def evaluate(self, model, *, tasks=None, ctx=None):
        (x, y), = self.batches(False)
        return {"t": {"accuracy": float((model(x).argmax(1) == y).float().mean())}}


class Triggerable(Clean):
    def backdoor_target(self, task):
        return 2

    def triggered_batches(self, task):
        return self.batches(True)


def test_asr_counts_only_non_target_inputs():
    pool = Triggerable(poisoned_fraction=0.5)  # the first 4 inputs carry the trigger: labels 0 1 2 0 → 3 non-target, all flipped
    assert isinstance(pool, TriggerableTaskPool) and not isinstance(Clean(), TriggerableTaskPool)
    # non-target inputs: labels 0,1,0,1,0,1 (6); triggered among them: 3 → ASR 3/6
    assert attack_success_rate(Model(), pool, "t") == pytest.approx(0.5)
    assert attack_success_rate(Model(), Triggerable(1.0), "t") == pytest.approx(1.0)


def test_wrapper_reports_clean_accuracy_and_asr_side_by_side():
    results = BackdoorTaskPool(inner=Triggerable(1.0)).evaluate(Model())
    assert results == {"t": {"accuracy": 1.0, "asr": 1.0}}


def test_wrapper_refuses_a_pool_without_the_protocol():
    with pytest.raises(InputError, match="cannot carry a trigger"):
        BackdoorTaskPool(inner=Clean())


def test_subclassing_next_to_a_triggerable_pool_adds_asr_to_its_own_metrics():
    class Pool(BackdoorTaskPool, Triggerable):
        name = "toy_backdoor"

    pool = Pool(0.5)  # the config argument goes down the hierarchy (here: Triggerable's poisoned fraction)
    assert pool.evaluate(Model()) == {"t": {"accuracy": 1.0, "asr": 0.5}}
