"""Run a mergekit 0.1.5 YAML recipe with fusion's methods on the streaming engine.

The recipe is read and normalised as mergekit does (:mod:`.schema`), its method is mapped
through the declarations next to fusion-merging's methods (:mod:`.mapping`), and every
output tensor is planned as mergekit's planner plans it:

- the output's tensors are the donor's (the base, else the first source of the first
  slice): its non-layer tensors before the layers (embeddings) are merged from the first
  slice's sources, those after them (final norm, head) from the last slice's, both at
  ``t = 0``; layer ``j`` of a slice of ``n`` layers merges layer ``start + j`` of every
  source at ``t = j / (n − 1)`` (``t = 1`` for a one-layer slice) and becomes the next
  output layer;
- the base of a slice is its ``base_model``, else the recipe's; per-model values follow
  the source order, base excluded unless the method treats the base as an ordinary input;
- parameters resolve per tensor (gradients over ``t``, filters on the tensor's name,
  source > slice > top-level ``parameters`` > mergekit's default).

As mergekit's loader, inputs are rounded to ``dtype`` when the recipe gives one; the kernels
then compute in fp32 (mergekit computes in ``dtype``); ``out_dtype`` (else ``dtype``) sets
the output dtype.  Anything that cannot be honoured is refused by name (a ``ConfigError``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from fusion_core import Capabilities, ConfigError, InputError, KernelMethod, option

from . import schema
from .mapping import MergekitMapping, all_mappings
from .routing import Route, SlotReader, Stored, routed

if TYPE_CHECKING:  # pragma: no cover
    from fusion_core import ImportedMerge, TensorReader

POST_PATTERN = re.compile(
    r"(?:^|\.)(?:lm_head|score|classifier|norm|ln_f|norm_f|final_layer_norm|final_layernorm|final_norm)(?:\.|$)"
)
"""Non-layer tensors that follow the layers (final norm, head); the others precede them."""
BUFFER_PATTERN = re.compile(r"(?:^|\.)(?:position_ids|token_type_ids|masked_bias)$")
"""Non-persistent buffers some checkpoints store and others do not: taken from the donor."""


@attrs.frozen
class Planned:
    """One output tensor: where it comes from and how it is merged."""

    name: str
    sources: tuple[tuple[str, str], ...]  # (model, tensor name), in source order
    base: str | None
    fields: Mapping[str, Any]
    shape: tuple[int, ...]
    vocab: bool = False
    """Rows indexed by token: each input is permuted to the output vocabulary first."""
    copy: bool = False
    """One input's tensor copied (a non-persistent buffer only the donor stores)."""


@attrs.define
class Plan:
    recipe: schema.Recipe
    mapping: MergekitMapping
    tensors: list[Planned]
    donor: str
    layers_in: int
    layers_out: int
    notes: list[str]
    vocabulary: Any = None
    """The :class:`~.vocab.Vocabulary` when the recipe sets a tokenizer source."""


# --------------------------------------------------------------------------- layers


def _layer_pattern() -> re.Pattern:
    from ..stacking import DEFAULT_LAYER_PATTERN

    return re.compile(DEFAULT_LAYER_PATTERN)


def _layers(reader: "TensorReader", pattern: re.Pattern) -> dict[int, list[str]]:
    table: dict[int, list[str]] = {}
    for name in sorted(reader.keys(), key=reader.location):
        match = pattern.search(name)
        if match:
            table.setdefault(int(match.group(1)), []).append(name)
    return table


def _renumber(name: str, pattern: re.Pattern, layer: int) -> str:
    match = pattern.search(name)
    return name[: match.start(1)] + str(layer) + name[match.end(1) :]


# --------------------------------------------------------------------------- planning


def _method_mapping(recipe: schema.Recipe) -> MergekitMapping:
    table = all_mappings()
    mapping = table.get(recipe.merge_method)
    if mapping is None:
        from fusion_core import did_you_mean

        raise ConfigError(
            f"{recipe.where}: merge_method {recipe.merge_method!r} is not supported by fuse merge"
            f"{did_you_mean(recipe.merge_method, table)} (fusion-merging has no equivalent method; PARITY.md lists the supported ones)"
        )
    return mapping


def _check_parameter_names(recipe: schema.Recipe, mapping: MergekitMapping) -> None:
    known = set(mapping.shared) | set(mapping.per_model)
    scopes: list[tuple[str, Mapping | None]] = [("parameters", recipe.parameters)]
    for i, out in enumerate(recipe.slices):
        scopes.append((f"slices[{i}].parameters", out.parameters))
        for j, source in enumerate(out.sources):
            what = f"models[{j}].parameters" if recipe.from_models else f"slices[{i}].sources[{j}].parameters"
            scopes.append((what, source.parameters))
    for what, scope in scopes:
        for key in scope or {}:
            if key not in known:
                takes = ", ".join(sorted(known)) or "no parameters"
                raise ConfigError(f"{recipe.where}: {what}.{key} is not a parameter of mergekit's {mapping.merge_method} (it takes {takes})")


def _check_tokenizer(recipe: schema.Recipe) -> tuple[str, int | None, dict] | None:
    """``(source, pad_to_multiple_of, tokens)`` of the output tokenizer (``None``: not set).

    ``source`` is base, union or a model; ``tokens`` maps a token to its embedding source
    (mergekit's ``tokenizer.tokens``).  A ``tokenizer:`` block without a source means union (mergekit's default).
    """
    from .vocab import check_token_configs

    where = recipe.where
    source, pad_to, tokens = recipe.tokenizer_source, None, {}
    if recipe.tokenizer is not None:
        block = dict(recipe.tokenizer)
        source = block.pop("source", "union")
        tokens = check_token_configs(block.pop("tokens", None) or {}, where)
        pad_to = block.pop("pad_to_multiple_of", None)
        if block:
            raise ConfigError(f"{where}: tokenizer has unsupported key(s) {', '.join(sorted(map(str, block)))}")
        if pad_to is not None and (not isinstance(pad_to, int) or isinstance(pad_to, bool) or pad_to < 1):
            raise ConfigError(f"{where}: tokenizer.pad_to_multiple_of must be a positive integer, got {pad_to!r}")
    if source is None:
        return None
    if not isinstance(source, str):
        raise ConfigError(f"{where}: tokenizer source must be base, union or a model path, got {source!r}")
    return source.removeprefix("model:"), pad_to, tokens


def plan(recipe: schema.Recipe, readers: Mapping[str, "TensorReader"]) -> Plan:
    """Plan every output tensor of ``recipe`` over the opened ``readers`` (by model reference)."""
    mapping = _method_mapping(recipe)
    _check_parameter_names(recipe, mapping)
    where = recipe.where
    pattern = _layer_pattern()
    tables = {ref: _layers(reader, pattern) for ref, reader in readers.items()}
    slices = []
    for i, out in enumerate(recipe.slices):
        ranges = []
        for source in out.sources:
            table = tables[source.model]
            start, stop = source.layer_range or (0, (max(table) + 1) if table else 0)
            if stop > start and any(layer not in table for layer in range(start, stop)):
                have = f"0..{max(table)}" if table else "none"
                raise InputError(f"{where}: slices[{i}] wants layers {start}..{stop - 1} of {source.model}, which has layers {have}")
            ranges.append((start, stop))
        lengths = {stop - start for start, stop in ranges}
        if len(lengths) > 1:
            raise ConfigError(f"{where}: slices[{i}]: all sources must span the same number of layers (mergekit requires it), got {sorted(lengths)}")
        slices.append((out, ranges, lengths.pop()))
    donor = recipe.base_model or recipe.slices[0].sources[0].model
    donor_reader = readers[donor]
    vocabulary = _vocabulary(recipe, readers)
    names = sorted(donor_reader.keys(), key=donor_reader.location)
    pre = [n for n in names if not pattern.search(n) and not POST_PATTERN.search(n)]
    post = [n for n in names if not pattern.search(n) and POST_PATTERN.search(n)]
    notes: list[str] = []
    tensors: list[Planned] = []

    def add(out_name: str, out: schema.OutSlice, index: int, sources: list[tuple[str, str]], t: float) -> None:
        tensors.append(_plan_tensor(recipe, mapping, out, index, out_name, sources, t, readers, vocabulary))

    first, last = slices[0][0], slices[-1][0]
    for name in pre:
        add(name, first, 0, _non_layer_sources(name, first, donor, readers, notes, where), 0.0)
    out_layer = 0
    for i, (out, ranges, length) in enumerate(slices):
        for offset in range(length):
            t = offset / (length - 1) if length > 1 else 1.0
            ref_model, (ref_start, _) = out.sources[0].model, ranges[0]
            for ref_name in tables[ref_model][ref_start + offset]:
                sources = []
                for source, (start, _) in zip(out.sources, ranges, strict=True):
                    name = _renumber(ref_name, pattern, start + offset)
                    if name not in readers[source.model]:
                        raise InputError(f"{where}: slices[{i}]: {source.model} has no tensor {name!r} (needed for output layer {out_layer})")
                    sources.append((source.model, name))
                add(_renumber(ref_name, pattern, out_layer), out, i, sources, t)
            out_layer += 1
    for name in post:
        add(name, last, len(slices) - 1, _non_layer_sources(name, last, donor, readers, notes, where), 0.0)
    donor_layers = tables[donor]
    return Plan(recipe, mapping, tensors, donor, (max(donor_layers) + 1) if donor_layers else 0, out_layer, notes, vocabulary)


def _vocabulary(recipe: schema.Recipe, readers: Mapping[str, "TensorReader"]):
    settings = _check_tokenizer(recipe)
    if settings is None:
        return None
    from .vocab import Vocabulary

    source, pad_to, tokens = settings
    models = recipe.referenced_models()
    missing = [m for m in models if readers[m].folder is None]
    if missing:
        raise ConfigError(f"{recipe.where}: a tokenizer source needs model folders with tokenizers; {missing[0]} is a single file")
    return Vocabulary(source, models[0], models, {m: readers[m].folder for m in models}, pad_to, recipe.where, tokens)


def _non_layer_sources(
    name: str, out: schema.OutSlice, donor: str, readers: Mapping[str, "TensorReader"], notes: list[str], where: str
) -> list[tuple[str, str]]:
    missing = [s.model for s in out.sources if name not in readers[s.model]]
    if not missing:
        return [(s.model, name) for s in out.sources]
    if BUFFER_PATTERN.search(name):
        notes.append(f"note: {name!r} (a non-persistent buffer) is missing from {', '.join(missing)}; taken from {donor}")
        return [(donor, name)]
    raise InputError(f"{where}: {', '.join(missing)} has no tensor {name!r} (the output's donor {donor} has it)")


def _plan_tensor(
    recipe: schema.Recipe,
    mapping: MergekitMapping,
    out: schema.OutSlice,
    index: int,
    out_name: str,
    sources: list[tuple[str, str]],
    t: float,
    readers: Mapping[str, "TensorReader"],
    vocabulary: Any = None,
) -> Planned:
    where = recipe.where
    models = [m for m, _ in sources]
    is_copy = len(sources) == 1 and len(out.sources) > 1  # a buffer taken from the donor
    base = None
    if mapping.base != "ignored" and not is_copy:
        base = out.base_model or recipe.base_model
        if base is not None and base not in models:
            raise ConfigError(f"{where}: base_model {base} is not an input of slices[{index}] (mergekit requires the base among the inputs)")
        if base is None and mapping.base == "required":
            raise ConfigError(f"{where}: merge_method {mapping.merge_method} needs base_model")
    non_base = [m for m in models if m != base]
    if not is_copy:
        _check_counts(mapping, len(models), len(non_base), where, index)
    vocab = vocabulary is not None and all(vocabulary.is_vocab_tensor(n, m, readers[m].shape(n)) for m, n in sources)
    shapes = {tuple(readers[m].shape(n))[1 if vocab else 0 :] for m, n in sources}
    if len(shapes) > 1:
        raise InputError(f"{where}: tensor {out_name!r} has different shapes in the inputs of slices[{index}]: {sorted(shapes)}")
    fields: dict[str, Any] = dict(mapping.fixed)
    shared_scopes = (out.parameters, recipe.parameters)
    for key, param in mapping.shared.items():
        value = schema.resolve(key, shared_scopes, out_name, t, schema.converter(param.kind, key), param.default, where)
        fields.update(_fields(param, value, mapping, where))
    takers = models if mapping.per_model_scope == "input" else non_base
    if is_copy:
        takers = []
    names = dict(sources)
    for key, param in mapping.per_model.items():
        values = []
        for model in takers:
            own = [s.parameters for s in out.sources if s.model == model]
            scopes = (*own, out.parameters, recipe.parameters)
            values.append(schema.resolve(key, scopes, names[model], t, schema.converter(param.kind, key), param.default, where))
        if values and param.to is not None and any(v is not None for v in values):
            fields.update(_fields(param, values, mapping, where))
    if mapping.adjust is not None:
        fields = mapping.adjust(fields)
    shape = shapes.pop()
    return Planned(out_name, tuple(sources), base, fields, (vocabulary.rows, *shape) if vocab else shape, vocab, is_copy)


def _fields(param, value: Any, mapping: MergekitMapping, where: str) -> dict:
    try:
        return param.fields(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _check_counts(mapping: MergekitMapping, n: int, non_base: int, where: str, index: int) -> None:
    def bad(what: str, count: int, lo: int | None, hi: int | None) -> None:
        if (lo is not None and count < lo) or (hi is not None and count > hi):
            want = f"exactly {lo}" if lo == hi else (f"at least {lo}" if hi is None else f"{lo or 0} to {hi}")
            raise ConfigError(f"{where}: merge_method {mapping.merge_method} takes {want} {what}; slices[{index}] has {count}")

    bad("inputs", n, mapping.min_inputs, mapping.max_inputs)
    bad("non-base inputs", non_base, mapping.min_non_base, mapping.max_non_base)


# --------------------------------------------------------------------------- running


class Passthrough(KernelMethod):
    """mergekit's passthrough: the one input's tensor, times its ``scale`` when given (not a registered method)."""

    name = "passthrough"
    summary = "mergekit passthrough: copies one input's tensor (layer stacking with slices)"
    capabilities = Capabilities(needs_base=False)
    elementwise = True

    @attrs.frozen
    class Config:
        scale: list | None = option(None, help="mergekit's per-input scale (None: copy)")

    def kernel(self, name, base, tensors, ctx):
        scale = (self.config.scale or [None])[0]
        return tensors[0].clone() if scale is None else tensors[0] * scale


def method_class(mapping: MergekitMapping) -> type:
    """The fusion method class a mapping names (passthrough: :class:`Passthrough`)."""
    if mapping.method == "layer_stack":
        return Passthrough
    from ..plugin import all_methods

    return next(cls for cls in all_methods() if cls.name == mapping.method)


def build(plan_: Plan, readers: Mapping[str, "TensorReader"]) -> tuple[Any, "TensorReader | None", list["TensorReader"]]:
    """The routed method and the slot readers the engine streams."""
    from fusion_core import make_config, parse_dtype

    cls = method_class(plan_.mapping)
    slot_models: list[str] = []
    has_base = any(p.base is not None for p in plan_.tensors)
    routes: dict[str, Route] = {}
    for p in plan_.tensors:
        slots = []
        for model, _ in p.sources:
            if model == p.base:
                continue
            if model not in slot_models:
                slot_models.append(model)
            slots.append(slot_models.index(model))
        routes[p.name] = Route.make(slots, p.base is not None, p.fields, p.copy)
    checked: set = set()
    for route in routes.values():
        key = (route.fields, len(route.slots), route.has_base)
        if key not in checked and not route.copy:
            checked.add(key)
            method = cls(make_config(cls.Config, route.field_dict(), where=f"{plan_.recipe.where}: method {cls.name}"))
            method.check_inputs(len(route.slots), route.has_base)
    order = [p.name for p in plan_.tensors]
    first = {p.name: p.sources[0] for p in plan_.tensors}
    shapes = {p.name: p.shape for p in plan_.tensors}
    dtypes = {p.name: readers[first[p.name][0]].dtype(first[p.name][1]) for p in plan_.tensors}
    fallback = {name: Stored(readers[m], n) for name, (m, n) in first.items()}
    vocabulary = plan_.vocabulary

    def entry(p: Planned, model: str):
        name = dict(p.sources)[model]
        if not p.vocab:
            return Stored(readers[model], name)
        from .vocab import PermutedRows

        return PermutedRows(vocabulary, p.name, model, {m: (readers[m], n) for m, n in p.sources})
    folder = readers[plan_.donor].folder
    cast = parse_dtype(plan_.recipe.dtype, what="dtype") if plan_.recipe.dtype else None

    def slot(label: str, table: dict) -> SlotReader:
        return SlotReader(label, order, shapes, dtypes, table, fallback, folder=folder, cast=cast)

    base_reader = None
    if has_base:
        table = {}
        for p in plan_.tensors:
            table[p.name] = entry(p, p.base) if p.base is not None else None
        base_reader = slot("base", table)
    model_readers = []
    for model in slot_models:
        table = {}
        for p in plan_.tensors:
            names = dict(p.sources)
            table[p.name] = entry(p, model) if model in names and model != p.base else None
        model_readers.append(slot(model, table))
    base_fields = routes[order[0]].field_dict() if order else {}
    method = routed(cls, make_config(cls.Config, base_fields, where=f"method {cls.name}"), routes)
    return method, base_reader, model_readers


# --------------------------------------------------------------------------- output folder


def _set_config(path: Path, key: str, value: Any) -> None:
    if path.exists():
        data = json.loads(path.read_text())
        if key in data:
            data[key] = value
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _chat_template(recipe: schema.Recipe, folders: Sequence[Path]) -> str | None:
    value = recipe.chat_template
    if value is None:
        return None
    if "{{" in value or "{%" in value:
        return value
    if value == "auto":
        from collections import Counter

        found = Counter()
        for folder in folders:
            path = folder / "tokenizer_config.json"
            if path.exists():
                template = json.loads(path.read_text()).get("chat_template")
                if isinstance(template, str):
                    found[template] += 1
        return found.most_common(1)[0][0] if found else None
    raise ConfigError(
        f"{recipe.where}: chat_template {value!r} is a mergekit built-in template name, which fuse does not ship; "
        "give the Jinja template itself, or auto"
    )


def finisher(plan_: Plan, readers: Mapping[str, "TensorReader"], text: str) -> Callable[[Path], None]:
    recipe = plan_.recipe
    folders = [r.folder for r in readers.values() if r.folder is not None]
    template = _chat_template(recipe, folders)
    vocabulary = plan_.vocabulary

    def finish(folder: Path) -> None:
        from ..stacking import set_layer_count

        set_layer_count(folder / "config.json", plan_.layers_in, plan_.layers_out)
        if vocabulary is not None:
            vocabulary.tokenizer.save_pretrained(str(folder))
            _set_config(folder / "config.json", "vocab_size", vocabulary.rows)
        if template is not None:
            path = folder / "tokenizer_config.json"
            data = json.loads(path.read_text()) if path.exists() else {}
            data["chat_template"] = template
            path.write_text(json.dumps(data, indent=2) + "\n")
        (folder / "mergekit_config.yml").write_text(text)

    return finish


# --------------------------------------------------------------------------- entry points


def translate(data: Mapping[str, Any], *, path: str | None = None) -> schema.Recipe:
    """Validate a parsed mergekit YAML mapping (method, keys, tokenizer options); nothing is opened."""
    recipe = schema.parse(data, path=path)
    mapping = _method_mapping(recipe)
    _check_parameter_names(recipe, mapping)
    _check_tokenizer(recipe)
    return recipe


def _open(ref: str, where: str, allow_pickle: bool) -> "TensorReader":
    from fusion_core import open_reader

    if not os.path.exists(ref):
        raise InputError(f"{where}: model {ref!r} is not a local path (fuse merge reads local checkpoints only; download it first)")
    return open_reader(ref, allow_pickle=allow_pickle, label=ref)


def load(path: str | os.PathLike, *, allow_pickle: bool = False) -> "ImportedMerge":
    """Read the mergekit YAML ``path`` and prepare its merge (the ``mergekit`` recipe format)."""
    from fusion_core import ImportedMerge, load_yaml_file, parse_dtype

    recipe = translate(load_yaml_file(path), path=str(Path(path)))  # bounded, safe reader first
    text = Path(path).read_text(encoding="utf-8")
    for key in ("dtype", "out_dtype"):
        value = getattr(recipe, key)
        if value is not None:
            try:
                parse_dtype(value, what=key)
            except InputError as exc:
                raise ConfigError(f"{recipe.where}: {exc}") from None
    readers: dict[str, TensorReader] = {}
    try:
        for ref in recipe.referenced_models():
            readers[ref] = _open(ref, recipe.where, allow_pickle)
        plan_ = plan(recipe, readers)
        method, base, models = build(plan_, readers)
        finish = finisher(plan_, readers, text)
    except BaseException:
        for reader in readers.values():
            reader.close()
        raise
    from fusion_core import error_console

    for note in plan_.notes:
        error_console().print(note, markup=False, highlight=False)
    record = {
        "method": plan_.mapping.method if plan_.mapping.method != "layer_stack" else "passthrough",
        "mergekit": {"config": str(path), "merge_method": recipe.merge_method},
        "base": recipe.base_model,
        "models": [m for m in recipe.referenced_models() if m != recipe.base_model],
    }

    def close() -> None:
        for reader in readers.values():
            reader.close()

    return ImportedMerge(
        method=method,
        base=base,
        models=models,
        out_dtype=recipe.out_dtype or recipe.dtype,
        record=record,
        finish=finish,
        close=close,
    )
