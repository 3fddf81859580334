"""Layer stacking / depth up-scaling: build a deeper (or shallower) model from slices of layers.

The engine runs it as a planned passthrough: every output tensor is a copy of
one named input tensor, renumbered.  Layer tensors are those whose name matches
``layer_pattern`` (its first group is the layer number); the rest (embeddings,
final norm, head) come from the base, or from the first model without a base.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from fusion_core import Capabilities, InputError, Method, option

from .mergekit.mapping import MergekitMapping, Param

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fusion_core import ModelPool, RunContext, TensorReader
    from fusion_core.engine.validate import TensorPlan

DEFAULT_LAYER_PATTERN = r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\."
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def set_layer_count(config_path: Path, old: int | None, new: int) -> None:
    """Set the layer count (any of :data:`LAYER_COUNT_KEYS` equal to ``old``) of ``config.json`` to ``new``."""
    if old == new or not config_path.exists():
        return
    try:
        data = json.loads(config_path.read_text())
    except ValueError:
        return
    changed = False
    for key in LAYER_COUNT_KEYS:
        if isinstance(data, dict) and data.get(key) == old:
            data[key] = new
            changed = True
    if changed:
        config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _check_slices(instance, attribute, value) -> None:
    if not value:
        raise ValueError("slices must list at least one {model, layers: [start, end]}")
    for i, item in enumerate(value):
        if not isinstance(item, dict) or set(item) - {"model", "layers"} or "layers" not in item:
            raise ValueError(
                f"slices[{i}] must be a mapping with keys model (an index or 'base') and layers [start, end], got {item!r}"
            )
        model = item.get("model", "base")
        if not (model == "base" or (isinstance(model, int) and not isinstance(model, bool) and model >= 0)):
            raise ValueError(f"slices[{i}].model must be 'base' or a model index 0, 1, ..., got {model!r}")
        layers = item["layers"]
        ok = (
            isinstance(layers, (list, tuple))
            and len(layers) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in layers)
        )
        if not ok or not 0 <= layers[0] < layers[1]:
            raise ValueError(f"slices[{i}].layers must be [start, end] with 0 <= start < end (end excluded), got {layers!r}")


def _check_pattern(instance, attribute, value) -> None:
    try:
        compiled = re.compile(value)
    except re.error as exc:
        raise ValueError(f"layer_pattern is not a valid regex: {exc}") from None
    if compiled.groups < 1:
        raise ValueError("layer_pattern needs a group capturing the layer number, e.g. r'\\.layers\\.(\\d+)\\.'")


class LayerStack(Method):
    """Concatenate slices of layers (passthrough) into a new stack, renumbering the layers."""

    name = "layer_stack"
    summary = "Layer stacking / depth up-scaling: builds a model from slices of the inputs' layers, renumbered (passthrough)."
    reference_url = "https://arxiv.org/abs/2312.15166"
    capabilities: ClassVar[Capabilities] = Capabilities(needs_base=False)

    @attrs.frozen
    class Config:
        slices: list[dict] = option(
            help="output layers, in order: [{model: 'base' or a model index, layers: [start, end]}] (end excluded); "
            "e.g. SOLAR depth up-scaling of a 32-layer base: [{model: base, layers: [0, 24]}, {model: base, layers: [8, 32]}]",
            validator=_check_slices,
        )
        layer_pattern: str = option(
            DEFAULT_LAYER_PATTERN,
            help="regex whose first group is the layer number in a tensor name (default matches layers.N., layer.N., h.N., blocks.N.)",
            validator=_check_pattern,
        )

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.source_layers: int | None = None
        self.output_layers: int | None = None

    # -- inputs ---------------------------------------------------------------

    def check_inputs(self, n_models: int, has_base: bool) -> None:
        if n_models == 0 and not has_base:
            raise InputError("layer_stack needs at least one model (a base or a --model)")
        for i, item in enumerate(self.config.slices):
            model = item.get("model", "base")
            if model == "base" and not has_base:
                raise InputError(f"layer_stack: slices[{i}] takes layers from the base, but no base model was given")
            if model != "base" and model >= n_models:
                raise InputError(
                    f"layer_stack: slices[{i}] takes layers from model {model}, but only {n_models} model(s) were given (indices start at 0)"
                )

    def _input_index(self, model: Any, has_base: bool) -> int:
        return 0 if model == "base" else model + (1 if has_base else 0)

    def layer_of(self, name: str) -> re.Match | None:
        return re.search(self.config.layer_pattern, name)

    # -- the plan ---------------------------------------------------------------

    def passthrough_plan(
        self, inputs: Sequence["TensorReader"], has_base: bool, out_dtype: "torch.dtype | None" = None
    ) -> list["TensorPlan"]:
        """Output name → (input, tensor name) for every output tensor, in storage order of the first input."""
        from fusion_core.engine.validate import PASSTHROUGH, TensorPlan

        def plan(out_name: str, index: int, name: str) -> TensorPlan:
            reader = inputs[index]
            dtype = reader.dtype(name)
            if out_dtype is not None and dtype.is_floating_point:
                dtype = out_dtype
            return TensorPlan(out_name, tuple(reader.shape(name)), dtype, kind=PASSTHROUGH, source=name, source_index=index)

        layers_of: dict[int, dict[int, list[str]]] = {}

        def layers(index: int) -> dict[int, list[str]]:
            if index not in layers_of:
                table: dict[int, list[str]] = {}
                reader = inputs[index]
                for name in sorted(reader.keys(), key=reader.location):
                    match = self.layer_of(name)
                    if match:
                        table.setdefault(int(match.group(1)), []).append(name)
                layers_of[index] = table
            return layers_of[index]

        ref = inputs[0]
        ref_layers = layers(0)
        if not ref_layers:
            raise InputError(f"layer_stack: layer_pattern {self.config.layer_pattern!r} matches no tensor name of {ref.label}")
        stacked: list[TensorPlan] = []
        out_layer = 0
        for i, item in enumerate(self.config.slices):
            index = self._input_index(item.get("model", "base"), has_base)
            table = layers(index)
            start, end = item["layers"]
            for layer in range(start, end):
                if layer not in table:
                    have = f"0..{max(table)}" if table else "none"
                    raise InputError(
                        f"layer_stack: slices[{i}] wants layer {layer} of {inputs[index].label}, which has layers {have}"
                    )
                for name in table[layer]:
                    match = self.layer_of(name)
                    out_name = name[: match.start(1)] + str(out_layer) + name[match.end(1) :]
                    stacked.append(plan(out_name, index, name))
                out_layer += 1
        out: list[TensorPlan] = []
        emitted = False
        for name in sorted(ref.keys(), key=ref.location):
            if self.layer_of(name):
                if not emitted:
                    out.extend(stacked)
                    emitted = True
                continue
            out.append(plan(name, 0, name))
        seen: set[str] = set()
        for p in out:
            if p.name in seen:
                raise InputError(f"layer_stack: two output tensors are named {p.name!r}; check layer_pattern")
            seen.add(p.name)
        self.source_layers = max(ref_layers) + 1
        self.output_layers = out_layer
        return out

    def update_config(self, path: Path) -> None:
        """Set the layer count of a copied ``config.json`` to the output's."""
        if self.output_layers is not None:
            set_layer_count(Path(path), self.source_layers, self.output_layers)

    # -- in memory ------------------------------------------------------------

    def run(self, pool: "ModelPool", ctx: "RunContext") -> Any:
        """Stack the pool's models in memory; returns the new state dict."""
        from fusion_core.engine.stream import merge_pool

        return merge_pool(self, pool, ctx)


METHODS = [LayerStack]


#: mergekit's passthrough: each output tensor is one input's tensor (times its optional ``scale``)
MERGEKIT = [
    MergekitMapping(
        "passthrough", "layer_stack", base="ignored", per_model={"scale": Param(float, None, "scale")}, per_model_scope="input", max_inputs=1
    )
]
