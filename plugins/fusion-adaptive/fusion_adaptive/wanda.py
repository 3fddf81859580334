"""Wanda pruning (Sun et al., 2023): zero the weights with the smallest |W|·‖X‖, row by row.

For a linear layer with weight ``W`` ``(out, in)`` and calibration inputs ``X`` (every row that
reaches the layer), the score of ``W_ij`` is ``|W_ij| · ‖X_{:,j}‖₂``.  The masks are those of
:mod:`fusion_merging.pruning` (FusionBench 0.2.33 ``WandaPruningForLlama`` with
``prune_utils``): per row, the ⌊in·sparsity_ratio⌋ lowest scores (``unstructured``) or the
``n`` lowest of every ``m`` consecutive weights (``semistructured``).  The column norms are
collected with RegMean's forward-hook collector (:class:`fusion_adaptive.regmean.GramCollector`,
keeping only the diagonal ``Σ x_j²``).

FusionBench prunes the transformer blocks one after the other: the inputs of block ``l`` come
through the blocks ``< l`` already pruned (``sequential: true``, here as one forward pass of the
model per block — identical inputs); ``sequential: false`` scores every layer on the dense
model.  The calibration inputs are the pool's own batches (``ModelPool.data(model, split)``, of
every model in the pool) where FusionBench reads 128 C4 sequences; the model pruned is the
pool's base (FusionBench's pretrained model), or without one its only model.  FusionBench divides
``Σ x²`` by the number of sequences; a constant factor per layer does not change any mask.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar

import attrs
from fusion_merging.pruning import PruneConfig

from fusion_core import Capabilities, InputError, option, positive

from .common import AdaptiveMethod, prepare, progress, tied_aliases, to_device
from .modules import key as pkey
from .modules import linear_layers, transposed, weight_out_in
from .regmean import GramCollector, batch_inputs, find_blocks

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fusion_core import ModelPool, RunContext


class SquaredNormCollector(GramCollector):
    """RegMean's input collector keeping only ``Σ x_j²`` per input feature (``mean_gram`` → ``Σx²/rows``)."""

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).to(self.dtype)
            sq = (x * x).sum(dim=0)
            self.grams[name] = self.grams[name] + sq if name in self.grams else sq
            self.rows[name] += int(x.shape[0])

        return hook

    def column_norms(self, name: str) -> "torch.Tensor | None":
        """``‖X_{:,j}‖₂`` over every row seen (``None`` when no input reached the layer)."""
        return None if self.rows[name] == 0 else self.grams[name].sqrt()


def wanda_scores(weight_out_in: "torch.Tensor", column_norms: "torch.Tensor") -> "torch.Tensor":
    """``|W_ij| · ‖X_j‖`` for a weight ``(out, in)`` and the input column norms ``(in,)``."""
    return weight_out_in.abs() * column_norms.reshape(1, -1).to(weight_out_in.dtype)


class WandaPruning(AdaptiveMethod):
    """Prune linear layers by |W|·‖X‖ with calibration inputs from the pool (unstructured or N:M)."""

    name = "wanda_pruning"
    summary = "Wanda: prunes linear layers by |W|·‖X‖ (inputs from the pool's data), per row or n of every m; block by block."
    reference_url = "https://arxiv.org/abs/2306.11695"
    fusionbench_config = "pruning/llama_wanda_pruning.yaml"
    capabilities: ClassVar[Capabilities] = Capabilities(needs_data=True, output="per_task")
    min_models: ClassVar[int] = 0

    @attrs.frozen
    class Config(PruneConfig):
        num_batches: int | None = option(8, help="calibration batches read per model of the pool (null = all); FusionBench: "
                                                 "128 C4 sequences", validator=positive)
        split: str = option("train", help="the model pool's data split whose inputs calibrate (labels are not used)")
        sequential: bool = option(True, help="score block l on inputs through the already pruned blocks < l (FusionBench); "
                                             "false: every layer on the dense model's inputs")

    def check_inputs(self, n_models: int, has_base: bool) -> None:
        from fusion_merging.pruning import check_target

        super().check_inputs(n_models, has_base)
        check_target(self.name, self.config, n_models, has_base)
        if n_models == 0:
            raise InputError(f"method {self.name!r} reads calibration inputs from the pool's models' data; the pool has no model")

    def _batches(self, pool: "ModelPool", ctx: "RunContext", names: "Iterable[str]") -> list:
        from fusion_core.adapters import require_data

        out = []
        for name in names:
            data: Iterable = require_data(pool, name, self.config.split, method=self.name)
            for index, batch in enumerate(data):
                if self.config.num_batches is not None and index >= self.config.num_batches:
                    break
                out.append(to_device(batch_inputs(batch), ctx.device))
        if not out:
            raise InputError(f"method {self.name!r}: the {self.config.split!r} data of the pool gave no batches")
        return out

    def _groups(self, model: Any, layers: dict[str, Any]) -> list[list[str]]:
        """The layers pruned together: one group per block (in block order) with ``sequential``, else one group."""
        if not self.config.sequential:
            return [list(layers)]
        blocks = find_blocks(model)
        groups: dict[str, list[str]] = {}
        for name in layers:
            owner = next((b for b in blocks if name.startswith(b + ".")), name)
            groups.setdefault(owner, []).append(name)
        order = {b: i for i, b in enumerate(blocks)}
        return [groups[k] for k in sorted(groups, key=lambda k: (order.get(k, -1), list(groups).index(k)))]

    def collector(self, targets: dict[str, Any], dtype: "torch.dtype") -> GramCollector:
        """The forward hooks gathering what :meth:`prune_layer` needs of the inputs of ``targets``."""
        return SquaredNormCollector(targets, with_bias=False, dtype=dtype)

    def prune_layer(self, name: str, module: Any, stats: Any, dtype: "torch.dtype") -> bool:
        """Prune ``module`` in place from the collected ``stats``; False when no input reached it (left as it is)."""
        from fusion_merging.pruning import pruned_mask

        col = stats.column_norms(name)
        if col is None:
            return False
        mask = pruned_mask(wanda_scores(weight_out_in(module), col), self.config)
        module.weight.masked_fill_(mask.t() if transposed(module) else mask, 0)
        return True

    def run(self, pool: "ModelPool", ctx: "RunContext") -> Any:
        """Per-task models (``fusion_merging.pruning.pruned_per_task``): the base (or the only model) calibrated on
        every model's data, or (``target: each``) each fine-tuned model on its own task's data."""
        from fusion_merging.pruning import pruned_per_task

        if self.config.target == "base":
            return pruned_per_task(self.config, pool, lambda name: self._prune(pool, ctx, name, pool.model_names))
        return pruned_per_task(self.config, pool, lambda name: self._prune(pool, ctx, name, [name]))

    def _prune(self, pool: "ModelPool", ctx: "RunContext", target: str | None, calibration: "Iterable[str]") -> dict[str, "torch.Tensor"]:
        """Model ``target`` of the pool (``None``: the base) pruned with inputs from the data of the models ``calibration``."""
        import torch
        from fusion_merging.pruning import record_sparsity, selected

        cfg = self.config
        batches = self._batches(pool, ctx, calibration)
        model = prepare(pool.load_model(target), ctx.device)
        layers = {n: m for n, m in linear_layers(model).items() if selected(pkey(n, "weight"), m.weight, cfg)}
        if not layers:
            raise InputError(f"method {self.name!r}: no linear layer matches include={cfg.include!r} / exclude={cfg.exclude!r}; "
                             f"layers: {', '.join(list(linear_layers(model))[:10])}")
        sparsity, unreached = {}, []
        groups = self._groups(model, layers)
        for group in progress(ctx, groups, f"pruning ({self.name})", total=len(groups), unit="block"):
            targets = {n: layers[n] for n in group}
            dtype = torch.float64 if any(m.weight.dtype == torch.float64 for m in targets.values()) else torch.float32
            with self.collector(targets, dtype) as stats, torch.no_grad():
                for inputs in batches:
                    pool.forward(model, inputs)
            with torch.no_grad():
                for n, module in targets.items():
                    if not self.prune_layer(n, module, stats, dtype):
                        unreached.append(n)
                        continue
                    sparsity[n] = float((module.weight == 0).float().mean())
        record_sparsity(ctx, self.name, target if cfg.target == "each" else None, sparsity, layers_without_inputs=unreached,
                        calibration_batches=len(batches))
        out = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
        for alias, source in tied_aliases(model).items():
            out[alias] = out[source]
        return out


METHODS = [WandaPruning]
