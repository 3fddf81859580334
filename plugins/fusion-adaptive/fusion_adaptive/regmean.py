"""RegMean and RegMean++: per linear layer, the weight that best reproduces every model's outputs on its own inputs.

For a linear layer with weights ``Wᵢ`` (written ``(in, out)``, i.e. ``nn.Linear.weight.T``) and
inputs ``Xᵢ`` (the rows reaching that layer on model ``i``'s training batches), RegMean solves

    min_W  Σᵢ ‖Xᵢ W − Xᵢ Wᵢ‖²   ⇒   W* = (Σᵢ Gᵢ)⁻¹ Σᵢ Gᵢ Wᵢ,   Gᵢ = XᵢᵀXᵢ / nᵢ

(Gram matrices are averaged over each model's rows so that every task counts the same).
``reduce_non_diagonal_ratio`` α shrinks the off-diagonal entries of each ``Gᵢ`` (``α·G +
(1−α)·diag(G)``; α = 0 gives a per-input-feature weighted average).  The solve uses a
pseudo-inverse around the average, ``W* = W̄ + (ΣGᵢ)⁺ Σᵢ Gᵢ (Wᵢ − W̄)``, equal to the closed form when
``ΣGᵢ`` is invertible and falling back to the average along input directions no data reached.
Biases are averaged (``bias: average``) or solved with the weight by appending a constant-1
input feature (``bias: regression``).  Every other tensor is averaged.

RegMean++ differs in the inputs: the Gram matrices of model ``i`` are computed on model ``i``'s
data passed through the *merged* parts of the network below, so each part accounts for the
errors of the merged parts before it.  ``granularity``:

- ``block`` (default; FusionBench 0.2.33 ``RegMeanAlgorithmPlusPlus`` /
  ``RegMeanAlgorithmForCLIPPlusPlus``): the transformer blocks (the children of the model's
  longest ``ModuleList`` of modules holding linear layers) are merged one after the other.  The
  modules that run before the first block (embeddings, pre-norm) are averaged; block ``l``'s
  input for model ``i`` is model ``i``'s data through the averaged prefix and the merged blocks
  ``< l``; inside block ``l`` the Grams of every linear layer come from model ``i``'s own block
  ``l`` on that input; the block's linear weights are solved, its other tensors averaged.
  Modules that run after the last block (CLIP's ``post_layernorm``) keep the base's values
  (``after_blocks: base``, as FusionBench, whose merged model starts from the pretrained one) or
  are averaged (``after_blocks: average``).  A model without such blocks is merged layer by layer
  (noted in the report).
- ``layer`` (fuse's earlier default): every linear layer is a step, in execution order (recorded
  from one forward pass), its Grams computed through the merged linear layers before it; every
  other tensor is averaged.  Needs no knowledge of the architecture.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import attrs

from fusion_core import Capabilities, InputError, in_range, option, positive

from .common import AdaptiveMethod, note, prepare, progress, tied_aliases, to_device
from .modules import execution_order, select_modules, transposed
from .modules import key as pkey

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fusion_core import ModelPool, RunContext


def batch_inputs(batch: Any) -> Any:
    """The inputs of a data batch: the first item of an ``(inputs, labels)`` pair, else the batch itself."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0]
    return batch


class GramCollector:
    """Forward hooks summing ``XᵀX`` (and counting rows) of the inputs of some linear layers.

    Layers fed the same tensor in one pass (a block's query, key and value projections) share one product; the
    tensor's version counter tells an input changed in place in between (under ``inference_mode``, whose tensors
    have none, every layer computes its own).
    """

    def __init__(self, layers: Mapping[str, Any], *, with_bias: bool, dtype: "torch.dtype") -> None:
        self.layers, self.with_bias, self.dtype = dict(layers), with_bias, dtype
        self.grams: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {name: 0 for name in self.layers}
        self._handles: list = []
        self._last: tuple | None = None  # (input tensor, its XᵀX, its rows, its version): the latest input's product

    def batch_gram(self, inputs: "torch.Tensor") -> tuple["torch.Tensor", int]:
        """``XᵀX`` of one layer input (rows = every leading position), and its number of rows."""
        import torch

        version = None if inputs.is_inference() else inputs._version  # inference tensors have no version counter: no sharing
        if self._last is not None and self._last[0] is inputs and version is not None and self._last[3] == version:
            return self._last[1], self._last[2]
        x = inputs.detach()
        x = x.reshape(-1, x.shape[-1]).to(self.dtype)
        if self.with_bias:
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)
        gram = x.t() @ x
        self._last = (inputs, gram, int(x.shape[0]), version)
        return gram, int(x.shape[0])

    def _hook(self, name: str):
        def hook(module, args):
            gram, rows = self.batch_gram(args[0])
            self.grams[name] = self.grams[name] + gram if name in self.grams else gram
            self.rows[name] += rows

        return hook

    def __enter__(self) -> "GramCollector":
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.layers.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._last = None

    def mean_gram(self, name: str) -> "torch.Tensor | None":
        """``XᵀX / n`` of layer ``name`` (``None`` when no input reached it)."""
        if self.rows[name] == 0:
            return None
        return self.grams[name] / self.rows[name]


def reduce_non_diagonal(gram: "torch.Tensor", ratio: float) -> "torch.Tensor":
    """``ratio·G + (1 − ratio)·diag(G)``: off-diagonal entries scaled by ``ratio``, the diagonal kept."""
    if ratio == 1.0:
        return gram
    out = gram * ratio
    out.diagonal().copy_(gram.diagonal())
    return out


def stacked_weight(is_transposed: bool, state: Mapping[str, "torch.Tensor"], prefix: str, with_bias: bool) -> "torch.Tensor":
    """The layer's weight as ``(in, out)``, with its bias as one more row when ``with_bias``.

    ``is_transposed``: the layer stores its weight ``(in, out)`` (``Conv1D``) rather than ``(out, in)``.
    """
    import torch

    stored = state[pkey(prefix, "weight")]
    w = stored if is_transposed else stored.t()
    if not with_bias:
        return w
    bias = state.get(pkey(prefix, "bias"))
    row = torch.zeros(1, w.shape[1], dtype=w.dtype, device=w.device) if bias is None else bias.reshape(1, -1).to(w.dtype)
    return torch.cat([w, row], dim=0)


def regmean_solve(gram_sum: "torch.Tensor", gram_weight_sum: "torch.Tensor", mean_weight: "torch.Tensor") -> "torch.Tensor":
    """``W̄ + (ΣG)⁺ (ΣGW − ΣG·W̄)`` in float64: the RegMean closed form, the average where no data reached.

    A positive definite ``ΣG`` (every input direction reached) is solved by Cholesky (n³/3 flops); a singular one
    by the pseudo-inverse (an eigendecomposition, many times slower).
    """
    import torch

    g = gram_sum.double()
    factor, info = torch.linalg.cholesky_ex(g)
    if int(info) == 0:  # invertible: W̄ + G⁻¹(ΣGW − G·W̄) = G⁻¹ ΣGW
        solved = torch.cholesky_solve(gram_weight_sum.double(), factor)
        if bool(torch.isfinite(solved).all()):
            return solved
    w_bar = mean_weight.double()
    return w_bar + torch_pinv(g) @ (gram_weight_sum.double() - g @ w_bar)


def torch_pinv(g: "torch.Tensor") -> "torch.Tensor":
    import torch

    return torch.linalg.pinv(g, hermitian=True)


class _Accumulator:
    """Per layer Σ Gᵢ and Σ Gᵢ Wᵢ; per float tensor the plain sum; integer tensors kept from the first model."""

    def __init__(self, ratio: float, with_bias: bool) -> None:
        self.ratio, self.with_bias = ratio, with_bias
        self.gram: dict[str, torch.Tensor] = {}
        self.gram_weight: dict[str, torch.Tensor] = {}
        self.sums: dict[str, torch.Tensor] = {}
        self.fixed: dict[str, torch.Tensor] = {}
        self.layouts: dict[str, bool] = {}
        self.count = 0

    def add_state(self, state: Mapping[str, "torch.Tensor"]) -> None:
        for key, value in state.items():
            value = value.detach()
            if not value.is_floating_point():
                self.fixed.setdefault(key, value)
            else:
                self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
        self.count += 1

    def add_layer(self, name: str, module: Any, gram: "torch.Tensor", state: Mapping[str, "torch.Tensor"]) -> None:
        self.layouts[name] = transposed(module)
        gram = reduce_non_diagonal(gram, self.ratio)
        w = stacked_weight(self.layouts[name], state, name, self.with_bias).to(gram.dtype)
        gw = gram @ w
        if name in self.gram:
            self.gram[name] += gram
            self.gram_weight[name] += gw
        else:
            self.gram[name], self.gram_weight[name] = gram, gw

    def mean(self, key: str) -> "torch.Tensor":
        return self.sums[key] / self.count

    def solve_layer(self, name: str) -> dict[str, "torch.Tensor"]:
        """The merged tensors of layer ``name`` (weight, and bias when solved by regression)."""
        mean_state = {pkey(name, "weight"): self.mean(pkey(name, "weight"))}
        if pkey(name, "bias") in self.sums:
            mean_state[pkey(name, "bias")] = self.mean(pkey(name, "bias"))
        is_transposed = self.layouts[name]
        w_bar = stacked_weight(is_transposed, mean_state, name, self.with_bias)
        solved = regmean_solve(self.gram[name], self.gram_weight[name], w_bar)
        dtype = mean_state[pkey(name, "weight")].dtype
        w_in_out = solved[: w_bar.shape[0] - (1 if self.with_bias else 0)]
        out = {pkey(name, "weight"): (w_in_out if is_transposed else w_in_out.t()).contiguous().to(dtype)}
        if self.with_bias and pkey(name, "bias") in mean_state:
            out[pkey(name, "bias")] = solved[-1].to(dtype)
        return out

    def result(self, merged: Mapping[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
        out = {k: merged[k] if k in merged else v / self.count for k, v in self.sums.items()}
        out.update(self.fixed)
        return out


def _gram_dtype(model: Any) -> "torch.dtype":
    import torch

    return torch.float64 if any(p.dtype == torch.float64 for p in model.parameters()) else torch.float32


class _RegMeanBase(AdaptiveMethod):
    capabilities: ClassVar[Capabilities] = Capabilities(needs_data=True)

    @attrs.frozen
    class Config:
        num_batches: int | None = option(8, help="train batches per model whose layer inputs form the Gram matrices (null = all)", validator=positive)
        split: str = option("train", help="the model pool's data split to read (ModelPool.data(model, split)); labels are not used")
        reduce_non_diagonal_ratio: float = option(
            0.95, help="α in [0, 1]: off-diagonal Gram entries are multiplied by α (1 = exact RegMean, 0 = diagonal only)",
            validator=in_range(0.0, 1.0),
        )
        bias: Literal["average", "regression"] = option(
            "average", help="average the biases, or solve them with the weights (a constant-1 input feature)"
        )
        exclude: list[str] = option(factory=list, help="glob patterns of linear layer names to average instead (e.g. '*classifier*')")

    def _inputs(self, pool: "ModelPool", name: str) -> Iterable:
        from fusion_core.adapters import require_data

        data = require_data(pool, name, self.config.split, method=self.name)
        for index, batch in enumerate(data):
            if self.config.num_batches is not None and index >= self.config.num_batches:
                break
            yield batch_inputs(batch)

    def _note(self, ctx: "RunContext", layers: Sequence[str], solved: Sequence[str]) -> None:
        averaged = [n for n in layers if n not in solved]
        note(ctx, self.name, layers_solved=len(solved), layers_without_inputs=averaged)


class RegMean(_RegMeanBase):
    """Regression mean (Jin et al., 2023): per linear layer the closed-form least-squares merge."""

    name = "regmean"
    summary = "Per linear layer, the least-squares weight over all models' inputs (Gram matrices from train batches)."
    reference_url = "https://arxiv.org/abs/2212.09849"
    fusionbench_config = "regmean/clip_regmean.yaml"

    def run(self, pool: "ModelPool", ctx: "RunContext") -> dict[str, "torch.Tensor"]:
        import torch

        from fusion_core.adapters import require_data

        cfg, names = self.config, list(pool.model_names)
        sizes = [planned_batches(require_data(pool, n, cfg.split, method=self.name), cfg.num_batches) for n in names]  # fails early
        report = ctx.progress(f"Gram matrices ({self.name})", None if None in sizes else sum(sizes), unit="batch")  # type: ignore[arg-type]
        streams = {n: self._inputs(pool, n) for n in names}
        acc = _Accumulator(cfg.reduce_non_diagonal_ratio, cfg.bias == "regression")
        layer_names: list[str] | None = None
        aliases: dict[str, str] = {}
        forward = pool.forward
        for name in names:
            model = prepare(pool.load_model(name), ctx.device)
            layers = select_modules(model, None, method=self.name, field="exclude", exclude=cfg.exclude)
            if layer_names is None:
                layer_names, aliases = list(layers), tied_aliases(model)
            with GramCollector(layers, with_bias=acc.with_bias, dtype=_gram_dtype(model)) as grams, torch.no_grad():
                for inputs in streams[name]:
                    forward(model, to_device(inputs, ctx.device))
                    report.advance()
            state = model.state_dict()
            for layer, module in layers.items():
                gram = grams.mean_gram(layer)
                if gram is not None:
                    acc.add_layer(layer, module, gram, state)
            acc.add_state(state)
            del model, state, grams
        merged: dict[str, torch.Tensor] = {}
        for layer in acc.gram:
            merged.update(acc.solve_layer(layer))
        out = acc.result(merged)
        for alias, source in aliases.items():
            out[alias] = out[source]
        self._note(ctx, layer_names or [], list(acc.gram))
        return {k: v.detach().to("cpu") for k, v in out.items()}


def planned_batches(data: Any, num_batches: int | None) -> int | None:
    """Batches read from ``data``: ``min(len(data), num_batches)``, when ``data`` is sized (else ``num_batches``, or unknown)."""
    if not hasattr(data, "__len__"):
        return num_batches
    return len(data) if num_batches is None else min(len(data), num_batches)


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the input of a block was captured."""


def find_blocks(model: Any) -> list[str]:
    """Names of the transformer blocks: the children of the longest ``ModuleList`` whose children hold linear layers."""
    from .modules import linear_layers

    best: list[str] = []
    for name, module in model.named_modules():
        if type(module).__name__ != "ModuleList":
            continue
        children = [f"{name}.{child}" if name else child for child, sub in module.named_children() if linear_layers(sub)]
        if len(children) > len(best):
            best = children
    return best


def block_inputs(model: Any, block: Any, params: Mapping[str, "torch.Tensor"], batches: Sequence[Any],
                 pool: "ModelPool | None") -> list[tuple[tuple, dict]]:
    """The ``(args, kwargs)`` that ``block`` receives when ``model`` (with ``params`` substituted) runs on each batch."""
    from fusion_core.adapters import functional_forward

    captured: list[tuple[tuple, dict]] = []

    def hook(module, args, kwargs):
        captured.append((tuple(args), dict(kwargs)))
        raise _StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for inputs in batches:
            try:
                functional_forward(model, params, inputs, pool)
            except _StopForward:
                pass
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise InputError(f"RegMean++: a forward pass of the model never reached block {type(block).__name__}; use granularity: layer")
    return captured


class RegMeanPlusPlus(_RegMeanBase):
    """RegMean++ (Nguyen et al., 2025): RegMean whose inputs come through the already merged blocks (or layers)."""

    name = "regmean_plusplus"
    summary = "RegMean block by block (FusionBench), each block's Grams computed on inputs through the merged blocks before it."
    reference_url = "https://arxiv.org/abs/2508.03121"
    fusionbench_config = "regmean_plusplus/clip_regmean_plusplus.yaml"

    @attrs.frozen
    class Config(_RegMeanBase.Config):
        granularity: Literal["block", "layer"] = option(
            "block", help="'block': merge transformer block by block (FusionBench); 'layer': linear layer by linear layer in "
                          "execution order (fuse's earlier default)"
        )
        after_blocks: Literal["base", "average"] = option(
            "base", help="with granularity block, the modules after the last block (e.g. CLIP's post_layernorm): the base's "
                         "values (FusionBench) or the average"
        )

    def run(self, pool: "ModelPool", ctx: "RunContext") -> dict[str, "torch.Tensor"]:
        if self.config.granularity == "block":
            return self._run_blocks(pool, ctx)
        return self._run_layers(pool, ctx)

    def _batches(self, pool: "ModelPool", ctx: "RunContext") -> dict[str, list]:
        names = list(pool.model_names)
        batches = {n: [to_device(x, ctx.device) for x in self._inputs(pool, n)] for n in names}
        for n in names:
            if not batches[n]:
                raise InputError(f"method {self.name!r}: the {self.config.split!r} data of model {n!r} gave no batches")
        return batches

    def _run_blocks(self, pool: "ModelPool", ctx: "RunContext") -> dict[str, "torch.Tensor"]:
        import torch
        from torch.func import functional_call

        cfg, names = self.config, list(pool.model_names)
        batches = self._batches(pool, ctx)
        models = [prepare(pool.load_model(n), ctx.device) for n in names]
        reference = models[0]
        blocks = find_blocks(reference)
        if not blocks:
            note(ctx, self.name, fallback="the model has no ModuleList of blocks holding linear layers: merged layer by layer")
            return self._run_layers(pool, ctx, batches=batches, models=models)
        base_state = None
        if cfg.after_blocks == "base":
            if not pool.has_base:
                raise InputError(f"method {self.name!r} with after_blocks: base needs a base model in the pool; "
                                 "give the pool a base or set after_blocks: average")
            base_state = {k: v.detach() for k, v in prepare(pool.load_model(None), ctx.device).state_dict().items()}
        acc = _Accumulator(cfg.reduce_non_diagonal_ratio, cfg.bias == "regression")
        states = [m.state_dict() for m in models]
        for state in states:
            acc.add_state(state)
        layers = select_modules(reference, None, method=self.name, field="exclude", exclude=cfg.exclude)
        with torch.no_grad():
            order = execution_order(reference, lambda: pool.forward(reference, batches[names[0]][0]))
        in_block = lambda module: any(module == b or module.startswith(b + ".") for b in blocks)  # noqa: E731
        first = next((i for i, m in enumerate(order) if in_block(m)), len(order))
        before = {m for m in order[:first] if not in_block(m)}
        prefix = {}
        for m in before:
            for p, _ in reference.get_submodule(m).named_parameters(recurse=False):
                prefix[pkey(m, p)] = acc.mean(pkey(m, p))
        solved_all: dict[str, torch.Tensor] = {}
        dtype = _gram_dtype(reference)
        with torch.no_grad():
            inputs = [block_inputs(model, model.get_submodule(blocks[0]), prefix, batches[name], pool)
                      for model, name in zip(models, names, strict=True)]
            for index, block_name in enumerate(progress(ctx, blocks, f"merging blocks ({self.name})", total=len(blocks), unit="block")):
                block_layers = {n: m for n, m in layers.items() if n.startswith(block_name + ".")}
                for model, state, captured in zip(models, states, inputs, strict=True):
                    targets = {n: model.get_submodule(n) for n in block_layers}
                    with GramCollector(targets, with_bias=acc.with_bias, dtype=dtype) as grams:
                        block = model.get_submodule(block_name)
                        for args, kwargs in captured:
                            block(*args, **kwargs)
                    for n, module in targets.items():
                        gram = grams.mean_gram(n)
                        if gram is not None:
                            acc.add_layer(n, module, gram, state)
                merged_block = {}
                for n in block_layers:
                    if n in acc.gram:
                        solved = acc.solve_layer(n)
                        solved_all.update(solved)
                        merged_block.update(solved)
                relative = {}
                for p, _ in reference.get_submodule(block_name).named_parameters():
                    key = pkey(block_name, p)
                    relative[p] = merged_block[key].to(ctx.device) if key in merged_block else acc.mean(key)
                if index + 1 < len(blocks):
                    block = reference.get_submodule(block_name)
                    inputs = [[_next_input(functional_call(block, relative, args, kwargs, strict=False), args, kwargs)
                               for args, kwargs in captured] for captured in inputs]
        out = acc.result(solved_all)
        kept = []
        if base_state is not None:
            done = set(before) | {m for m in order if in_block(m)}
            for m, module in reference.named_modules():
                if m in done or in_block(m):
                    continue
                for p, _ in module.named_parameters(recurse=False):
                    key = pkey(m, p)
                    if key in base_state and key in out:
                        out[key] = base_state[key]
                        kept.append(key)
        for alias, source in tied_aliases(reference).items():
            out[alias] = out[source]
        self._note(ctx, list(layers), list(acc.gram))
        note(ctx, self.name, granularity="block", blocks=blocks, averaged_before_blocks=sorted(prefix), kept_at_base=kept)
        return {k: v.detach().to("cpu") for k, v in out.items()}

    def _run_layers(self, pool: "ModelPool", ctx: "RunContext", *, batches: dict[str, list] | None = None,
                    models: list | None = None) -> dict[str, "torch.Tensor"]:
        import torch

        from fusion_core.adapters import functional_forward

        cfg, names = self.config, list(pool.model_names)
        batches = self._batches(pool, ctx) if batches is None else batches
        models = [prepare(pool.load_model(n), ctx.device) for n in names] if models is None else models
        acc = _Accumulator(cfg.reduce_non_diagonal_ratio, cfg.bias == "regression")
        for model in models:
            acc.add_state(model.state_dict())
        reference = models[0]
        layers = select_modules(reference, None, method=self.name, field="exclude", exclude=cfg.exclude)
        with torch.no_grad():
            order = execution_order(reference, lambda: pool.forward(reference, batches[names[0]][0]))
        merged: dict[str, torch.Tensor] = {}  # tensors of the modules already merged (earlier in execution order)
        solved_all: dict[str, torch.Tensor] = {}
        dtype = _gram_dtype(reference)
        for module_name in progress(ctx, order, f"merging layers ({self.name})", total=len(order), unit="module"):
            module = reference.get_submodule(module_name)
            own = [pkey(module_name, p) for p, _ in module.named_parameters(recurse=False)]
            if module_name in layers:
                for model, name in zip(models, names, strict=True):
                    target = {module_name: model.get_submodule(module_name)}
                    with GramCollector(target, with_bias=acc.with_bias, dtype=dtype) as grams, torch.no_grad():
                        for inputs in batches[name]:
                            functional_forward(model, merged, inputs, pool)
                    gram = grams.mean_gram(module_name)
                    if gram is not None:
                        acc.add_layer(module_name, target[module_name], gram, model.state_dict())
                solved = acc.solve_layer(module_name) if module_name in acc.gram else {}
                solved_all.update(solved)
                for key in own:
                    merged[key] = solved[key].to(ctx.device) if key in solved else acc.mean(key)
            else:
                for key in own:
                    if key in acc.sums:
                        merged[key] = acc.mean(key)
        out = acc.result(solved_all)
        for alias, source in tied_aliases(reference).items():
            out[alias] = out[source]
        self._note(ctx, list(layers), list(acc.gram))
        note(ctx, self.name, granularity="layer", order=[n for n in order if n in layers])
        return {k: v.detach().to("cpu") for k, v in out.items()}


def _next_input(output: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The next block's ``(args, kwargs)``: this block's hidden states (its output, or the output's first item) and the same extras."""
    import torch

    hidden = output if isinstance(output, torch.Tensor) else output[0]
    if args:
        return (hidden, *args[1:]), kwargs
    key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
    return (), {**kwargs, key: hidden}


METHODS = [RegMean, RegMeanPlusPlus]
