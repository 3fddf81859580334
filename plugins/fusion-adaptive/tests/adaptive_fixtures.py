"""Tiny synthetic pools implementing the model-adapter protocol, for the fusion-adaptive tests (fixtures in conftest.py).

An encoder of two linear layers and a ReLU; three separable synthetic 3-class tasks, each with a
fixed random head; fine-tunes trained a few Adam steps from a shared base.  Everything is
seeded and built in memory in well under a second.
"""

from __future__ import annotations

import copy

import attrs
import torch
from torch import nn

from fusion_core.adapters import logits
from fusion_core.components import ModelPool, TaskPool
from fusion_core.run_context import RunContext

D_IN, HIDDEN, D_OUT, CLASSES = 8, 16, 8, 3
TASKS = ("alpha", "beta", "gamma")


class Encoder(nn.Module):
    def __init__(self, d_in: int = D_IN, hidden: int = HIDDEN, d_out: int = D_OUT, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden, bias=bias)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, d_out, bias=bias)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def make_task(seed: int, n_train: int = 256, n_test: int = 96):
    g = torch.Generator().manual_seed(seed)
    rule = torch.randn(D_IN, CLASSES, generator=g)
    x = torch.randn(n_train + n_test, D_IN, generator=g)
    y = (x @ rule).argmax(dim=1)
    head = nn.Linear(D_OUT, CLASSES)
    with torch.no_grad():
        head.weight.copy_(torch.randn(CLASSES, D_OUT, generator=g))
        head.bias.zero_()
    head.requires_grad_(False)
    return {"train": (x[:n_train], y[:n_train]), "test": (x[n_train:], y[n_train:]), "head": head}


def batches(x, y, size: int = 32, labelled: bool = True):
    out = []
    for s in range(0, x.shape[0], size):
        out.append((x[s : s + size], y[s : s + size]) if labelled else x[s : s + size])
    return out


def finetune(base: nn.Module, task: dict, steps: int = 40, lr: float = 0.02, batch: int = 32, frozen: tuple[str, ...] = ()) -> nn.Module:
    """A copy of ``base`` trained with Adam through the task's head; parameters named in ``frozen`` stay at the base's."""
    model = copy.deepcopy(base)
    model.train()
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    x, y = task["train"]
    for step in range(steps):
        s = (step * batch) % x.shape[0]
        loss = nn.functional.cross_entropy(task["head"](model(x[s : s + batch])), y[s : s + batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@attrs.frozen
class _NoConfig:
    pass


class MemoryPool(ModelPool):
    """Base + fine-tuned modules in memory; ``load_model`` returns copies unless ``share``."""

    name = "test_memory"
    summary = "in-memory test pool"
    Config = _NoConfig

    def __init__(self, base, models: dict, data: dict | None = None, share: bool = False) -> None:
        super().__init__()
        self._base, self._models, self._data, self.share = base, dict(models), dict(data or {}), share
        self.loads = 0

    @property
    def model_names(self):
        return list(self._models)

    @property
    def has_base(self):
        return self._base is not None

    def load_model(self, name=None):
        self.loads += 1
        model = self._base if name is None else self._models[name]
        return model if self.share else copy.deepcopy(model)

    def data(self, name, split):
        return self._data.get((name, split))


class MemoryTaskPool(TaskPool):
    """Accuracy on each task's test split through its fixed head, scored with ``adapters.logits``."""

    name = "test_tasks"
    summary = "in-memory test task pool"
    Config = _NoConfig

    def __init__(self, tasks: dict, unlabelled: bool = True) -> None:
        super().__init__()
        self.tasks, self.unlabelled = tasks, unlabelled
        self.calls: list[list[str]] = []

    @property
    def task_names(self):
        return list(self.tasks)

    def classifier(self, task):
        return self.tasks[task]["head"]

    def unlabelled_batches(self, task):
        if not self.unlabelled:
            return None
        x, y = self.tasks[task]["test"]
        return batches(x, y, labelled=False)

    def evaluate(self, model, *, tasks=None, ctx=None):
        tasks = list(self.tasks) if tasks is None else tasks
        self.calls.append(list(tasks))
        out = {}
        with torch.no_grad():
            for t in tasks:
                x, y = self.tasks[t]["test"]
                pred = logits(model, x, self.tasks[t]["head"]).argmax(dim=1)
                out[t] = {"accuracy": float((pred == y).float().mean())}
        return out


class World:
    """The base, the fine-tunes, the tasks, and pools over them."""

    def __init__(self, n_tasks: int = 3, dtype=torch.float32, steps: int = 40, hidden: int = HIDDEN) -> None:
        torch.manual_seed(0)
        self.tasks = {name: make_task(100 + i) for i, name in enumerate(TASKS[:n_tasks])}
        self.base = Encoder(hidden=hidden).to(dtype)
        for t in self.tasks.values():
            t["head"] = t["head"].to(dtype)
            t["train"] = (t["train"][0].to(dtype), t["train"][1])
            t["test"] = (t["test"][0].to(dtype), t["test"][1])
        self.models = {name: finetune(self.base, task, steps=steps) for name, task in self.tasks.items()}

    def data(self, labelled: bool = True) -> dict:
        return {(n, "train"): batches(*t["train"], labelled=labelled) for n, t in self.tasks.items()}

    def pool(self, with_data: bool = True, **kw) -> MemoryPool:
        return MemoryPool(self.base, self.models, self.data() if with_data else None, **kw)

    def taskpool(self, **kw) -> MemoryTaskPool:
        return MemoryTaskPool(self.tasks, **kw)

    def ctx(self, taskpool=None, seed: int = 0) -> RunContext:
        return RunContext(seed=seed, taskpool=taskpool if taskpool is not None else self.taskpool(), show_progress=False)
