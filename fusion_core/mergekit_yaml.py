"""Read a mergekit YAML config into a fusion merge (method, fields, base, models, dtype).

Only what both tools share is accepted; everything else (gradients, filters,
tokenizer surgery, LoRA references, per-model values our method takes once...)
is refused with a message naming the key, never ignored.

Conventions are translated so the result matches mergekit's: its TIES-family
methods elect signs on weighted task vectors (``sign_election: weighted_sum``),
``normalize`` picks the disjoint divisor (``weights``) or none, ``rescale: true``
is L1-norm matching, and an absent ``density`` means 1 (no sparsification).
Compute stays in fp32; mergekit's ``dtype`` (or ``out_dtype``) sets the output dtype.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from .errors import ConfigError

#: mergekit method → (fusion method, fixed fields)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "linear": ("weighted_average", {}),
    "task_arithmetic": ("task_arithmetic", {"convention": "mergekit"}),
    "ties": ("ties", {"convention": "mergekit", "sign_election": "weighted_sum"}),
    "dare_ties": ("dare", {"convention": "mergekit", "variant": "ties", "sign_election": "weighted_sum"}),
    "dare_linear": ("dare", {"convention": "mergekit", "variant": "linear"}),
    "breadcrumbs": ("breadcrumbs", {"variant": "linear"}),
    "breadcrumbs_ties": ("breadcrumbs", {"variant": "ties", "sign_election": "weighted_sum"}),
    "della": ("della", {"variant": "ties", "sign_election": "weighted_sum"}),
    "della_linear": ("della", {"variant": "linear"}),
    "slerp": ("slerp", {}),
    "nuslerp": ("nuslerp", {}),
    "multislerp": ("multislerp", {}),
    "karcher": ("karcher", {}),
    "model_stock": ("model_stock", {"convention": "mergekit"}),
    "sce": ("sce", {}),
    "passthrough": ("layer_stack", {}),
}
#: mergekit's default for ``normalize`` per method
NORMALIZE_DEFAULTS = {
    "linear": True,
    "task_arithmetic": False,
    "ties": True,
    "dare_ties": False,
    "dare_linear": False,
    "breadcrumbs": False,
    "breadcrumbs_ties": False,
    "della": True,
    "della_linear": False,
}
TIES_FAMILY = {"ties", "dare_ties", "breadcrumbs_ties", "della"}
RESCALING = {"dare_ties", "dare_linear", "della", "della_linear"}
SPARSIFYING = {"ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"}
NEEDS_BASE = {"task_arithmetic", *SPARSIFYING, "slerp", "model_stock", "sce"}
#: mergekit parameter → fusion field
RENAMES = {"lambda": "scaling_factor", "nuslerp_flatten": "flatten", "nuslerp_row_wise": "row_wise"}
SHARED = {
    "lambda",
    "t",
    "select_topk",
    "nuslerp_flatten",
    "nuslerp_row_wise",
    "normalize_weights",
    "eps",
    "max_iter",
    "tol",
    "filter_wise",
    "normalize",
    "rescale",
    "int8_mask",
}
PER_MODEL = {"weight", "density", "gamma", "epsilon"}
TOP_LEVEL = {
    "merge_method",
    "base_model",
    "models",
    "slices",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
}


@attrs.frozen
class MergekitRecipe:
    """A mergekit config translated to fusion terms."""

    mergekit_method: str
    method: str
    fields: dict
    base: str | None
    models: list[str]
    out_dtype: str | None


def _where(path: str | None) -> str:
    return f"mergekit config {path}" if path else "mergekit config"


def _scalar(value: Any, key: str, where: str) -> Any:
    if isinstance(value, list):
        if value and all(isinstance(v, Mapping) for v in value):
            raise ConfigError(
                f"{where}: parameter {key!r} uses filters (per-tensor values), which fuse merge does not support yet"
            )
        raise ConfigError(
            f"{where}: parameter {key!r} is a gradient (a list of values over layers), which fuse merge does not support yet"
        )
    if isinstance(value, Mapping):
        raise ConfigError(f"{where}: parameter {key!r} is a mapping; only plain values are supported")
    return value


def _model_ref(entry: Any, where: str, what: str) -> str:
    if isinstance(entry, Mapping):
        raise ConfigError(f"{where}: {what} must be a path string (structured model references are not supported)")
    if not isinstance(entry, str) or not entry:
        raise ConfigError(f"{where}: {what} must be a path, got {entry!r}")
    if "+" in entry and not os.path.exists(entry):
        raise ConfigError(
            f"{where}: {what} {entry!r} looks like a model+LoRA reference, which fuse merge does not support; merge the adapter first"
        )
    return entry


def _same(a: str, b: str) -> bool:
    return os.path.normpath(os.path.abspath(a)) == os.path.normpath(os.path.abspath(b))


def translate(data: Mapping[str, Any], *, path: str | None = None) -> MergekitRecipe:
    """Translate a parsed mergekit YAML mapping; unsupported keys raise ConfigError naming them."""
    where = _where(path)
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    for key in data:
        if key not in TOP_LEVEL:
            hint = " (multi-module merges are not supported)" if key == "modules" else ""
            raise ConfigError(f"{where}: unsupported key {key!r}{hint}; fuse merge reads {', '.join(sorted(TOP_LEVEL))}")
    if "tokenizer_source" in data and data["tokenizer_source"] != "base":
        raise ConfigError(
            f"{where}: tokenizer_source {data['tokenizer_source']!r} is not supported (only 'base': the base's tokenizer is copied)"
        )
    if "tokenizer" in data and data["tokenizer"] not in ({"source": "base"},):
        raise ConfigError(
            f"{where}: unsupported key 'tokenizer' (vocabulary merging is not supported; the base's tokenizer files are copied)"
        )
    mk = data.get("merge_method")
    if not isinstance(mk, str):
        raise ConfigError(f"{where}: merge_method is missing")
    if mk not in METHODS:
        from .errors import did_you_mean

        raise ConfigError(f"{where}: merge_method {mk!r} is not supported by fuse merge{did_you_mean(mk, METHODS)}")
    method, fixed = METHODS[mk]
    fields: dict[str, Any] = dict(fixed)
    base = _model_ref(data["base_model"], where, "base_model") if data.get("base_model") is not None else None
    out_dtype = data.get("out_dtype") or data.get("dtype")
    if out_dtype is not None and not isinstance(out_dtype, str):
        raise ConfigError(f"{where}: dtype must be a name like bfloat16, got {out_dtype!r}")
    has_models, has_slices = "models" in data, "slices" in data
    if has_models == has_slices:
        raise ConfigError(f"{where}: give exactly one of models or slices")
    if has_slices:
        if mk != "passthrough":
            raise ConfigError(
                f"{where}: slices are supported only with merge_method: passthrough (layer stacking); use models for {mk}"
            )
        if data.get("parameters"):
            raise ConfigError(f"{where}: parameters are not supported with passthrough slices")
        models, slices = _slices(data["slices"], base, where)
        fields["slices"] = slices
        return MergekitRecipe(mk, method, fields, base, models, out_dtype)
    if mk == "passthrough":
        raise ConfigError(
            f"{where}: passthrough with models copies one model; fuse merge supports passthrough only with slices (layer stacking)"
        )

    global_params = data.get("parameters") or {}
    if not isinstance(global_params, Mapping):
        raise ConfigError(f"{where}: parameters must be a mapping")
    entries = data["models"]
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where}: models must be a non-empty list of {{model: PATH, parameters: {{...}}}}")
    models: list[str] = []
    per_model: list[dict[str, Any]] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping) or "model" not in entry:
            raise ConfigError(f"{where}: models[{i}] must be a mapping with a model key")
        extra = set(entry) - {"model", "parameters"}
        if extra:
            raise ConfigError(f"{where}: models[{i}] has unsupported key(s) {', '.join(sorted(map(str, extra)))}")
        ref = _model_ref(entry["model"], where, f"models[{i}].model")
        params = entry.get("parameters") or {}
        if not isinstance(params, Mapping):
            raise ConfigError(f"{where}: models[{i}].parameters must be a mapping")
        for key in params:
            if key not in PER_MODEL:
                raise ConfigError(
                    f"{where}: models[{i}].parameters.{key} is not supported per model (per-model keys: {', '.join(sorted(PER_MODEL))})"
                )
        is_base = base is not None and _same(ref, base)
        if is_base and (mk in NEEDS_BASE or mk in {"nuslerp", "multislerp"}):
            continue  # the base is not one of the inputs (mergekit adds it to models silently)
        models.append(ref)
        per_model.append({k: _scalar(v, k, where) for k, v in params.items()})
    if base is not None and mk == "karcher":
        if not any(_same(m, base) for m in models):
            models.append(base)
            per_model.append({})
        base = None  # karcher treats the base as an ordinary input
    if base is not None and mk == "linear":
        if not any(_same(m, base) for m in models):
            raise ConfigError(
                f"{where}: linear does not use base_model {base!r}; list it under models with a weight, or drop base_model"
            )
        base = None
    if mk in NEEDS_BASE and base is None:
        raise ConfigError(f"{where}: merge_method {mk} needs base_model")
    if not models:
        raise ConfigError(f"{where}: no models to merge besides the base")

    for key, value in global_params.items():
        if key not in SHARED and key not in PER_MODEL:
            raise ConfigError(f"{where}: parameters.{key} is not supported for {mk}")
        value = _scalar(value, key, where)
        if key in PER_MODEL:
            for params in per_model:
                params.setdefault(key, value)
        elif key == "normalize":
            fields.update(_normalize(mk, bool(value), where))
        elif key == "rescale":
            if mk not in RESCALING:
                raise ConfigError(f"{where}: parameters.rescale is not supported for {mk}")
            fields["rescale"] = "l1" if value else "none"
        elif key == "int8_mask":
            pass  # only the storage dtype of mergekit's masks; results are the same
        else:
            fields[RENAMES.get(key, key)] = value
    if mk in NORMALIZE_DEFAULTS and "normalize" not in global_params:
        fields.update(_normalize(mk, NORMALIZE_DEFAULTS[mk], where))
    if mk in RESCALING and "rescale" not in fields:
        fields["rescale"] = "l1"

    for key in PER_MODEL:
        values = [p.get(key) for p in per_model]
        given = [v for v in values if v is not None]
        if not given:
            continue
        if key == "weight":
            fields["weights"] = [1.0 if v is None else v for v in values]
            continue
        if len(given) != len(values) or len(set(given)) > 1:
            raise ConfigError(
                f"{where}: per-model {key} values differ ({', '.join(map(str, values))}); fusion's {method} takes one {key} for all models"
            )
        fields[key] = given[0]
    if mk in SPARSIFYING and "density" not in fields:
        fields["density"] = 1.0  # mergekit's default: no sparsification
    if mk == "slerp" and "t" not in fields:
        raise ConfigError(f"{where}: slerp needs parameters.t")
    if mk in {"karcher", "sce", "model_stock"} and "weights" in fields:
        raise ConfigError(f"{where}: {mk} takes no per-model weight")
    return MergekitRecipe(mk, method, fields, base, models, out_dtype)


def _normalize(mk: str, value: bool, where: str) -> dict[str, Any]:
    if mk in TIES_FAMILY:
        return {"divisor": "weights" if value else "none"}
    if mk in NORMALIZE_DEFAULTS:
        return {"normalize": value}
    raise ConfigError(f"{where}: parameters.normalize is not supported for {mk}")


def _slices(slices: Any, base: str | None, where: str) -> tuple[list[str], list[dict]]:
    if not isinstance(slices, list) or not slices:
        raise ConfigError(f"{where}: slices must be a non-empty list")
    models: list[str] = []
    out: list[dict] = []
    for i, item in enumerate(slices):
        if not isinstance(item, Mapping) or set(item) - {"sources"}:
            raise ConfigError(
                f"{where}: slices[{i}] supports only 'sources' (slice-level base_model/parameters are not supported)"
            )
        sources = item.get("sources")
        if not isinstance(sources, list) or len(sources) != 1:
            raise ConfigError(f"{where}: slices[{i}] must have exactly one source (merging inside a slice is not supported)")
        src = sources[0]
        if not isinstance(src, Mapping) or set(src) - {"model", "layer_range"} or "layer_range" not in src:
            bad = sorted(set(src) - {"model", "layer_range"}) if isinstance(src, Mapping) else []
            raise ConfigError(
                f"{where}: slices[{i}].sources[0] supports model and layer_range only{f' (got {bad})' if bad else ''}"
            )
        ref = _model_ref(src.get("model"), where, f"slices[{i}].sources[0].model")
        layers = src["layer_range"]
        if base is not None and _same(ref, base):
            model: Any = "base"
        else:
            match = [j for j, m in enumerate(models) if _same(m, ref)]
            if match:
                model = match[0]
            else:
                models.append(ref)
                model = len(models) - 1
        out.append({"model": model, "layers": list(layers) if isinstance(layers, (list, tuple)) else layers})
    return models, out


def load(path: str | os.PathLike) -> MergekitRecipe:
    """Read and translate the mergekit YAML file ``path``."""
    from .config import load_yaml_file

    return translate(load_yaml_file(path), path=str(Path(path)))
