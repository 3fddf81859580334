"""The modules that upscaling and ensemble methods put into their outputs.

This module imports torch at module level: it is imported only when such a method runs.

- :class:`Router`: a small MLP mapping a layer's input to one weight per expert.
- :class:`WeightEnsemblingMoE` (WEMoE): a layer whose weights are the base's plus a per-sample,
  router-weighted sum of task vectors.
- :class:`SmileLinear` (SMILE): a linear layer plus a sparse mixture of low-rank experts, routed
  zero-shot by the norm of the input's projection on each expert's top right singular vectors.
- :class:`EnsembleModel`: members run side by side and their outputs (or logits) combined.
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

    ``init="normal"`` (FusionBench's ``Depth_1_Gate``/``Depth_2_Gate``): every weight matrix
    ~ N(0, 0.01²), the hidden bias 0 and the last bias ``init_lambda``.  ``init="zero_last"`` (fuse's
    earlier default): the first weight ~ N(0, 1/d), the last weight 0 and its bias ``init_lambda``,
    so every expert starts with weight exactly ``init_lambda`` whatever the input.  Draws come from
    ``generator`` in layer order (first weight, then last weight).
    """

    def __init__(self, in_features: int, n_experts: int, hidden: int, init_lambda: float, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32, init: str = "normal") -> None:
        super().__init__()
        if init not in ("normal", "zero_last"):
            raise ValueError(f"unknown router init {init!r}")
        layers: list[nn.Module] = []
        if hidden > 0:
            first = nn.Linear(in_features, hidden, dtype=dtype)
            std = 0.01 if init == "normal" else in_features**-0.5
            with torch.no_grad():
                first.weight.copy_(torch.randn(first.weight.shape, generator=generator, dtype=torch.float32) * std)
                first.bias.zero_()
            layers += [first, nn.ReLU()]
        last = nn.Linear(hidden if hidden > 0 else in_features, n_experts, dtype=dtype)
        with torch.no_grad():
            if init == "normal":
                last.weight.copy_(torch.randn(last.weight.shape, generator=generator, dtype=torch.float32) * 0.01)
            else:
                last.weight.zero_()
            last.bias.fill_(init_lambda)
        layers.append(last)
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SharedRouting:
    """The routing weights of a group of :class:`WeightEnsemblingMoE` layers that run one after the other
    (a transformer block's feed-forward split into two linear layers, as BERT's): the first layer of the
    group routes on its own input and stores the weights here; the others reuse them."""

    def __init__(self) -> None:
        self.weights: torch.Tensor | None = None


class WeightEnsemblingMoE(nn.Module):
    """``f(x; θ₀ + Σᵢ rᵢ(x) τᵢ)``: the base layer with a routed sum of task vectors.

    ``rᵢ(x)`` is the router's output on the layer's input, averaged over every dimension
    between the batch and the features (tokens), so each sample has one weight per expert;
    with ``batch_reduce`` (FusionBench's ``batch_reduce: true``) it is also averaged over the
    batch: one weight vector per batch, and the module runs once with the merged parameters.
    Per sample, linear layers use ``x·W₀ᵀ + Σᵢ rᵢ (x·τᵢᵀ)`` (no per-sample weight matrices);
    other modules are run per sample with ``torch.func.vmap`` over per-sample merged parameters.

    ``shared``: the layer belongs to a group that routes once (:class:`SharedRouting`): with a
    ``router`` it routes and stores the weights there; without one (``router=None``) it reuses
    the weights the group's router stored during the same forward pass.
    """

    def __init__(self, base: nn.Module, experts: Mapping[str, torch.Tensor], router: Router | None, *, linear: bool,
                 transposed: bool = False, batch_reduce: bool = False, shared: SharedRouting | None = None) -> None:
        super().__init__()
        if router is None and shared is None:
            raise ValueError("a WeightEnsemblingMoE layer without a router needs the SharedRouting of its group")
        self.shared = shared
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.router = router
        self.param_names = list(experts)
        for name, stacked in experts.items():
            self.register_buffer(_buffer_name(name), stacked.detach().clone())
        self.linear, self.transposed, self.batch_reduce = linear, transposed, batch_reduce
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

    def merged_parameters(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """The base's parameters plus ``Σᵢ wᵢ τᵢ`` for one weight vector ``weights`` ``(N,)``."""
        own = dict(self.base.named_parameters())
        return {name: own[name].detach() + torch.tensordot(weights.to(own[name].dtype), self.expert(name), dims=1)
                for name in self.param_names}

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.router is not None:
            weights = self.routing_weights(x).to(x.dtype)
            if self.shared is not None:
                self.shared.weights = weights
        else:
            weights = self.shared.weights
            if weights is None or weights.shape[0] != x.shape[0]:
                raise RuntimeError("a WeightEnsemblingMoE layer without a router ran before the layer that routes its group")
        if self.batch_reduce:
            from torch.func import functional_call

            return functional_call(self.base, self.merged_parameters(weights.mean(dim=0)), (x, *args), kwargs)
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


def soft_top_k(weights: torch.Tensor, k: int) -> torch.Tensor:
    """``w · sigmoid(100 (w − t))`` with ``t`` the ``k``-th largest weight: weights below the top ``k`` fade to ~0 (RankOne-MoE)."""
    threshold = torch.topk(weights, k, dim=-1).values.min(dim=-1, keepdim=True).values
    return weights * torch.sigmoid(100 * (weights - threshold))


class RankOneMoE(WeightEnsemblingMoE):
    """``f(x; θ₀ + Σᵢ Σ_r g_{i,r}(x) s_{i,r} u_{i,r} v_{i,r}ᵀ)``: routed rank-one experts (RankOne-MoE).

    Every 2-D parameter of the base module has, per task ``i``, the ``k`` leading singular
    components of its task vector as experts (``u`` stacked ``(N, k, rows)``, ``s·v`` stacked
    ``(N, k, cols)``, zero-padded when the rank is below ``k``); the router gives one weight per
    (task, component), ``N·k`` in all (optionally softly cut to the ``select_k`` largest).  Every
    other parameter is the base's plus ``fixed`` (the task-arithmetic sum ``λ Σᵢ τᵢ``, not routed).
    Routing is per sample (averaged over tokens) or, ``batch_reduce``, per batch, as WEMoE's.
    """

    def __init__(self, base: nn.Module, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], fixed: Mapping[str, torch.Tensor],
                 router: Router, *, select_k: int = -1, batch_reduce: bool = False) -> None:
        nn.Module.__init__(self)
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.router = router
        self.factor_names, self.fixed_names = list(factors), list(fixed)
        for name, (u, sv) in factors.items():
            self.register_buffer(_buffer_name(name) + "_u", u.detach().clone())
            self.register_buffer(_buffer_name(name) + "_sv", sv.detach().clone())
        for name, delta in fixed.items():
            self.register_buffer(_buffer_name(name) + "_fixed", delta.detach().clone())
        self.select_k, self.batch_reduce, self.linear = int(select_k), batch_reduce, False
        self.param_names = self.factor_names + self.fixed_names
        self.n_experts = int(next(iter(factors.values()))[0].shape[0]) if factors else 0

    def merged_parameters(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """The base's parameters with the routed rank-one sum (``weights``: ``(N·k,)``) and the fixed deltas."""
        own = dict(self.base.named_parameters())
        if self.select_k > 0:
            weights = soft_top_k(weights, self.select_k)
        out = {}
        for name in self.factor_names:
            u, sv = getattr(self, _buffer_name(name) + "_u"), getattr(self, _buffer_name(name) + "_sv")
            g = weights.to(u.dtype).reshape(u.shape[0], u.shape[1])
            out[name] = own[name].detach() + torch.einsum("nk,nko,nki->oi", g, u, sv)
        for name in self.fixed_names:
            out[name] = own[name].detach() + getattr(self, _buffer_name(name) + "_fixed")
        return out

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        from torch.func import functional_call, vmap

        weights = self.routing_weights(x).to(x.dtype)
        if self.batch_reduce:
            return functional_call(self.base, self.merged_parameters(weights.mean(dim=0)), (x, *args), kwargs)
        params = vmap(self.merged_parameters)(weights)

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


def combine_structure(outputs: Sequence[Any], combine: Callable[[list[torch.Tensor]], torch.Tensor]) -> Any:
    """Members' outputs combined leaf by leaf: tensors by ``combine``; mappings (and HF ``ModelOutput``s) key by key
    into a plain dict; tuples and lists item by item; ``None`` stays ``None``.  Other types are an error."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return combine(list(outputs))
    if isinstance(first, Mapping):
        return {k: combine_structure([o[k] for o in outputs], combine) for k in first if first[k] is not None}
    if isinstance(first, (tuple, list)):
        return tuple(combine_structure([o[i] for o in outputs], combine) for i in range(len(first)))
    if all(o is None for o in outputs):
        return None
    raise TypeError(f"cannot combine model outputs of type {type(first).__name__}")


class EnsembleModel(nn.Module):
    """Members run side by side; their outputs (or logits) are combined.

    ``mode="mean"``: ``Σᵢ wᵢ yᵢ`` (weights sum to 1 for a mean).  ``mode="max"``: the element-wise
    maximum of the members' ``yᵢ``.  ``mode="max_probability"``: for each sample (and position),
    the logits of the member whose softmax has the highest maximum.

    ``combine_at="outputs"`` (FusionBench's ``EnsembleModule``/``MaxModelPredictor``): the members'
    raw outputs (every tensor of them, e.g. a vision tower's ``pooler_output``) are combined and the
    task's head is applied once to the result.  ``combine_at="logits"``: the head is applied to each
    member first and the logits are combined (needed by ``max_probability``).  :meth:`forward` always
    combines the raw outputs; :meth:`ensemble_logits` (what :func:`fusion_core.adapters.logits` calls)
    follows ``combine_at``.
    """

    def __init__(self, members: Sequence[nn.Module], weights: Sequence[float], mode: str,
                 forward_fn: Callable[[Any, Any], Any] | None = None, combine_at: str = "logits") -> None:
        super().__init__()
        if mode not in ("mean", "max", "max_probability"):
            raise ValueError(f"unknown ensemble mode {mode!r}")
        if combine_at not in ("outputs", "logits"):
            raise ValueError(f"unknown combine_at {combine_at!r}")
        if mode == "max_probability" and combine_at != "logits":
            raise ValueError("mode 'max_probability' compares the members' probabilities: it needs combine_at='logits'")
        self.members = nn.ModuleList(members)
        self.register_buffer("weights", torch.tensor([float(w) for w in weights], dtype=torch.float64))
        self.mode, self.combine_at = mode, combine_at
        self._forward_fn = forward_fn or forward

    def combine(self, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.mode == "mean":
            total = None
            for w, y in zip(self.weights.tolist(), outputs, strict=True):
                total = w * y if total is None else total + w * y
            assert total is not None
            return total
        stacked = torch.stack(list(outputs))  # (M, ..., C)
        if self.mode == "max":
            return stacked.amax(dim=0)
        confidence = F.softmax(stacked.float(), dim=-1).amax(dim=-1)  # (M, ...)
        best = confidence.argmax(dim=0, keepdim=True)  # (1, ...)
        index = best.unsqueeze(-1).expand((1,) + tuple(stacked.shape[1:]))
        return stacked.gather(0, index).squeeze(0)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        outputs = [m(*args, **kwargs) for m in self.members]
        if self.mode == "max_probability":
            return self.combine([output_tensor(o) for o in outputs])
        return combine_structure(outputs, self.combine)

    def ensemble_logits(self, inputs: Any, classifier: Callable | None) -> torch.Tensor:
        """The ensemble's logits for one task: head once on the combined outputs, or per member then combined."""
        if self.combine_at == "outputs":
            combined = combine_structure([self._forward_fn(m, inputs) for m in self.members], self.combine)
            return apply_classifier(classifier, combined)
        return self.combine([apply_classifier(classifier, self._forward_fn(m, inputs)) for m in self.members])
