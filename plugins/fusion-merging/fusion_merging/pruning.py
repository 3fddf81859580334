"""Pruning of linear layers: magnitude and random (data-free kernels); the masks Wanda shares.

FusionBench 0.2.33's conventions (``method/pruning/prune_utils.py``, ``config/method/pruning/*.yaml``):

- **unstructured** (``sparsity_ratio`` r): in each row of a weight stored ``(out, in)``, the
  ``⌊in·r⌋`` lowest-scoring entries are zeroed (a stable ascending sort: among equal scores the
  lower column index goes first), so every row, and the whole weight, has exactly that fraction
  of zeros;
- **semistructured** (``n:m``): in each row, every group of ``m`` consecutive columns has its
  ``n`` lowest-scoring entries zeroed ("2:4 means 2 out of 4 weights are pruned", FusionBench's
  yaml); a last group narrower than ``m`` loses ``min(n, width)`` entries (FusionBench needs
  ``width ≥ n`` there).

Scores: ``|W|`` (magnitude), uniform draws (random; seeded by run seed and tensor name), or
Wanda's ``|W|·‖X‖`` (:mod:`fusion_adaptive.wanda`).  Which tensors are "linear layers" is
decided by name (FusionBench: the ``nn.Linear`` modules of the decoder blocks): 2-D
``*.weight`` tensors inside numbered blocks, minus embeddings and heads.

Which model is pruned (``target``): FusionBench prunes one model, the pretrained model of the
pool or its first model when there is none (``target: base``, the default; every task is then
scored with that pruned model).  On a pool of fine-tuned models ``target: each`` prunes every
fine-tuned model and scores each on its own task (output *per task*, as EMR-Merging's): the row
"individual at this sparsity" that a leaderboard compares merges with; the data-driven methods
(Wanda, SparseGPT) then calibrate each model on its own task's data.  ``fuse merge`` writes one
model, so there ``target: each`` is refused for more than one input.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import attrs

from fusion_core import Capabilities, InputError, KernelContext, KernelMethod, in_range, option, positive

if TYPE_CHECKING:  # pragma: no cover
    import torch

PRUNE_TYPES = ("unstructured", "semistructured")
TARGETS = ("base", "each")
DEFAULT_INCLUDE = r"\.\d+\.(.+\.)?weight$"
DEFAULT_EXCLUDE = r"embed|lm_head|relative_attention_bias|wte|wpe"


def unstructured_mask(scores: "torch.Tensor", sparsity_ratio: float) -> "torch.Tensor":
    """True where an entry is pruned: per row the ⌊cols·r⌋ lowest scores (stable: lower column first on ties)."""
    import torch

    rows = scores.reshape(scores.shape[0], -1)
    k = int(rows.shape[1] * sparsity_ratio)
    mask = torch.zeros(rows.shape, dtype=torch.bool, device=rows.device)
    if k > 0:
        order = torch.sort(rows, dim=-1, stable=True).indices[:, :k]
        mask.scatter_(1, order, True)
    return mask.reshape(scores.shape)


def semistructured_mask(scores: "torch.Tensor", n: int, m: int) -> "torch.Tensor":
    """True where an entry is pruned: per row, the n lowest scores of each group of m consecutive columns."""
    import torch

    rows = scores.reshape(scores.shape[0], -1)
    mask = torch.zeros(rows.shape, dtype=torch.bool, device=rows.device)
    cols = rows.shape[1]
    full = cols - cols % m
    if full and n:
        groups = rows[:, :full].reshape(rows.shape[0], full // m, m)
        order = torch.sort(groups, dim=-1, stable=True).indices[..., :n]
        mask[:, :full] = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True).reshape(rows.shape[0], full)
    if full < cols and n:
        tail = rows[:, full:]
        order = torch.sort(tail, dim=-1, stable=True).indices[:, : min(n, cols - full)]
        mask[:, full:] = torch.zeros_like(tail, dtype=torch.bool).scatter_(1, order, True)
    return mask.reshape(scores.shape)


def pruned_mask(scores: "torch.Tensor", config) -> "torch.Tensor":
    """The mask of ``config.prune_type`` (fields ``sparsity_ratio``, ``n``, ``m``)."""
    if config.prune_type == "unstructured":
        return unstructured_mask(scores, config.sparsity_ratio)
    return semistructured_mask(scores, config.n, config.m)


def _check_n_m(instance, attribute, value) -> None:
    if instance.n > instance.m:
        raise ValueError(f"n ({instance.n}) must not exceed m ({instance.m}): n of every m consecutive weights are pruned")


def _regex(instance, attribute, value) -> None:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"{attribute.name}: {value!r} is not a regular expression ({exc})") from None


@attrs.frozen
class PruneConfig:
    """The fields every pruning method shares (FusionBench ``config/method/pruning/llama_*_pruning.yaml``)."""

    prune_type: Literal["unstructured", "semistructured"] = option(
        "unstructured",
        help="unstructured = ⌊in·sparsity_ratio⌋ lowest-scoring weights zeroed per row; semistructured = n of every m consecutive "
        "weights of a row zeroed (N:M)",
        validator=attrs.validators.in_(PRUNE_TYPES),
    )
    sparsity_ratio: float = option(
        0.5, help="fraction of each row's weights zeroed (unstructured); 1 prunes everything", validator=in_range(0.0, 1.0)
    )
    n: int = option(2, help="weights zeroed in each group of m (semistructured; FusionBench: '2:4 means 2 out of 4 pruned')",
                    validator=[attrs.validators.ge(0)])
    m: int = option(4, help="group width (semistructured)", validator=[positive, _check_n_m])
    include: str = option(
        DEFAULT_INCLUDE,
        help="regex (re.search) on tensor names: which 2-D weights are linear layers to prune (default: weights inside numbered "
        "blocks, as FusionBench's decoder layers); every other tensor is copied",
        validator=_regex,
    )
    exclude: str = option(DEFAULT_EXCLUDE, help="regex of tensor names never pruned (embeddings, heads)", validator=_regex)
    target: Literal["base", "each"] = option(
        "base", help="base = FusionBench's: prune the pool's base (or its only model) and score every task with it; each = prune "
                     "every fine-tuned model and score each on its own task (per-task output: 'individual at this sparsity')",
        validator=attrs.validators.in_(TARGETS))


def check_target(method: str, config, n_models: int, has_base: bool) -> None:
    """The model counts ``config.target`` needs: one model to prune (``base``), at least one fine-tuned model (``each``)."""
    if config.target == "each":
        if n_models == 0:
            raise InputError(f"method {method!r} with target: each prunes every fine-tuned model; the pool has none")
    elif not has_base and n_models != 1:
        raise InputError(f"method {method!r} prunes one model: give it as the base (--base) or as the only model, got "
                         f"{n_models} model(s) and no base (target: each prunes every model, each scored on its own task)")


def pruned_per_task(config, pool: Any, prune: "Callable[[str | None], Any]") -> Any:
    """The output of a pruning method: :class:`~fusion_core.adapters.PerTaskModels`.

    ``prune(name)`` prunes model ``name`` of the pool (``None``: the base).  ``target: base``: the
    base (or the only model) pruned, every task scored with it; ``target: each``: every
    fine-tuned model pruned when its task is scored (one alive at a time), the first one kept as
    the run's model (saved with ``save_model``).
    """
    from fusion_core.adapters import PerTaskModels

    if config.target == "base":
        shared = prune(None if pool.has_base else pool.model_names[0])
        return PerTaskModels(shared, lambda task: shared, [])
    names = list(pool.model_names)
    first = prune(names[0])
    return PerTaskModels(first, lambda task: first if task == names[0] else prune(task), names)


def record_sparsity(ctx: Any, method: str, target: str | None, sparsity: dict[str, float], **extra: Any) -> None:
    """Each pruned layer's fraction of zeros in the report: ``sparsity`` of the first model pruned, and per model."""
    info = ctx.extras.setdefault(method, {})
    if "sparsity" not in info:
        info.update(layers_pruned=len(sparsity), sparsity=sparsity, **extra)
    if target is not None:
        info.setdefault("per_model", {})[target] = {"layers_pruned": len(sparsity), **extra,
                                                    "mean_sparsity": sum(sparsity.values()) / max(1, len(sparsity))}


def selected(name: str, tensor: "torch.Tensor", config) -> bool:
    """Whether tensor ``name`` is a linear weight that ``config`` prunes."""
    return tensor.dim() == 2 and bool(re.search(config.include, name)) and not (config.exclude and re.search(config.exclude, name))


class _OneModel:
    """Model ``name`` of ``pool`` (``None``: its base) seen as a pool of that one model and no base (what the kernel prunes)."""

    has_base = False

    def __init__(self, pool: Any, name: str | None) -> None:
        self.pool, self.name = pool, name

    @property
    def model_names(self) -> list[str]:
        return [self.name or "base"]

    def reader(self, name: str | None = None) -> Any:
        return self.pool.reader(self.name)


class _Pruning(KernelMethod):
    """Prunes the base (FusionBench's pretrained model) or, without one, the only model; or each model (``target: each``)."""

    capabilities: ClassVar[Capabilities] = Capabilities(needs_base=False, output="per_task")
    min_models = 0
    Config = PruneConfig

    def check_inputs(self, n_models: int, has_base: bool) -> None:
        super().check_inputs(n_models, has_base)
        check_target(self.name, self.config, n_models, has_base)

    def scores(self, target: "torch.Tensor", ctx: KernelContext) -> "torch.Tensor":
        raise NotImplementedError

    def run(self, pool: Any, ctx: Any) -> Any:
        """Per-task models (:func:`pruned_per_task`), each pruned by the engine in memory; each one's sparsity in the report."""
        return pruned_per_task(self.config, pool, lambda name: self._prune(pool, ctx, name))

    def _prune(self, pool: Any, ctx: Any, name: str | None) -> dict[str, "torch.Tensor"]:
        out = super().run(_OneModel(pool, name), ctx)  # the engine's in-memory merge of that model alone
        sparsity = {key.removesuffix(".weight"): float((tensor == 0).float().mean()) for key, tensor in out.items()
                    if selected(key, tensor, self.config)}
        record_sparsity(ctx, self.name, name if self.config.target == "each" else None, sparsity)
        return out

    def kernel(self, name: str, base: "torch.Tensor | None", tensors: Sequence["torch.Tensor"], ctx: KernelContext) -> "torch.Tensor":
        if self.config.target == "each" and (base is not None or len(tensors) != 1):
            raise InputError(f"method {self.name!r}: target: each makes one pruned model per fine-tuned model, scored per task by "
                             "`fuse run`; a merge writes one model: use target: base")
        target = base if base is not None else tensors[0]
        if not selected(name, target, self.config):
            return target
        return target.masked_fill(pruned_mask(self.scores(target, ctx), self.config), 0)


class MagnitudePruning(_Pruning):
    """Zero the smallest-magnitude weights of each linear layer, row by row (unstructured or N:M)."""

    name = "magnitude_pruning"
    summary = "Prunes linear layers by |W|, row by row: a fraction per row (unstructured) or n of every m (N:M)."
    reference_url = "https://arxiv.org/abs/1506.02626"
    fusionbench_config = "pruning/llama_magnitude_pruning.yaml"

    def scores(self, target: "torch.Tensor", ctx: KernelContext) -> "torch.Tensor":
        return target.abs()


class RandomPruning(_Pruning):
    """Zero random weights of each linear layer, with FusionBench's per-row counts; draws seeded by (seed, tensor name).

    The draws depend on the run seed and the tensor's name only, not on the model: with ``target:
    each`` every fine-tuned model loses the same positions (one random mask, applied to each
    expert), and another run seed draws another mask.
    """

    name = "random_pruning"
    summary = "Prunes linear layers at random (seeded per tensor), with the same per-row counts as magnitude pruning."
    reference_url = "https://github.com/tanganke/fusion_bench/blob/main/fusion_bench/method/pruning/llama_random_prune.py"
    fusionbench_config = "pruning/llama_random_pruning.yaml"
    capabilities: ClassVar[Capabilities] = Capabilities(needs_base=False, random=True, output="per_task")

    def scores(self, target: "torch.Tensor", ctx: KernelContext) -> "torch.Tensor":
        return ctx.rand_like(target, salt="random_pruning")


METHODS = [MagnitudePruning, RandomPruning]
