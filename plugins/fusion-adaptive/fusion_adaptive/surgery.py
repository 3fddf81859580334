"""Representation surgery (Yang et al., ICML 2024, "Representation Surgery for Multi-Task Model Merging",
arXiv 2402.02705; FusionBench 0.2.33 ``surgery/clip_layer_wise_adamerging_surgery.py`` and
``models/surgery/surgerymodelwrapper.py``).

A merged model's representations drift from each expert's ("representation bias").  Surgery
leaves the merged weights alone and learns, per task ``t``, a small module that removes the bias
from the representation ``z`` before the task's head:

    z_t = z − U_t · relu(D_t · z)          (D_t: d → r, U_t: r → d, no biases; U_t starts at 0)

trained on the task's *unlabelled test inputs* (transductive) to bring ``z_t`` to the expert's
representation: ``L1(z_t, z^expert_t)`` (mean), Adam (lr 1e-3), ``surgery_steps`` steps of one batch
per task each (one optimiser step per task, as FusionBench).  The models are frozen, so both
representations of every test batch are computed once and the batches then cycle in order
(FusionBench recomputes them on shuffled batches).  ``D_t`` starts as PyTorch's default
``Linear`` initialisation (Kaiming uniform, a = √5), drawn from the run's seed.

The merged model comes from any method that outputs one model (``base``; FusionBench: layer-wise
AdaMerging).  The output is of kind ``per_task``: each task is scored with the merged model
followed by its own surgery module; the merged model is what is saved.

The representation is the model's output as the pool runs it: a tensor output itself, else its
``image_embeds`` or ``pooler_output`` (a CLIP vision tower: the pooled feature, which the task
head then projects and normalises), else its logits or first tensor.  FusionBench operates on
CLIP's normalised projected embedding instead (inside its CLIP classifier).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from fusion_core import Capabilities, in_range, option, positive

from .common import AdaptiveMethod, mark_transductive, note, prepare, progress, to_device

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fusion_core import ModelPool, RunContext
    from fusion_core.adapters import PerTaskModels


def representation(output: Any) -> "torch.Tensor":
    """The representation in a model's output: the tensor itself, ``image_embeds``, ``pooler_output``, else its logits."""
    import torch

    from fusion_core.adapters import output_tensor

    if isinstance(output, torch.Tensor):
        return output
    for key in ("image_embeds", "pooler_output"):
        value = output.get(key) if isinstance(output, Mapping) else getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    return output_tensor(output)


def surgery_module(width: int, rank: int, generator: "torch.Generator") -> "torch.nn.Module":
    """``z ↦ U · relu(D · z)``: D with ``nn.Linear``'s default initialisation (from ``generator``), U = 0."""
    import math

    import torch

    module = torch.nn.Sequential(torch.nn.Linear(width, rank, bias=False), torch.nn.ReLU(), torch.nn.Linear(rank, width, bias=False))
    with torch.no_grad():
        bound = 1 / math.sqrt(width)  # kaiming_uniform_(a=√5) on a (rank, width) weight: U(−1/√width, 1/√width)
        module[0].weight.uniform_(-bound, bound, generator=generator)
        module[2].weight.zero_()
    return module


def _surgery_model_class():
    import torch

    class SurgeryModel(torch.nn.Module):
        """The merged model, then a task's surgery on its representation: called as the model is, returns ``z − f_t(z)``."""

        def __init__(self, model: Any, correction: "torch.nn.Module") -> None:
            super().__init__()
            self.model, self.correction = model, correction

        def forward(self, *args: Any, **kwargs: Any) -> "torch.Tensor":
            z = representation(self.model(*args, **kwargs))
            return z - self.correction(z.to(self.correction[0].weight.dtype)).to(z.dtype)

    return SurgeryModel


class RepresentationSurgery(AdaptiveMethod):
    """Representation surgery: a base merge, then per task a low-rank module that pulls its representation to the expert's."""

    name = "surgery"
    summary = ("Representation surgery after any merge (base=…): per task z − U·relu(D·z), trained on unlabelled test "
               "inputs toward the expert's representation (L1); each task scored with its own module.")
    reference_url = "https://arxiv.org/abs/2402.02705"
    fusionbench_config = "surgery/adamerging_surgery.yaml"
    capabilities: ClassVar[Capabilities] = Capabilities(needs_base=True, trains=True, transductive=True, output="per_task")

    @attrs.frozen
    class Config:
        base: str = option("adamerging", help="the merge run first (any method that outputs one model; FusionBench: layer-wise "
                                              "AdaMerging)")
        base_config: dict[str, Any] = option(factory=dict, help="the base method's fields (default: its own defaults)")
        surgery_steps: int = option(1000, help="steps; each reads one unlabelled test batch per task (FusionBench: 1000)",
                                    validator=in_range(0))
        lr: float = option(1e-3, help="Adam learning rate (FusionBench: 1e-3, betas 0.9/0.999, no weight decay)",
                           validator=in_range(0.0, lo_open=True))
        rank: int = option(16, help="r, the width of D_t and U_t (FusionBench hidden_dim: 16)", validator=positive)

    def check_inputs(self, n_models: int, has_base: bool) -> None:
        super().check_inputs(n_models, has_base)
        from fusion_core.adapters import inner_method

        inner_method(self.name, self.config.base, self.config.base_config).check_inputs(n_models, has_base)

    @staticmethod
    def _features(merged: Any, expert: Any, batches: Any, call: Any, device: str) -> Iterator[tuple["torch.Tensor", "torch.Tensor"]]:
        """(merged, expert) representations of the task's test batches, cycled; computed once (the models are frozen)."""
        import torch

        from fusion_core import InputError

        pairs = []
        with torch.no_grad():
            for x in batches:
                x = to_device(x, device)
                pairs.append((representation(call(merged, x)).float(), representation(call(expert, x)).float()))
        del expert
        if not pairs:
            raise InputError("method 'surgery': a task gave no unlabelled test batches")
        return itertools.cycle(pairs)

    def run(self, pool: "ModelPool", ctx: "RunContext") -> "PerTaskModels":
        import torch
        import torch.nn.functional as F

        from fusion_core.adapters import PerTaskModels, inner_method, pool_forward, require_unlabelled

        cfg, names = self.config, list(pool.model_names)
        merged_output = inner_method(self.name, cfg.base, cfg.base_config).run(pool, ctx)
        merged = pool.model_from_state_dict(merged_output) if isinstance(merged_output, Mapping) else merged_output
        merged = prepare(merged, ctx.device)
        call = pool_forward(pool)
        features = {n: self._features(merged, prepare(pool.load_model(n), ctx.device), require_unlabelled(ctx.taskpool, n, method=self.name),
                                      call, ctx.device) if cfg.surgery_steps else iter(()) for n in names}
        generator = torch.Generator().manual_seed(int(ctx.seed))
        modules: dict[str, torch.nn.Module] = {}
        optimizer: torch.optim.Optimizer | None = None
        losses: dict[str, list[float]] = {n: [] for n in names}
        for _ in progress(ctx, range(cfg.surgery_steps), "surgery", total=cfg.surgery_steps):
            for n in names:
                z, target = next(features[n])
                if n not in modules:  # built at its first batch (the width is the representation's); one Adam for all
                    modules[n] = surgery_module(z.shape[-1], cfg.rank, generator).to(ctx.device)
                    if optimizer is None:
                        optimizer = torch.optim.Adam(modules[n].parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0)
                    else:
                        optimizer.add_param_group({"params": list(modules[n].parameters())})
                with torch.enable_grad():
                    loss = F.l1_loss(z - modules[n](z), target)
                    optimizer.zero_grad()
                    loss.backward()
                optimizer.step()
                losses[n].append(float(loss.detach()))
        mark_transductive(ctx, self.name, names)
        note(ctx, self.name, base=cfg.base, steps=cfg.surgery_steps,
             l1_first={n: v[0] for n, v in losses.items() if v}, l1_last={n: v[-1] for n, v in losses.items() if v})
        wrap = _surgery_model_class()
        for module in modules.values():
            module.requires_grad_(False).eval()
        return PerTaskModels(merged_output, lambda task: wrap(merged, modules[task]) if task in modules else merged, names)


METHODS = [RepresentationSurgery]
