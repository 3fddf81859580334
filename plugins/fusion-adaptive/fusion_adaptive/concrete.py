"""Concrete subspace learning: a shared Concrete (Gumbel-sigmoid) mask over the task vectors' entries.

Tang et al., "Concrete Subspace Learning based Interference Elimination for Multi-task Model Fusion"
(2023, arXiv 2310.02575).  Every parameter entry ``k`` has a mask logit ``ℓₖ`` (all start at
``initial_logits``); a mask is drawn from the relaxed Bernoulli (Concrete) distribution

    mₖ = σ((ℓₖ + log u − log(1 − u)) / T),   u ~ U(0, 1),

and rescaled per tensor to mean 1 (``m / mean(m)``).  The *same* mask multiplies every task
vector: ``θ = θ₀ + Σᵢ λᵢ (m ⊙ τᵢ)``.  The logits are meta-learned on unlabelled test inputs by
minimising the prediction entropy (Adam), as FusionBench 0.2.33 does
(``method/concrete_subspace``, configs ``clip_concrete_*.yaml``):

- **Concrete task arithmetic**: λ fixed at ``scaling_factor``; ``steps`` Adam steps on the logits.
- **Concrete AdaMerging** (task-wise or layer-wise): each step takes one Adam step on the
  AdaMerging coefficients λ (``base_lr``, an optimiser whose moments persist across steps) with
  the drawn mask held fixed, starting from ``init``, then one step on the logits through the
  updated λ (first-order meta-learning).  As in FusionBench, the inner step's gradient is taken at
  the λ the previous step ended with (FusionBench builds the merged tensors before it resets λ to
  ``init``; at the first step that is ``init`` itself).  After ``steps`` steps a final mask is drawn
  (``eval_mask``) and plain AdaMerging runs ``adamerging_steps`` steps from ``init`` under it.
- **Safe Concrete AdaMerging** (:mod:`.safe`): the same, with an adversarial perturbation.

Limits: T → ∞ gives m ≡ ½, so m / mean(m) ≡ 1 and the merge is plain task arithmetic / AdaMerging;
logits → +∞ give m ≡ 1 (the same).  Draws come from one generator seeded from the run's seed, in
the base's parameter order, so a seed fixes the result.  Tensors whose task vectors are zero in every
model (embedding tables frozen during fine-tuning) carry no mask: masking a zero changes nothing.

Test-time adaptation: the methods read the *test* inputs (never labels) and are ``transductive``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import attrs

from fusion_core import Capabilities, in_range, option, positive, tensor_seed

from .common import (
    AdaptiveMethod,
    adaptation_tasks,
    check_finite,
    entropy,
    float_params,
    mark_transductive,
    note,
    prepare,
    progress,
    state_with,
    summarize_history,
    task_vector,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fusion_core import ModelPool, RunContext

PAPER = "https://arxiv.org/abs/2310.02575"


# --------------------------------------------------------------------------- the mask


def relaxed_bernoulli(logits: "torch.Tensor", temperature: float, generator: "torch.Generator") -> "torch.Tensor":
    """One reparameterised draw of the Concrete relaxation of Bernoulli(σ(logits)) (torch's ``RelaxedBernoulli``).

    ``u`` and the result are kept in ``[ε, 1 − ε]`` (ε the dtype's machine epsilon), as torch's ``clamp_probs``.
    """
    import torch

    eps = torch.finfo(logits.dtype).eps
    u = torch.rand(logits.shape, generator=generator, dtype=logits.dtype, device=logits.device).clamp(eps, 1 - eps)
    return torch.sigmoid((u.log() - torch.log1p(-u) + logits) / temperature).clamp(eps, 1 - eps)


class ConcreteMask:
    """Mask logits, one per entry of each parameter tensor, shared by all task vectors."""

    def __init__(self, params: Mapping[str, "torch.Tensor"], initial_logits: float) -> None:
        import torch

        self.logits = {k: torch.full_like(v, float(initial_logits)).requires_grad_(True) for k, v in params.items()}

    def parameters(self) -> list["torch.Tensor"]:
        return list(self.logits.values())

    def sample(self, kind: Literal["continuous", "discrete"], temperature: float, generator: "torch.Generator") -> dict[str, "torch.Tensor"]:
        """A mask rescaled to mean 1 per tensor: ``m / mean(m)`` (an all-zero discrete mask stays zero)."""
        import torch

        out = {}
        for key, logits in self.logits.items():
            if kind == "continuous":
                m = relaxed_bernoulli(logits, temperature, generator)
            else:
                with torch.no_grad():
                    m = torch.bernoulli(torch.sigmoid(logits), generator=generator)
            mean = m.mean()
            out[key] = m / mean if float(mean.detach()) > 0 else m
        return out

    def statistics(self) -> dict[str, float]:
        """Share of entries with keep-probability σ(ℓ) > ½ and the mean keep-probability."""
        import torch

        with torch.no_grad():
            total = sum(v.numel() for v in self.logits.values())
            kept = sum(int((v > 0).sum()) for v in self.logits.values())
            mean = sum(float(torch.sigmoid(v).sum()) for v in self.logits.values()) / max(total, 1)
        return {"mask_kept": kept / max(total, 1), "mask_mean_probability": mean}


def masked_merge(base: Mapping[str, "torch.Tensor"], stacked: Mapping[str, "torch.Tensor"], coefficients: "torch.Tensor",
                 mask: Mapping[str, "torch.Tensor"] | None) -> dict[str, "torch.Tensor"]:
    """``θ₀ₖ + mₖ ⊙ Σᵢ λᵢₖ τᵢₖ`` per tensor ``k`` (``coefficients`` ``(N, 1)`` task-wise or ``(N, K)`` layer-wise).

    A tensor without a mask (``mask`` ``None`` or without its key) is merged unmasked.
    """
    import torch

    layer_wise = coefficients.shape[1] > 1
    out = {}
    for k, (key, value) in enumerate(base.items()):
        if key not in stacked:  # no model changed it (stack_task_vectors leaves it out): the base's value
            out[key] = value
            continue
        delta = torch.tensordot(coefficients[:, k if layer_wise else 0].to(value.dtype), stacked[key], dims=1)
        m = None if mask is None else mask.get(key)
        out[key] = value + (delta if m is None else m.to(value.dtype) * delta)
    return out


# --------------------------------------------------------------------------- the shared run


class Setup:
    """What every Concrete method holds while it runs: base, stacked task vectors, tasks, mask, generator."""

    def __init__(self, method: "ConcreteMethod", pool: "ModelPool", ctx: "RunContext") -> None:
        import torch

        from .adamerging import stack_task_vectors

        self.method, self.pool, self.ctx = method.name, pool, ctx
        self.names = list(pool.model_names)
        self.tasks = adaptation_tasks(pool, ctx.taskpool, method=method.name, device=ctx.device,
                                        batch_size=method.config.batch_size)
        self.base = prepare(pool.load_model(None), ctx.device)
        self.params = float_params(self.base)
        self.vectors = stack_task_vectors([task_vector(pool, n, self.params, method=method.name, device=ctx.device) for n in self.names],
                                          list(self.params))
        self.generator = torch.Generator(device=ctx.device)
        self.generator.manual_seed(tensor_seed(ctx.seed, method.name, "mask"))
        # tensors whose task vectors are all zero (frozen in every fine-tune: embedding tables) are not stacked and
        # get no mask: m ⊙ 0 = 0
        self.mask = ConcreteMask({k: v for k, v in self.params.items() if k in self.vectors}, method.config.initial_logits)

    def coefficients(self, value: float, layer_wise: bool) -> "torch.Tensor":
        import torch

        width = len(self.params) if layer_wise else 1
        return torch.full((len(self.names), width), float(value), dtype=torch.float32, device=self.ctx.device, requires_grad=True)

    def logits(self, task: Any, params: Mapping[str, "torch.Tensor"], inputs: Any) -> "torch.Tensor":
        from fusion_core.adapters import apply_classifier, functional_forward

        return apply_classifier(task.head, functional_forward(self.base, params, inputs, self.pool))

    def entropy_loss(self, params: Mapping[str, "torch.Tensor"], eps: float) -> "torch.Tensor":
        """Σ over tasks of the mean prediction entropy on each task's next unlabelled batch."""
        total = None
        for task in self.tasks:
            value = entropy(self.logits(task, params, task.next_inputs()), eps)
            total = value if total is None else total + value
        assert total is not None
        return total

    def state(self, mask: Mapping[str, "torch.Tensor"], coefficients: "torch.Tensor") -> dict[str, "torch.Tensor"]:
        import torch

        with torch.no_grad():
            return state_with(self.base, masked_merge(self.params, self.vectors, coefficients.detach(), mask))


def optimise(optimizer: "torch.optim.Optimizer", loss: "torch.Tensor", step: int, *, method: str, zero_first: bool = True) -> float:
    """Backward and one step.  ``zero_first=False`` keeps gradients already accumulated (zeroed after the step)."""
    check_finite(loss, step, method=method)
    if zero_first:
        optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


@attrs.frozen
class MaskFields:
    """The mask's fields (FusionBench's names in parentheses)."""

    initial_logits: float = option(0.0, help="initial mask logit of every entry (initial_logits; 0 = keep-probability ½)")
    temperature: float = option(0.5, help="Concrete relaxation temperature T (temperature)", validator=positive)
    eval_mask: Literal["continuous", "discrete"] = option(
        "continuous", help="the final mask: one relaxed draw (FusionBench's eval_mask_type default) or a Bernoulli draw")
    entropy_eps: float = option(1e-8, help="ε of the entropy −Σ p·log(p + ε) (FusionBench 1e-8; 0 = exact)", validator=in_range(0.0, None))
    clamp_weights: bool = option(False, help="merge with clamp(λ, 0, 1) (FusionBench clamp_weights)")
    batch_size: int | None = option(16, help="unlabelled test inputs per task in a batch (FusionBench batch_size 16; the task "
                                             "pool's batches are cut to it, as AdaMerging's); null = the task pool's batches",
                                    validator=positive)


def effective(coefficients: "torch.Tensor", clamp: bool) -> "torch.Tensor":
    return coefficients.clamp(0.0, 1.0) if clamp else coefficients


class ConcreteMethod(AdaptiveMethod):
    """Base of the Concrete subspace methods (one implementation for every architecture)."""

    reference_url: ClassVar[str] = PAPER
    capabilities: ClassVar[Capabilities] = Capabilities(needs_base=True, needs_data=True, trains=True, transductive=True, random=True)

    def finish(self, setup: Setup, ctx: "RunContext", history: Sequence[float], **info: Any) -> None:
        note(ctx, self.name, **setup.mask.statistics(), **summarize_history(history), **info)
        mark_transductive(ctx, self.name, setup.names)


class ConcreteTaskArithmetic(ConcreteMethod):
    """Concrete task arithmetic: θ₀ + λ Σᵢ m ⊙ τᵢ with λ fixed and the shared mask m learned by entropy minimisation."""

    name = "concrete_task_arithmetic"
    fusionbench_config = "concrete_subspace/clip_concrete_task_arithmetic.yaml"
    summary = "Task arithmetic through a shared Concrete mask over the task vectors, meta-learned on unlabelled test inputs."

    @attrs.frozen
    class Config(MaskFields):
        scaling_factor: float = option(0.3, help="λ of every task vector (scaling_factor)")
        steps: int = option(2000, help="Adam steps on the mask logits, one unlabelled test batch per task each (max_steps)",
                            validator=in_range(0, None))
        lr: float = option(1e-3, help="Adam learning rate of the mask logits (lr)", validator=positive)

    def run(self, pool: "ModelPool", ctx: "RunContext") -> dict[str, "torch.Tensor"]:
        import torch

        cfg = self.config
        setup = Setup(self, pool, ctx)
        coefficients = effective(setup.coefficients(cfg.scaling_factor, False).detach(), cfg.clamp_weights)
        optimizer = torch.optim.Adam(setup.mask.parameters(), lr=cfg.lr)
        history = []
        for step in progress(ctx, range(cfg.steps), f"learning the mask ({self.name})", total=cfg.steps):
            mask = setup.mask.sample("continuous", cfg.temperature, setup.generator)
            loss = setup.entropy_loss(masked_merge(setup.params, setup.vectors, coefficients, mask), cfg.entropy_eps)
            history.append(optimise(optimizer, loss, step, method=self.name))
        with torch.no_grad():
            final = setup.mask.sample(cfg.eval_mask, cfg.temperature, setup.generator)
        self.finish(setup, ctx, history)
        return setup.state(final, coefficients)


class ConcreteAdaMerging(ConcreteMethod):
    """Concrete AdaMerging: the shared mask meta-learned through one AdaMerging step per step, then AdaMerging under it."""

    name = "concrete_adamerging"
    fusionbench_config = "concrete_subspace/clip_concrete_layer_wise_adamerging.yaml"
    summary = "AdaMerging (task- or layer-wise) inside a shared Concrete mask over the task vectors, meta-learned on unlabelled test inputs."
    carry_outer_gradient: ClassVar[bool] = False
    """Whether λ's gradient from the mask step is left to add to the next inner step's (FusionBench's safe variant does)."""

    @attrs.frozen
    class Config(MaskFields):
        granularity: Literal["task", "layer"] = option("layer", help="one λ per model (task) or per model and parameter tensor (layer)")
        init: float = option(0.3, help="initial λ of every coefficient, restored before each inner step (scaling_factor)")
        steps: int = option(1000, help="meta-learning steps of the mask (max_steps); each reads two test batches per task (the safe variant: three)",
                            validator=in_range(0, None))
        lr: float = option(1e-3, help="Adam learning rate of the mask logits (lr)", validator=positive)
        base_lr: float = option(1.0, help="Adam learning rate of the inner step on λ (base_lr)", validator=positive)
        adamerging_steps: int = option(1000, help="AdaMerging steps under the final mask (max_adamerging_steps)",
                                       validator=in_range(0, None))
        adamerging_lr: float = option(1e-3, help="Adam learning rate of AdaMerging under the final mask (adamerging_lr)", validator=positive)

    def mask_loss(self, setup: Setup, params: Mapping[str, "torch.Tensor"], step: int) -> "torch.Tensor":
        """The loss the mask step minimises (plain: the entropy on fresh batches)."""
        return setup.entropy_loss(params, self.config.entropy_eps)

    def before_mask_step(self, setup: Setup, params: Mapping[str, "torch.Tensor"], step: int) -> None:
        """Hook between the inner step and the mask step (the safe variant trains its perturbation here)."""

    def run(self, pool: "ModelPool", ctx: "RunContext") -> dict[str, "torch.Tensor"]:
        import torch

        cfg = self.config
        setup = Setup(self, pool, ctx)
        self.prepare_run(setup)
        layer_wise = cfg.granularity == "layer"
        coefficients = setup.coefficients(cfg.init, layer_wise)
        base_optimizer = torch.optim.Adam([coefficients], lr=cfg.base_lr)
        optimizer = torch.optim.Adam(setup.mask.parameters(), lr=cfg.lr)
        zero_first = not self.carry_outer_gradient
        history = []
        for step in progress(ctx, range(cfg.steps), f"learning the mask ({self.name})", total=cfg.steps):
            mask = setup.mask.sample("continuous", cfg.temperature, setup.generator)
            fixed = {k: m.detach() for k, m in mask.items()}
            inner = setup.entropy_loss(masked_merge(setup.params, setup.vectors, effective(coefficients, cfg.clamp_weights), fixed),
                                       cfg.entropy_eps)
            check_finite(inner, step, method=self.name)
            if zero_first:
                base_optimizer.zero_grad(set_to_none=True)
            inner.backward()
            with torch.no_grad():
                coefficients.fill_(cfg.init)  # the gradient was taken at the previous step's λ, the step starts from init
            base_optimizer.step()
            base_optimizer.zero_grad(set_to_none=True)
            params = masked_merge(setup.params, setup.vectors, effective(coefficients, cfg.clamp_weights), mask)
            self.before_mask_step(setup, params, step)
            check = self.mask_loss(setup, params, step)
            check_finite(check, step, method=self.name)
            optimizer.zero_grad(set_to_none=True)
            check.backward()
            optimizer.step()
            if zero_first:
                coefficients.grad = None
            history.append(float(check.detach()))
        with torch.no_grad():
            final = setup.mask.sample(cfg.eval_mask, cfg.temperature, setup.generator)
            coefficients.fill_(cfg.init)
        adamerging = torch.optim.Adam([coefficients], lr=cfg.adamerging_lr)
        ada_history = []
        for step in progress(ctx, range(cfg.adamerging_steps), f"adamerging under the mask ({self.name})", total=cfg.adamerging_steps):
            loss = setup.entropy_loss(masked_merge(setup.params, setup.vectors, effective(coefficients, cfg.clamp_weights), final),
                                      cfg.entropy_eps)
            ada_history.append(optimise(adamerging, loss, step, method=self.name, zero_first=zero_first))
        lam = effective(coefficients.detach(), cfg.clamp_weights).cpu()
        per_model = {n: float(lam[i].mean()) for i, n in enumerate(setup.names)}
        self.finish(setup, ctx, history, granularity=cfg.granularity, coefficients=per_model,
                    adamerging=summarize_history(ada_history), **self.extra_notes())
        return setup.state(final, effective(coefficients, cfg.clamp_weights))

    def prepare_run(self, setup: Setup) -> None:
        """Hook before the loop (the safe variant builds its perturbations here)."""

    def extra_notes(self) -> dict[str, Any]:
        return {}


METHODS = [ConcreteTaskArithmetic, ConcreteAdaMerging]
