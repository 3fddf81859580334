"""WEMoE: weight-ensembling mixture of experts, with routers trained by test-time adaptation.

The chosen modules (``target_modules``; by default every linear layer; in the paper the MLP
of every transformer block) become :class:`~fusion_adaptive.layers.WeightEnsemblingMoE`
layers: the base module's parameters plus a per-sample, router-weighted sum of the models'
task vectors for that module.  Every other parameter is merged by task arithmetic with scale
``init_lambda``.  Each router is a small MLP on the module's input whose last layer starts at
weight 0 and bias ``init_lambda`` (so training starts from task arithmetic); the routers alone
are trained with Adam to minimise the prediction entropy on unlabelled test inputs of every
task (as AdaMerging), which makes the method transductive.  The output is a module (the base
architecture with routed layers): memory is the base + N task vectors of the target modules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from fusion_core.components import Capabilities
from fusion_core.config import in_range, option, positive
from fusion_core.engine.kernel import tensor_seed

from .common import (
    AdaptiveMethod,
    adapt,
    adaptation_tasks,
    entropy,
    float_params,
    mark_transductive,
    note,
    prepare,
    summarize_history,
    task_vector,
)
from .modules import is_linear, select_modules, set_submodule, transposed
from .modules import key as pkey

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fusion_core.components import ModelPool
    from fusion_core.run_context import RunContext


def input_features(model: Any, targets: dict[str, Any], run) -> dict[str, int]:
    """The last dimension of each target module's input (linear layers answer from their weight)."""
    import torch

    dims = {}
    probe = {}
    for name, module in targets.items():
        if is_linear(module):
            w = module.weight
            dims[name] = int(w.shape[0] if transposed(module) else w.shape[1])
        else:
            probe[name] = module
    if probe:
        handles = []
        for name, module in probe.items():
            def hook(mod, args, name=name):
                if name not in dims and args and isinstance(args[0], torch.Tensor):
                    dims[name] = int(args[0].shape[-1])
            handles.append(module.register_forward_pre_hook(hook))
        try:
            with torch.no_grad():
                run()
        finally:
            for handle in handles:
                handle.remove()
    from fusion_core.errors import InputError

    missing = [n for n in targets if n not in dims]
    if missing:
        raise InputError(f"target module(s) {', '.join(missing[:5])} never ran on the test inputs (or take no tensor input); choose other target_modules")
    return dims


class WEMoE(AdaptiveMethod):
    """Weight-ensembling MoE (Tang et al., ICML 2024)."""

    name = "wemoe"
    summary = "Upscales chosen layers into routed task-vector experts; routers trained on unlabelled test inputs (entropy)."
    reference_url = "https://arxiv.org/abs/2402.00433"
    capabilities: ClassVar[Capabilities] = Capabilities(needs_base=True, needs_data=True, trains=True, transductive=True, random=True)

    @attrs.frozen
    class Config:
        target_modules: list[str] | None = option(
            None, help="glob patterns of the module names to upscale (e.g. 'encoder.layers.*.mlp'); null = every linear layer"
        )
        init_lambda: float = option(0.3, help="task-arithmetic scale of the other parameters and every router's initial expert weight")
        router_hidden: int | None = option(
            None, help="hidden width of each router (null = the module's input width, 0 = a linear router)", validator=in_range(0, None)
        )
        lr: float = option(1e-3, help="Adam learning rate of the routers", validator=positive)
        steps: int = option(100, help="adaptation steps (one unlabelled test batch per task each); the paper uses 1000", validator=in_range(0, None))

    def run(self, pool: "ModelPool", ctx: "RunContext") -> Any:
        import torch

        from .layers import Router, WeightEnsemblingMoE

        cfg, names = self.config, list(pool.model_names)
        tasks = adaptation_tasks(pool, ctx.taskpool, method=self.name, device=ctx.device)
        base = prepare(pool.load_model(None), ctx.device)
        targets = select_modules(base, cfg.target_modules, method=self.name, field="target_modules", linear_only=False)
        dims = input_features(base, targets, lambda: pool.forward(base, tasks[0].next_inputs()))
        base_params = float_params(base)
        vectors = [task_vector(pool, n, base_params, method=self.name, device=ctx.device) for n in names]
        owned = {pkey(t, p): (t, p) for t, m in targets.items() for p, _ in m.named_parameters()}
        with torch.no_grad():
            for key, value in base_params.items():
                if key not in owned:
                    value.add_(sum(v[key] for v in vectors) * cfg.init_lambda)
        generator = torch.Generator(device="cpu")
        generator.manual_seed(tensor_seed(ctx.seed, self.name, "routers"))
        routers = []
        for target, module in targets.items():
            experts = {}
            for p, _ in module.named_parameters():
                key = pkey(target, p)
                experts[p] = torch.stack([v.pop(key) for v in vectors])
            hidden = dims[target] if cfg.router_hidden is None else cfg.router_hidden
            router = Router(dims[target], len(names), hidden, cfg.init_lambda, generator).to(ctx.device)
            layer = WeightEnsemblingMoE(module, experts, router, linear=is_linear(module) and set(experts) <= {"weight", "bias"},
                                        transposed=is_linear(module) and transposed(module))
            base = set_submodule(base, target, layer)
            routers += list(router.parameters())
            del experts
        del vectors
        from fusion_core.adapters import apply_classifier

        def loss(step: int) -> torch.Tensor:
            total = None
            for task in tasks:
                value = entropy(apply_classifier(task.head, pool.forward(base, task.next_inputs())))
                total = value if total is None else total + value
            assert total is not None
            return total

        history = adapt(routers, loss, steps=cfg.steps, lr=cfg.lr, method=self.name, ctx=ctx)
        for p in routers:
            p.requires_grad_(False)
        base.eval()
        note(ctx, self.name, upscaled=list(targets), experts=names, router_parameters=sum(p.numel() for p in routers),
             **summarize_history(history))
        mark_transductive(ctx, self.name, names)
        return base


METHODS = [WEMoE]
