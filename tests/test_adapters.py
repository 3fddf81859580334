"""The model-adapter protocol (fusion_core.adapters) and the defaults it adds to ModelPool/TaskPool."""

from __future__ import annotations

import attrs
import pytest
import torch
from torch import nn

from fusion_core import adapters
from fusion_core.components import ModelPool, TaskPool
from fusion_core.errors import InputError


@attrs.frozen
class _Empty:
    pass


class Pool(ModelPool):
    name = "adapter_pool"
    Config = _Empty

    def __init__(self, data=None):
        super().__init__()
        self._data = data or {}

    @property
    def model_names(self):
        return ["a"]

    def load_model(self, name=None):
        return nn.Linear(2, 2)

    def data(self, name, split):
        return self._data.get((name, split))


class DictPool(Pool):
    name = "dict_pool"

    def forward(self, model, inputs):  # a pool whose models take one field of a mapping
        return model(inputs["features"]) * 2


class Tasks(TaskPool):
    name = "adapter_tasks"
    Config = _Empty

    @property
    def task_names(self):
        return ["a"]

    def evaluate(self, model, *, tasks=None, ctx=None):
        return {}


class Kw(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x, scale=1.0):
        return self.lin(x) * scale


def test_forward_calls_with_keywords_for_mappings_and_positionally_otherwise():
    m = Kw()
    x = torch.randn(4, 3)
    torch.testing.assert_close(adapters.forward(m, x), m.lin(x))
    torch.testing.assert_close(adapters.forward(m, {"x": x, "scale": 3.0}), m.lin(x) * 3)
    assert ModelPool.forward(Pool(), m, x).shape == (4, 2)  # the default pool forward is adapters.forward


def test_functional_forward_uses_the_given_tensors_without_touching_the_module():
    m = Kw()
    x = torch.randn(4, 3)
    w = torch.randn(2, 3, requires_grad=True)
    out = adapters.functional_forward(m, {"lin.weight": w}, {"x": x, "scale": 2.0})
    torch.testing.assert_close(out, (x @ w.t() + m.lin.bias) * 2)
    out.sum().backward()
    assert w.grad is not None and m.lin.weight.grad is None  # gradients reach the given tensors only
    # a pool that overrides forward: the override runs with the replaced tensors
    lin = nn.Linear(3, 2)
    w2 = torch.zeros(2, 3)
    out = adapters.functional_forward(lin, {"weight": w2}, {"features": x}, DictPool())
    torch.testing.assert_close(out, lin.bias.detach().expand(4, 2) * 2)
    assert not torch.equal(lin.weight.detach(), w2)


def test_output_tensor_reads_tensors_logits_and_tuples():
    t = torch.ones(2, 3)

    class Out:
        logits = t

    assert adapters.output_tensor(t) is t
    assert adapters.output_tensor(Out()) is t
    assert adapters.output_tensor({"logits": t}) is t
    assert adapters.output_tensor((t, torch.zeros(1))) is t
    with pytest.raises(InputError, match=r"cannot read logits from a model output of type str; give the task a classifier"):
        adapters.output_tensor("nope")


def test_logits_apply_the_head_or_let_an_ensemble_combine_members():
    m = nn.Linear(3, 2)
    x = torch.randn(5, 3)
    head = lambda f: f * 10  # noqa: E731
    torch.testing.assert_close(adapters.logits(m, x, head), m(x) * 10)
    torch.testing.assert_close(adapters.logits(m, x), m(x))

    class Ensemble(nn.Module):
        def ensemble_logits(self, inputs, classifier):
            return torch.full((len(inputs), 2), 7.0)

    assert torch.equal(adapters.logits(Ensemble(), x, head), torch.full((5, 2), 7.0))


def test_task_pool_defaults_give_no_head_and_no_unlabelled_batches():
    tasks = Tasks()
    assert tasks.classifier("a") is None and tasks.unlabelled_batches("a") is None
    assert adapters.get_classifier(tasks, "a") is None and adapters.get_classifier(None, "a") is None


def test_require_data_names_the_model_and_the_missing_split():
    batches = [(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long))]
    pool = Pool({("a", "train"): batches})
    assert adapters.require_data(pool, "a", "train", method="m") is batches
    with pytest.raises(InputError, match=r"method 'm' needs the 'val' split of model 'a', but model pool 'adapter_pool' gives no 'val' data"):
        adapters.require_data(pool, "a", "val", method="m")


def test_labelled_refuses_batches_without_a_label_tensor():
    good = [(torch.zeros(2, 2), torch.tensor([0, 1]))]
    assert len(list(adapters.labelled(good, method="m", name="a", split="train"))) == 1
    with pytest.raises(InputError, match=r"method 'm' needs labelled batches, but the 'train' data of model 'a' gives a Tensor"):
        list(adapters.labelled([torch.zeros(2, 2)], method="m", name="a", split="train"))
    with pytest.raises(InputError, match=r"gives a tuple of 2 item\(s\) \(Tensor, NoneType\)"):
        list(adapters.labelled([(torch.zeros(2, 2), None)], method="m", name="a", split="train"))


def test_require_unlabelled_explains_what_is_missing():
    class WithTest(Tasks):
        def unlabelled_batches(self, task):
            return [torch.zeros(1)]

    assert len(adapters.require_unlabelled(WithTest(), "a", method="m")) == 1
    with pytest.raises(InputError, match=r"but the run has no task pool"):
        adapters.require_unlabelled(None, "a", method="m")
    with pytest.raises(InputError, match=r"task pool 'adapter_tasks' has no such task"):
        adapters.require_unlabelled(WithTest(), "zzz", method="m")
    with pytest.raises(InputError, match=r"gives none \(TaskPool.unlabelled_batches\('a'\) returned None\)"):
        adapters.require_unlabelled(Tasks(), "a", method="m")


def test_cycle_repeats_lists_and_caches_one_shot_iterators():
    out = adapters.cycle([1, 2])
    assert [next(out) for _ in range(5)] == [1, 2, 1, 2, 1]
    once = adapters.cycle(iter([3, 4]))
    assert [next(once) for _ in range(5)] == [3, 4, 3, 4, 3]
    with pytest.raises(InputError, match="gave no batches"):
        next(adapters.cycle([]))
