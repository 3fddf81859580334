"""SMILE: a zero-shot sparse mixture of low-rank experts built from the SVD of task vectors.

Each chosen linear layer (``target_modules``; default every linear layer) becomes a
:class:`~fusion_adaptive.layers.SmileLinear`: the base layer plus, per fine-tuned model, the
rank-``rank`` truncated SVD of its task vector ``τᵢ = Wᵢ − W₀`` and its bias delta.  Inputs are
routed without any training: expert ``i``'s logit is the norm of the input's projection on its
top ``gate_k`` right singular vectors (an input that lies in the subspace a fine-tune changed
goes to that expert), the ``top_k`` best are mixed by the softmax of their logits.  Every other
parameter stays at the base (``others: base``) or is the simple average of the fine-tuned models
(``others: average``).  With one model, ``top_k = 1`` and a full rank, a layer reproduces the
fine-tuned layer exactly.

Defaults follow FusionBench 0.2.33 (``config/method/smile_upscaling/smile_upscaling.yaml``,
``SmileUpscalingAlgorithm``, ``models/smile_moe/linear_from_module.py``): ``k`` (rank) 128,
``gate_k`` 1, ``top_k`` 1, routing on the task vectors' singular vectors, non-linear modules left
at the base (``average_experts: false``).  fuse's earlier defaults: rank 32, gate_k 16,
``others: average``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

import attrs

from fusion_core import Capabilities, InputError, option, positive

from .common import AdaptiveMethod, float_params, note, prepare, progress
from .modules import key as pkey
from .modules import select_modules, set_submodule, weight_out_in

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fusion_core import ModelPool, RunContext


SPECTRUM_FLOOR = 1e-6
"""The Gram route is used when the k-th kept singular value is at least this fraction of the largest (else LAPACK's SVD)."""


def gram_factors(delta: "torch.Tensor", k: int) -> tuple["torch.Tensor", "torch.Tensor"] | None:
    """``(U_k·S_k, V_k)`` of ``delta`` (``(out, in)``) from the eigendecomposition of its smaller Gram matrix, in float64.

    For ``A`` (``m × n``, ``m ≥ n``; ``delta`` or its transpose): ``AᵀA = V S² Vᵀ`` and ``U S = A V``.  One
    ``n × n`` symmetric eigendecomposition instead of an SVD of the rectangle (3 to 6 times faster on CPU for
    ViT-B/32's MLP layers), exact to float32 rounding while the kept singular values stay above
    :data:`SPECTRUM_FLOOR` × the largest; returns ``None`` otherwise (a rank-deficient or zero ``delta``).
    """
    import torch

    x = delta.double()
    wide = x.shape[0] < x.shape[1]
    a = x.t() if wide else x
    values, vectors = torch.linalg.eigh(a.t() @ a)  # ascending
    values, vectors = values.flip(0)[:k], vectors.flip(1)[:, :k]
    if not bool(values[0] > 0) or bool(values[-1] <= SPECTRUM_FLOOR**2 * values[0]):
        return None
    av = a @ vectors  # U_a S
    if not wide:
        return av, vectors
    s = values.sqrt()  # delta = aᵀ = V_a S U_aᵀ: its U S is V_a S, its V is U_a = a V_a / S
    return vectors * s, av / s


def low_rank_factors(delta: "torch.Tensor", rank: int | None, gate_k: int, svd: str = "gram") -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """``(U·S, V, V_gate)`` of the rank-``rank`` SVD of ``delta`` (``(out, in)``): ``(out, k)``, ``(in, k)``, ``(in, g)``.

    ``svd="gram"``: :func:`gram_factors` (float64), LAPACK's SVD where it declines; ``svd="lapack"``: LAPACK's
    thin SVD in the tensor's precision (float32 or float64; half precisions in float32), as FusionBench's.
    Singular vectors are defined up to sign: ``U·S·Vᵀ`` and the routing norms do not depend on it.
    """
    import torch

    work = delta if delta.dtype in (torch.float32, torch.float64) else delta.float()
    n = min(work.shape)
    k = n if rank is None else min(rank, n)
    g = min(gate_k, n)
    factors = gram_factors(work, max(k, g)) if svd == "gram" and work.device.type != "mps" else None  # mps: no float64
    if factors is None:
        u, s, vh = torch.linalg.svd(work, full_matrices=False)
        factors = (u * s, vh.t())
    us, v = factors
    dtype = delta.dtype
    return us[:, :k].contiguous().to(dtype), v[:, :k].contiguous().to(dtype), v[:, :g].contiguous().to(dtype)


class Smile(AdaptiveMethod):
    """SMILE upscaling (Tang et al., 2024)."""

    name = "smile"
    summary = "Upscales linear layers into a sparse mixture of low-rank (SVD) task-vector experts, routed zero-shot by subspace projection."
    reference_url = "https://arxiv.org/abs/2408.10174"
    fusionbench_config = "smile_upscaling/smile_upscaling.yaml"
    capabilities: ClassVar[Capabilities] = Capabilities(needs_base=True)

    @attrs.frozen
    class Config:
        target_modules: list[str] | None = option(None, help="glob patterns of the linear layers to upscale; null = every linear layer")
        rank: int | None = option(128, help="rank k kept of each task vector's SVD (FusionBench k 128; null = full rank)", validator=positive)
        gate_k: int = option(1, help="right singular vectors per expert used for routing (FusionBench 1)", validator=positive)
        top_k: int = option(1, help="experts mixed per input row", validator=positive)
        svd: Literal["gram", "lapack"] = option(
            "gram", help="'gram': top singular vectors from the float64 eigendecomposition of the smaller Gram matrix (exact to "
                         "float32 rounding, several times faster; LAPACK where the kept spectrum nears 0); 'lapack': LAPACK's SVD "
                         "(FusionBench)"
        )
        others: Literal["base", "average"] = option(
            "base", help="parameters outside the upscaled layers: 'base' (FusionBench average_experts: false) or 'average' of the "
                         "fine-tuned models (fuse's earlier default)"
        )

    def run(self, pool: "ModelPool", ctx: "RunContext") -> Any:
        import torch

        from .layers import SmileLinear

        cfg, names = self.config, list(pool.model_names)
        if cfg.top_k > len(names):
            raise InputError(f"method {self.name!r}: top_k={cfg.top_k} but the pool has only {len(names)} model(s) (experts)")
        base = prepare(pool.load_model(None), ctx.device)
        targets = select_modules(base, cfg.target_modules, method=self.name, field="target_modules")
        base_params = float_params(base)
        owned = {pkey(t, p) for t, m in targets.items() for p, _ in m.named_parameters()}
        sums = {k: torch.zeros_like(v) for k, v in base_params.items() if k not in owned} if cfg.others == "average" else {}
        factors: dict[str, list] = {t: [] for t in targets}
        for name in progress(ctx, names, f"SVD of task vectors ({self.name})", total=len(names), unit="model"):
            model = pool.load_model(name)
            params = dict(model.named_parameters())
            with torch.no_grad():
                for key in sums:
                    sums[key] += params[key].detach().to(ctx.device, sums[key].dtype)
                for target, module in targets.items():
                    w = weight_out_in(module, params[pkey(target, "weight")].detach().to(ctx.device))
                    delta = w - weight_out_in(module)
                    bias = params.get(pkey(target, "bias"))
                    bias_delta = None if bias is None else bias.detach().to(ctx.device) - module.bias
                    factors[target].append((*low_rank_factors(delta, cfg.rank, cfg.gate_k, cfg.svd), bias_delta))
            del model, params
        if cfg.others == "average":
            with torch.no_grad():
                for key, total in sums.items():
                    base_params[key].copy_(total / len(names))
        ranks = {}
        for target, module in targets.items():
            parts = factors.pop(target)
            up, down, gate = (torch.stack([p[j] for p in parts]) for j in range(3))
            bias_delta = None if parts[0][3] is None else torch.stack([p[3] for p in parts])
            base = set_submodule(base, target, SmileLinear(module, up, down, gate, bias_delta, top_k=cfg.top_k))
            ranks[target] = int(up.shape[-1])
        base.eval()
        note(ctx, self.name, upscaled=list(targets), rank=sorted(set(ranks.values())), experts=names)
        return base


METHODS = [Smile]
