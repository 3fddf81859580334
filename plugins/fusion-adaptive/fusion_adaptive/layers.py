"""The modules that upscaling and ensemble methods put into their outputs.

This module imports torch at module level: it is imported only when such a method runs.

- :class:`Router`: a small MLP mapping a layer's input to one weight per expert.
- :class:`WeightEnsemblingMoE` (WEMoE): a layer whose weights are the base's plus a per-sample,
  router-weighted sum of task vectors.
- :class:`SmileLinear` (SMILE): a linear layer plus a sparse mixture of low-rank experts, routed
  zero-shot by the norm of the input's projection on each expert's top right singular vectors.
- :class:`EnsembleModel`: members run side by side and their logits combined.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from fusion_core.adapters import apply_classifier, forward, output_tensor


def _buffer_name(param_name: str) -> str:
    return "expert_" + param_name.replace(".", "__")


class Router(nn.Module):
    """``input → weights (..., N)``: ``Linear(d, N)`` or ``Linear(d, h) → ReLU → Linear(h, N)``.

    The last layer starts at weight 0 and bias ``init``, so every expert starts with weight
    ``init`` (task arithmetic with scale ``init``) whatever the input.
    """

    def __init__(self, in_features: int, n_experts: int, hidden: int, init: float, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if hidden > 0:
            first = nn.Linear(in_features, hidden, dtype=dtype)
            with torch.no_grad():
                first.weight.copy_(torch.randn(first.weight.shape, generator=generator, dtype=torch.float32) * in_features**-0.5)
                first.bias.zero_()
            layers += [first, nn.ReLU()]
        last = nn.Linear(hidden if hidden > 0 else in_features, n_experts, dtype=dtype)
        with torch.no_grad():
            last.weight.zero_()
            last.bias.fill_(init)
        layers.append(last)
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class WeightEnsemblingMoE(nn.Module):
    """``f(x; θ₀ + Σᵢ rᵢ(x) τᵢ)``: the base layer with a per-sample, routed sum of task vectors.

    ``rᵢ(x)`` is the router's output on the layer's input, averaged over every dimension
    between the batch and the features (tokens), so each sample has one weight per expert.
    Linear layers use ``x·W₀ᵀ + Σᵢ rᵢ (x·τᵢᵀ)`` (no per-sample weight matrices); other modules
    are run per sample with ``torch.func.vmap`` over per-sample merged parameters.
    """

    def __init__(self, base: nn.Module, experts: Mapping[str, torch.Tensor], router: Router, *, linear: bool, transposed: bool = False) -> None:
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.router = router
        self.param_names = list(experts)
        for name, stacked in experts.items():
            self.register_buffer(_buffer_name(name), stacked.detach().clone())
        self.linear, self.transposed = linear, transposed
        self.n_experts = int(next(iter(experts.values())).shape[0])

    def expert(self, name: str) -> torch.Tensor:
        """The stacked task vectors ``(N, *shape)`` of the base's parameter ``name``."""
        return getattr(self, _buffer_name(name))

    def routing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N)``: the router's weights per sample (averaged over tokens)."""
        r = self.router(x)
        if r.dim() > 2:
            r = r.flatten(1, -2).mean(dim=1)
        elif r.dim() == 1:
            r = r.unsqueeze(0)
        return r

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        weights = self.routing_weights(x).to(x.dtype)
        if self.linear:
            return self._linear_forward(x, weights)
        return self._generic_forward(x, weights, args, kwargs)

    def _linear_forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        w = self.expert("weight")  # (N, out, in), or (N, in, out) for Conv1D
        per_expert = torch.einsum("b...i,nio->nb...o", x, w) if self.transposed else torch.einsum("b...i,noi->nb...o", x, w)
        if "bias" in self.param_names:
            shape = (w.shape[0], 1) + (1,) * (x.dim() - 2) + (-1,)
            per_expert = per_expert + self.expert("bias").reshape(shape)
        return out + torch.einsum("bn,nb...o->b...o", weights, per_expert)

    def _generic_forward(self, x: torch.Tensor, weights: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        from torch.func import functional_call, vmap

        own = dict(self.base.named_parameters())
        params = {}
        for name in self.param_names:
            base = own[name].detach()
            params[name] = base.unsqueeze(0) + torch.einsum("bn,n...->b...", weights, self.expert(name))

        def one(p, xb):
            return functional_call(self.base, p, (xb.unsqueeze(0), *args), kwargs).squeeze(0)

        return vmap(one, in_dims=(0, 0))(params, x)


class SmileLinear(nn.Module):
    """A linear layer plus a sparse mixture of low-rank experts (SMILE).

    Expert ``i`` is the rank-``k`` truncated SVD of task vector ``τᵢ = Wᵢ − W₀`` (``Uᵢ Sᵢ Vᵢᵀ``)
    and its bias delta.  For each input row ``x`` the routing logit of expert ``i`` is
    ``‖Vᵢ,gᵀ x‖₂`` (``Vᵢ,g``: its top ``gate_k`` right singular vectors); the ``top_k`` experts
    with the largest logits are used, weighted by the softmax of their logits:
    ``y = W₀x + b₀ + Σ_{i ∈ top} wᵢ (Uᵢ Sᵢ Vᵢᵀ x + Δbᵢ)``.
    """

    def __init__(self, base: nn.Module, up: torch.Tensor, down: torch.Tensor, gate: torch.Tensor,
                 bias_delta: torch.Tensor | None, *, top_k: int) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("expert_up", up.detach().clone())  # (N, out, k): U·S
        self.register_buffer("expert_down", down.detach().clone())  # (N, in, k): V
        self.register_buffer("gate", gate.detach().clone())  # (N, in, gate_k)
        self.register_buffer("expert_bias", None if bias_delta is None else bias_delta.detach().clone())  # (N, out)
        self.top_k = int(top_k)

    def routing_weights(self, rows: torch.Tensor) -> torch.Tensor:
        """``(R, N)``: the softmax over each row's top-k experts (zeros elsewhere)."""
        logits = torch.einsum("ri,nig->rng", rows, self.gate.to(rows.dtype)).norm(dim=-1)
        top, index = logits.topk(self.top_k, dim=-1)
        weights = torch.zeros_like(logits)
        return weights.scatter(-1, index, torch.softmax(top, dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        rows = x.reshape(-1, x.shape[-1])
        weights = self.routing_weights(rows)
        low = torch.einsum("ri,nik->nrk", rows, self.expert_down.to(rows.dtype))
        delta = torch.einsum("nrk,nok->nro", low, self.expert_up.to(rows.dtype))
        if self.expert_bias is not None:
            delta = delta + self.expert_bias.to(rows.dtype).unsqueeze(1)
        mixed = torch.einsum("rn,nro->ro", weights, delta)
        return out + mixed.reshape(out.shape)


class EnsembleModel(nn.Module):
    """Members run side by side; their outputs (or logits) are combined.

    ``mode="mean"``: ``Σᵢ wᵢ yᵢ`` (weights sum to 1 for a mean).  ``mode="max_probability"``:
    for each sample (and position), the logits of the member whose softmax has the highest
    maximum.  :meth:`forward` combines the members' raw outputs (exact for members that
    output logits, and for affine heads under ``mean``); :meth:`ensemble_logits` applies a
    task's head to each member first (what :func:`fusion_core.adapters.logits` calls).
    """

    def __init__(self, members: Sequence[nn.Module], weights: Sequence[float], mode: str,
                 forward_fn: Callable[[Any, Any], Any] | None = None) -> None:
        super().__init__()
        if mode not in ("mean", "max_probability"):
            raise ValueError(f"unknown ensemble mode {mode!r}")
        self.members = nn.ModuleList(members)
        self.register_buffer("weights", torch.tensor([float(w) for w in weights], dtype=torch.float64))
        self.mode = mode
        self._forward_fn = forward_fn or forward

    def combine(self, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.mode == "mean":
            total = None
            for w, y in zip(self.weights.tolist(), outputs, strict=True):
                total = w * y if total is None else total + w * y
            assert total is not None
            return total
        stacked = torch.stack(list(outputs))  # (M, ..., C)
        confidence = F.softmax(stacked.float(), dim=-1).amax(dim=-1)  # (M, ...)
        best = confidence.argmax(dim=0, keepdim=True)  # (1, ...)
        index = best.unsqueeze(-1).expand((1,) + tuple(stacked.shape[1:]))
        return stacked.gather(0, index).squeeze(0)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.combine([output_tensor(m(*args, **kwargs)) for m in self.members])

    def ensemble_logits(self, inputs: Any, classifier: Callable | None) -> torch.Tensor:
        """Each member's logits through ``classifier`` (the task's head), then combined."""
        return self.combine([apply_classifier(classifier, self._forward_fn(m, inputs)) for m in self.members])
