"""Fisher merging: an average of the fine-tuned models weighted, per element, by their diagonal Fisher.

For model ``i`` the diagonal (empirical) Fisher of parameter element ``j`` is the mean over
labelled training examples ``(x, y)`` of ``(∂ log p(y | x; θᵢ) / ∂θᵢⱼ)²``, with ``p`` the
softmax of the task head applied to the model's output.  The merge is

    θⱼ = Σᵢ (Fᵢⱼ + ε) θᵢⱼ / Σᵢ (Fᵢⱼ + ε)

with ``ε = min_fisher``; with ``normalize`` each model's Fisher is first divided by its
global L2 norm, so that no model dominates by the scale of its gradients.  Elements whose
weights sum to 0 (``min_fisher = 0`` and no gradient in any model) and float buffers
are simply averaged.  Equal Fishers give exactly the simple average.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from fusion_core.components import Capabilities
from fusion_core.config import in_range, option, positive
from fusion_core.errors import FuseError, InputError

from .common import AdaptiveMethod, float_params, note, prepare, tied_aliases, to_device

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fusion_core.components import ModelPool
    from fusion_core.run_context import RunContext

GRAD_BUDGET = 2**25
"""Most per-example gradient elements held at once (per-example gradients come in chunks of examples)."""


def slice_inputs(inputs: Any, start: int, stop: int) -> Any:
    """Examples ``start:stop`` of a batch (tensors in mappings, lists and tuples are sliced on dim 0)."""
    import torch

    if isinstance(inputs, torch.Tensor):
        return inputs[start:stop]
    if isinstance(inputs, Mapping):
        return {k: slice_inputs(v, start, stop) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(slice_inputs(v, start, stop) for v in inputs)
    return inputs


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
                    device: str = "cpu") -> tuple[dict[str, "torch.Tensor"], int, str]:
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
    if count == 0:
        raise InputError("the data gave no examples to estimate the Fisher information from")
    return {k: f / count for k, f in fisher.items()}, count, mode


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
    summary = "Per-element average weighted by each model's diagonal Fisher, estimated on labelled train batches."
    reference_url = "https://arxiv.org/abs/2111.09832"
    capabilities: ClassVar[Capabilities] = Capabilities(needs_data=True, needs_labels=True)

    @attrs.frozen
    class Config:
        num_batches: int | None = option(8, help="labelled batches per model to estimate the Fisher from (null = all)", validator=positive)
        split: str = option("train", help="the model pool's data split to read (ModelPool.data(model, split))")
        normalize: bool = option(True, help="divide each model's Fisher by its global L2 norm before weighting")
        min_fisher: float = option(1e-6, help="ε added to every Fisher value (keeps weights positive)", validator=in_range(0.0, None))

    def run(self, pool: "ModelPool", ctx: "RunContext") -> dict[str, "torch.Tensor"]:
        import torch

        from fusion_core.adapters import get_classifier, labelled, require_data

        cfg, names = self.config, list(pool.model_names)
        data = {n: require_data(pool, n, cfg.split, method=self.name) for n in names}
        num: dict[str, torch.Tensor] = {}
        den: dict[str, torch.Tensor] = {}
        total: dict[str, torch.Tensor] = {}
        fixed: dict[str, torch.Tensor] = {}
        examples, modes = {}, {}
        aliases: dict[str, str] = {}
        for name in ctx.track(names, f"Fisher ({self.name})", total=len(names)):
            model = prepare(pool.load_model(name), ctx.device)
            params = float_params(model)
            aliases = tied_aliases(model)
            batches = labelled(data[name], method=self.name, name=name, split=cfg.split)
            fisher, examples[name], modes[name] = diagonal_fisher(
                model, params, batches, get_classifier(ctx.taskpool, name), pool=pool, max_batches=cfg.num_batches, device=ctx.device
            )
            if cfg.normalize:
                norm = torch.sqrt(sum((f.double() ** 2).sum() for f in fisher.values()))
                if norm > 0:
                    fisher = {k: f / norm.to(f.dtype) for k, f in fisher.items()}
            for key, value in model.state_dict().items():
                value = value.detach()
                if not value.is_floating_point():
                    fixed.setdefault(key, value)
                    continue
                total[key] = total[key] + value if key in total else value.clone()
                if key in fisher:
                    w = fisher[key] + cfg.min_fisher
                    num[key] = num[key] + w * value if key in num else w * value
                    den[key] = den[key] + w if key in den else w.clone()
            del model, params, fisher
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
        note(ctx, self.name, examples=examples, per_example_gradients=modes)
        return {k: v.detach().to("cpu") for k, v in merged.items()}


METHODS = [FisherMerging]
