"""Fisher merging: an average of the fine-tuned models weighted, per element, by their diagonal Fisher.

Two estimators of model ``i``'s diagonal Fisher ``Fᵢ`` (``estimator``), ``p`` being the softmax of
the task head applied to the model's output:

- ``fusionbench`` (default; FusionBench 0.2.33 ``FisherMergingForCLIPVisionModel.get_fisher_weights``
  and ``fisher_merging.py``, after MergeLM): no labels.  Per batch, the gradient ``g`` of the batch
  sum ``Σ_b Σ_c sqrt(p̂_bc) · log p_bc`` (``p̂`` = ``p`` detached: each class's log-likelihood
  weighted by the square root of the model's own probability) is squared, ``g²`` is summed over
  batches and divided by the number of examples.  Batches are read until ``num_examples`` examples
  have been used (the batch that reaches it included).
- ``empirical`` (fuse's earlier default): labelled examples, the mean of the per-example squared
  gradients ``(∂ log p(y | x; θᵢ) / ∂θᵢⱼ)²`` (vectorised with ``torch.func.vmap``).

The merge is ``θⱼ = Σᵢ cᵢ (Fᵢⱼ + ε) θᵢⱼ / Σᵢ cᵢ (Fᵢⱼ + ε)`` with ``ε = min_fisher`` and, per
``normalize``:

- ``fusionbench`` (default; ``merging_with_fisher_weights``): ``cᵢ ∝ 1 / (‖Fᵢ‖ + ε)``, ``‖Fᵢ‖`` the
  L2 norm of model ``i``'s whole Fisher (the constant of proportionality cancels);
- ``divide`` (fuse's earlier default): ``Fᵢ`` is replaced by ``Fᵢ / ‖Fᵢ‖`` and ``cᵢ = 1``;
- ``none``: ``cᵢ = 1``.

Elements whose weights sum to 0 (``min_fisher = 0`` and no gradient in any model) and float
buffers are simply averaged.  Equal Fishers give exactly the simple average.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import attrs

from fusion_core import Capabilities, FuseError, InputError, in_range, option, positive

from .common import AdaptiveMethod, batch_size, float_params, note, prepare, slice_inputs, tied_aliases, to_device

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fusion_core import ModelPool, RunContext

GRAD_BUDGET = 2**25
"""Most per-example gradient elements held at once (per-example gradients come in chunks of examples)."""


def _add_batch_dim(inputs: Any) -> Any:
    import torch

    if isinstance(inputs, torch.Tensor):
        return inputs.unsqueeze(0)
    if isinstance(inputs, Mapping):
        return {k: _add_batch_dim(v) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(_add_batch_dim(v) for v in inputs)
    return inputs


def log_likelihood_loss(logits: "torch.Tensor", labels: "torch.Tensor") -> "torch.Tensor":
    """``−Σ log p(label)`` over a batch (token-level logits ``(..., C)`` with labels ``(...)`` too)."""
    import torch
    import torch.nn.functional as F

    flat = logits.reshape(-1, logits.shape[-1])
    return F.cross_entropy(flat if flat.dtype in (torch.float32, torch.float64) else flat.float(), labels.reshape(-1), reduction="sum")


def diagonal_fisher(model: Any, params: Mapping[str, "torch.Tensor"], batches: Iterable[tuple[Any, "torch.Tensor"]],
                    head: Callable | None, *, pool: "ModelPool | None" = None, max_batches: int | None = None,
                    device: str = "cpu", on_batch: Callable[[int], None] | None = None) -> tuple[dict[str, "torch.Tensor"], int, str]:
    """The diagonal empirical Fisher of ``model`` at ``params``: mean over examples of squared per-example gradients.

    :returns: (Fisher by parameter name, number of examples, ``"vmap"`` or ``"loop"``: how
        per-example gradients were computed; ``vmap`` falls back to a loop for models it cannot batch).
    """
    import torch
    from torch.func import grad, vmap

    from fusion_core.adapters import apply_classifier, functional_forward

    names = list(params)
    fisher = {k: torch.zeros_like(v) for k, v in params.items()}
    n_params = sum(v.numel() for v in params.values())
    chunk = max(1, GRAD_BUDGET // max(1, n_params))

    def loss_one(p, x, y):
        out = functional_forward(model, p, _add_batch_dim(x), pool)
        return log_likelihood_loss(apply_classifier(head, out), y.unsqueeze(0))

    per_example = vmap(grad(loss_one), in_dims=(None, 0, 0))
    mode = "vmap"

    def loop_grads(x, y) -> dict[str, torch.Tensor]:
        out: dict[str, list] = {k: [] for k in names}
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        for j in range(int(y.shape[0])):
            with torch.enable_grad():
                o = functional_forward(model, leaves, slice_inputs(x, j, j + 1), pool)
                loss = log_likelihood_loss(apply_classifier(head, o), y[j : j + 1])
                gs = torch.autograd.grad(loss, [leaves[k] for k in names], allow_unused=True)
            for k, g in zip(names, gs, strict=True):
                out[k].append(torch.zeros_like(params[k]) if g is None else g)
        return {k: torch.stack(v) for k, v in out.items()}

    count = 0
    for index, (x, y) in enumerate(batches):
        if max_batches is not None and index >= max_batches:
            break
        x, y = to_device(x, device), y.to(device)
        size = int(y.shape[0])
        for start in range(0, size, chunk):
            xs, ys = slice_inputs(x, start, start + chunk), y[start : start + chunk]
            grads = None
            if mode == "vmap":
                try:
                    grads = per_example(dict(params), xs, ys)
                except FuseError:
                    raise
                except (RuntimeError, NotImplementedError, ValueError, TypeError):
                    mode = "loop"
            if grads is None:
                grads = loop_grads(xs, ys)
            for k in names:
                fisher[k] += grads[k].detach().pow(2).sum(dim=0)
            del grads
        count += size
        if on_batch is not None:
            on_batch(size)
    if count == 0:
        raise InputError("the data gave no examples to estimate the Fisher information from")
    return {k: f / count for k, f in fisher.items()}, count, mode


def fusionbench_batch_loss(logits: "torch.Tensor") -> "torch.Tensor":
    """``Σ sqrt(p̂) · log p`` over a batch's logits (``p̂`` detached): FusionBench's label-free Fisher objective."""
    import torch

    logits = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    log_p = logits.log_softmax(dim=-1)
    return (log_p.detach().exp().sqrt() * log_p).sum()


def batch_fisher(model: Any, params: Mapping[str, "torch.Tensor"], batches: Iterable[Any], head: Callable | None, *,
                 pool: "ModelPool | None" = None, max_examples: int | None = None, max_batches: int | None = None,
                 device: str = "cpu", on_batch: Callable[[int], None] | None = None) -> tuple[dict[str, "torch.Tensor"], int]:
    """FusionBench's Fisher: per batch the squared gradient of :func:`fusionbench_batch_loss`, summed, / examples.

    ``batches`` give inputs or ``(inputs, labels)`` pairs (labels are ignored).  Reading stops before a batch
    once ``max_examples`` examples were used, or after ``max_batches`` batches.
    :returns: (Fisher by parameter name, number of examples).
    """
    import torch

    from fusion_core.adapters import apply_classifier, functional_forward

    from .regmean import batch_inputs

    names = list(params)
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    fisher = {k: torch.zeros_like(v) for k, v in params.items()}
    count = 0
    for index, batch in enumerate(batches):
        if (max_batches is not None and index >= max_batches) or (max_examples is not None and count >= max_examples):
            break
        x = to_device(batch_inputs(batch), device)
        with torch.enable_grad():
            out = functional_forward(model, leaves, x, pool)
            loss = fusionbench_batch_loss(apply_classifier(head, out))
            grads = torch.autograd.grad(loss, [leaves[k] for k in names], allow_unused=True)
        for k, g in zip(names, grads, strict=True):
            if g is not None:
                fisher[k].addcmul_(g, g)
        del grads, out, loss
        size = batch_size(x)
        count += size
        if on_batch is not None:
            on_batch(size)
    if count == 0:
        raise InputError("the data gave no examples to estimate the Fisher information from")
    return {k: f.div_(count) for k, f in fisher.items()}, count


def fisher_norm(fisher: Mapping[str, "torch.Tensor"]) -> "torch.Tensor":
    """The L2 norm of a whole Fisher (every tensor), as FusionBench computes it: the norm of the per-tensor norms."""
    import torch

    per_tensor = torch.stack([torch.linalg.vector_norm(f) for f in fisher.values()])
    return torch.linalg.vector_norm(per_tensor)


def fisher_weights(fisher: Mapping[str, "torch.Tensor"], rule: str, min_fisher: float) -> dict[str, "torch.Tensor"]:
    """Each element's merge weight ``cᵢ (Fᵢ + ε)`` of one model under normalisation ``rule``."""
    if rule == "fusionbench":
        c = 1.0 / (fisher_norm(fisher) + min_fisher)
        return {k: (f + min_fisher) * c.to(f.dtype) for k, f in fisher.items()}
    if rule == "divide":
        norm = fisher_norm({k: f.double() for k, f in fisher.items()})
        if norm > 0:
            fisher = {k: f / norm.to(f.dtype) for k, f in fisher.items()}
    return {k: f + min_fisher for k, f in fisher.items()}


def fisher_weighted_average(params: Sequence[Mapping[str, "torch.Tensor"]], fishers: Sequence[Mapping[str, "torch.Tensor"]],
                            *, min_fisher: float = 0.0) -> dict[str, "torch.Tensor"]:
    """``Σᵢ (Fᵢ + ε) θᵢ / Σᵢ (Fᵢ + ε)`` per element; the simple average where the weights sum to 0."""
    import torch

    out = {}
    for key in params[0]:
        num = torch.zeros_like(params[0][key])
        den = torch.zeros_like(params[0][key])
        total = torch.zeros_like(params[0][key])
        for p, f in zip(params, fishers, strict=True):
            w = f[key] + min_fisher
            num += w * p[key]
            den += w
            total += p[key]
        out[key] = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), total / len(params))
    return out


class FisherMerging(AdaptiveMethod):
    """Fisher-weighted averaging of the fine-tuned models (Matena & Raffel, 2022)."""

    name = "fisher_merging"
    summary = "Per-element average weighted by each model's diagonal Fisher, estimated on train batches (FusionBench's label-free estimator)."
    reference_url = "https://arxiv.org/abs/2111.09832"
    fusionbench_config = "fisher_merging/clip_fisher_merging.yaml"
    capabilities: ClassVar[Capabilities] = Capabilities(needs_data=True)

    @attrs.frozen
    class Config:
        estimator: Literal["fusionbench", "empirical"] = option(
            "fusionbench", help="'fusionbench': squared gradient of each batch's Σ sqrt(p̂)·log p, no labels (FusionBench 0.2.33); "
                                "'empirical': mean per-example squared gradient of log p(label) (fuse's earlier default; needs labels)"
        )
        num_examples: int | None = option(256, help="examples per model to estimate the Fisher from (FusionBench num_fisher_examples; "
                                                    "null = all)", validator=positive)
        num_batches: int | None = option(None, help="at most this many batches per model (null = no limit)", validator=positive)
        split: str = option("train", help="the model pool's data split to read (ModelPool.data(model, split))")
        normalize: Literal["fusionbench", "divide", "none"] | bool = option(
            "fusionbench", help="'fusionbench': weigh model i by 1/(‖Fᵢ‖+ε) (FusionBench normalize_fisher_weight); "
                                "'divide' (or true): use Fᵢ/‖Fᵢ‖ (fuse's earlier default); 'none' (or false)"
        )
        min_fisher: float = option(1e-6, help="ε added to every Fisher value (keeps weights positive)", validator=in_range(0.0, None))

        def __attrs_post_init__(self) -> None:
            if self.normalize is True or self.normalize is False:  # the earlier boolean form
                object.__setattr__(self, "normalize", "divide" if self.normalize else "none")

    def estimate(self, model: Any, params: Mapping[str, "torch.Tensor"], batches: Iterable, head: Callable | None, *,
                 pool: "ModelPool", name: str, ctx: "RunContext",
                 on_batch: Callable[[int], None] | None = None) -> tuple[dict[str, "torch.Tensor"], int, str]:
        """Model ``name``'s diagonal Fisher: (by parameter name, examples used, how it was computed)."""
        from fusion_core.adapters import labelled

        cfg = self.config
        if cfg.estimator == "fusionbench":
            fisher, count = batch_fisher(model, params, batches, head, pool=pool, max_examples=cfg.num_examples,
                                         max_batches=cfg.num_batches, device=ctx.device, on_batch=on_batch)
            return fisher, count, "batch"
        pairs = labelled(batches, method=self.name, name=name, split=cfg.split)
        return diagonal_fisher(model, params, _first_examples(pairs, cfg.num_examples), head, pool=pool,
                               max_batches=cfg.num_batches, device=ctx.device, on_batch=on_batch)

    def run(self, pool: "ModelPool", ctx: "RunContext") -> dict[str, "torch.Tensor"]:
        import torch

        from fusion_core.adapters import get_classifier, require_data

        cfg, names = self.config, list(pool.model_names)
        data = {n: require_data(pool, n, cfg.split, method=self.name) for n in names}
        num: dict[str, torch.Tensor] = {}
        den: dict[str, torch.Tensor] = {}
        total: dict[str, torch.Tensor] = {}
        fixed: dict[str, torch.Tensor] = {}
        examples, modes = {}, {}
        aliases: dict[str, str] = {}
        planned = [planned_examples(data[n], cfg.num_examples, cfg.num_batches) for n in names]
        report = ctx.progress(f"Fisher ({self.name})", None if None in planned else sum(planned), unit="example")  # type: ignore[arg-type]
        for name in names:
            model = prepare(pool.load_model(name), ctx.device)
            params = float_params(model)
            aliases = tied_aliases(model)
            fisher, examples[name], modes[name] = self.estimate(model, params, data[name], get_classifier(ctx.taskpool, name),
                                                                pool=pool, name=name, ctx=ctx, on_batch=report.advance)
            weights = fisher_weights(fisher, cfg.normalize, cfg.min_fisher)
            for key, value in model.state_dict().items():  # running sums, in place (no new tensor per model)
                value = value.detach()
                if not value.is_floating_point():
                    fixed.setdefault(key, value)
                    continue
                if key in total:
                    total[key].add_(value)
                else:
                    total[key] = value.clone()
                if key in weights:
                    w = weights[key]
                    if key in num:
                        num[key].add_(w * value)
                        den[key].add_(w)
                    else:
                        num[key], den[key] = w * value, w
            del model, params, fisher, weights
        merged = {}
        n = len(names)
        for key, value in total.items():
            if key in num:
                safe = torch.where(den[key] > 0, den[key], torch.ones_like(den[key]))
                merged[key] = torch.where(den[key] > 0, num[key] / safe, value / n)
            else:
                merged[key] = value / n
        merged.update(fixed)
        for alias, source in aliases.items():
            merged[alias] = merged[source]
        note(ctx, self.name, examples=examples, gradients=modes, estimator=cfg.estimator, normalize=cfg.normalize)
        return {k: v.detach().to("cpu") for k, v in merged.items()}


def planned_examples(data: Any, num_examples: int | None, num_batches: int | None) -> int | None:
    """How many examples the estimator will read from ``data`` (the batch reaching ``num_examples`` included), when
    that is known without reading it: a sized ``data`` whose batch size is known (a list's first batch, a loader's
    ``batch_size``); ``None`` otherwise."""
    from collections.abc import Sequence

    from .regmean import batch_inputs

    size = getattr(data, "batch_size", None)
    if size is None and isinstance(data, Sequence) and len(data) > 0:
        size = batch_size(batch_inputs(data[0]))
    if not size:
        return None
    batches = len(data) if hasattr(data, "__len__") else None
    if num_batches is not None:
        batches = num_batches if batches is None else min(batches, num_batches)
    if num_examples is not None:
        wanted = -(-num_examples // size)
        batches = wanted if batches is None else min(batches, wanted)
    return None if batches is None else batches * size


def _first_examples(pairs: Iterable[tuple[Any, "torch.Tensor"]], limit: int | None) -> Iterator[tuple[Any, "torch.Tensor"]]:
    """``(inputs, labels)`` batches until ``limit`` examples were given (the batch reaching it included)."""
    count = 0
    for x, y in pairs:
        if limit is not None and count >= limit:
            return
        yield x, y
        count += int(y.shape[0])


METHODS = [FisherMerging]
