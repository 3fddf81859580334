"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning with optimal-brain-surgeon weight updates.

For a linear layer ``W`` (``(rows, cols)`` = ``(out, in)``) and its calibration inputs ``X``, the
Hessian of the layer-wise reconstruction error is ``H ∝ XᵀX`` (here the Gram of every input row
that reaches the layer, collected with RegMean's hooks; the scale does not change the result).
With ``H`` damped by ``percdamp · mean(diag H)`` on its diagonal (columns no input reaches are
zeroed and given ``H_jj = 1``) and ``U`` the upper Cholesky factor of ``H⁻¹``, the columns are
visited left to right in blocks of ``blocksize``:

- the mask of a block is chosen from ``W_ij² / U_jj²`` (the OBS saliency): ``unstructured``, the
  ``⌊rows · width · sparsity_ratio⌋`` lowest of the block (``exact_count: false``: every entry
  ``≤`` the one at that index of the sorted block, one more per block as the SparseGPT reference
  code and FusionBench do); ``semistructured``, per row the ``n`` lowest of every ``m`` columns,
  decided when the group's first column is reached (from the weights updated so far);
- column ``j`` is zeroed where masked, and its error ``(w − q)/U_jj`` is spread over the columns
  right of it through row ``j`` of ``U`` (within the block at once, then the rest of the matrix
  once the block is done).

The result is exact sparsity (a test counts the zeros) with the surviving weights corrected
for the pruned ones.  FusionBench 0.2.33 (``SparseGPTPruningForLlama``,
``config/method/pruning/llama_sparsegpt_pruning.yaml``: sparsity 0.5, 2:4, blocksize 128,
percdamp 0.01) prunes the decoder blocks one after the other on 128 C4 windows; here, as for
Wanda (:mod:`fusion_adaptive.wanda`, whose block loop and calibration batches this shares),
block ``l`` is calibrated on inputs through the already pruned blocks ``< l`` (``sequential``) and
the inputs are the pool's data (for causal LMs, windows of the texts of ``modelpool.datasets``).
FusionBench's ``prune_type`` is ignored by its SparseGPT class (``n:m`` is applied whenever
``n > 0``); here ``prune_type`` chooses, as for the other pruning methods.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from fusion_core import in_range, option, positive

from .modules import transposed, weight_out_in
from .regmean import GramCollector
from .wanda import WandaPruning

if TYPE_CHECKING:  # pragma: no cover
    import torch


def block_mask(scores: "torch.Tensor", sparsity: float, exact: bool) -> "torch.Tensor":
    """True where the unstructured mask of one column block prunes (``scores``: the block's OBS saliencies)."""
    import torch

    flat = scores.flatten()
    k = int(flat.numel() * sparsity)
    if exact or k >= flat.numel():
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[torch.sort(flat, stable=True).indices[:k]] = True
        return mask.reshape(scores.shape)
    return scores <= torch.sort(flat)[0][k]


def sparsegpt_weight(weight: "torch.Tensor", gram: "torch.Tensor", *, prune_type: str, sparsity: float, n: int, m: int,
                     blocksize: int = 128, percdamp: float = 0.01, exact: bool = True) -> "torch.Tensor":
    """The SparseGPT-pruned and corrected ``(rows, cols)`` weight given the input Gram ``(cols, cols)``."""
    import torch

    w = weight.clone()
    h = gram.clone().to(w.dtype)
    cols = w.shape[1]
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    index = torch.arange(cols, device=w.device)
    h[index, index] += percdamp * torch.mean(torch.diagonal(h))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        d = torch.diagonal(hinv1)
        q1, err1 = torch.zeros_like(w1), torch.zeros_like(w1)
        if prune_type == "unstructured":
            mask1 = block_mask(w1**2 / d.reshape(1, -1) ** 2, sparsity, exact)
        else:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if prune_type != "unstructured" and n and i % m == 0:
                group = w1[:, i : i + m] ** 2 / d[i : i + m].reshape(1, -1) ** 2
                mask1.scatter_(1, i + torch.topk(group, min(n, group.shape[1]), dim=1, largest=False)[1], True)
            column = w1[:, i]
            q = column.masked_fill(mask1[:, i], 0)
            q1[:, i] = q
            err = (column - q) / d[i]
            w1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w


class SparseGPTPruning(WandaPruning):
    """Prune linear layers by OBS saliency with second-order weight updates, calibrated on the pool's data (unstructured or N:M)."""

    name = "sparsegpt_pruning"
    summary = "SparseGPT: prunes linear layers by W²/[H⁻¹]² and updates the kept weights (inputs from the pool's data); block by block."
    reference_url = "https://arxiv.org/abs/2301.00774"
    fusionbench_config = "pruning/llama_sparsegpt_pruning.yaml"

    @attrs.frozen
    class Config(WandaPruning.Config):
        blocksize: int = option(128, help="columns whose mask is chosen together (FusionBench / the reference code: 128)", validator=positive)
        percdamp: float = option(0.01, help="dampening added to H's diagonal, as a fraction of its mean diagonal (FusionBench: 0.01)",
                                 validator=in_range(0.0, 10.0))
        exact_count: bool = option(True, help="unstructured: prune exactly ⌊block size · sparsity_ratio⌋ weights per block; false: the "
                                              "reference rule (scores ≤ the one at that rank: one more per block, ties too)")

    def collector(self, targets: dict[str, Any], dtype: "torch.dtype") -> GramCollector:
        return GramCollector(targets, with_bias=False, dtype=dtype)

    def prune_layer(self, name: str, module: Any, stats: Any, dtype: "torch.dtype") -> bool:
        if stats.rows[name] == 0:
            return False
        cfg = self.config
        pruned = sparsegpt_weight(weight_out_in(module).to(dtype), stats.grams[name], prune_type=cfg.prune_type,
                                  sparsity=cfg.sparsity_ratio, n=cfg.n, m=cfg.m, blocksize=cfg.blocksize, percdamp=cfg.percdamp,
                                  exact=cfg.exact_count)
        module.weight.copy_((pruned.t() if transposed(module) else pruned).to(module.weight.dtype))
        return True


METHODS = [SparseGPTPruning]
