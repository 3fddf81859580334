"""Built-in task pool that needs no data: statistics of a model's weights."""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from ..components import TaskPool
from ..config import option
from ..hookspecs import hookimpl


@attrs.frozen
class WeightStatsConfig:
    include_buffers: bool = option(True, help="Count non-parameter tensors of an nn.Module (buffers) too.")


class WeightStats(TaskPool):
    """Reports parameter count, L2 norm and mean of a model's floating-point tensors."""

    name = "weight_stats"
    summary = "Parameter count, L2 norm and mean of the weights (no data needed)."
    Config = WeightStatsConfig

    @property
    def task_names(self) -> list[str]:
        return ["weights"]

    def primary_metric(self) -> str:
        return "l2_norm"

    def evaluate(self, model, *, tasks=None, ctx=None):
        import torch

        if isinstance(model, Mapping):
            tensors = list(model.values())
        elif self.config.include_buffers:
            tensors = list(model.state_dict().values())
        else:
            tensors = list(model.parameters())
        floats = [t.detach().double() for t in tensors if torch.is_floating_point(t)]
        count = sum(t.numel() for t in floats)
        total = sum(t.sum().item() for t in floats)
        sq = sum((t * t).sum().item() for t in floats)
        result = {"parameters": float(count), "l2_norm": sq**0.5, "mean": total / count if count else 0.0}
        return {"weights": result} if tasks is None or "weights" in tasks else {}


@hookimpl
def fusion_register_task_pools(register):
    register(WeightStats)
