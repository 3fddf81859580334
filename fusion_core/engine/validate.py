"""Checks and the per-tensor plan of a merge, from headers alone (nothing is read).

Key sets and shapes must agree across inputs (or ``common_keys_only``); float
dtypes may differ (they are promoted for compute, with a note); non-float
tensors must share a dtype and are copied when their values agree.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import attrs
import torch

from ..errors import InputError
from .readers import TensorReader

MERGE, COPY, ALIAS, PASSTHROUGH = "merge", "copy", "alias", "passthrough"
NON_PERSISTENT = re.compile(r"(?:^|\.)(?:position_ids|masked_bias)$|(?:^|\.)attn\.bias$")
"""Buffers that old checkpoints store and newer ones do not (``register_buffer(..., persistent=False)``)."""


@attrs.frozen
class TensorPlan:
    """What the engine does for one output tensor."""

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    kind: str = MERGE
    """``merge`` (run the kernel), ``copy`` (non-float: copy if equal), ``alias`` (tied to ``source``),
    ``passthrough`` (copy ``source`` of input ``source_index``)."""
    source: str | None = None
    source_index: int | None = None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str | None, *, what: str = "dtype") -> torch.dtype | None:
    """``"bfloat16"``/``"bf16"``/``"float16"``/``"fp16"``/``"float32"``... → a float ``torch.dtype``."""
    if name is None:
        return None
    aliases = {
        "fp32": "float32",
        "fp16": "float16",
        "half": "float16",
        "bf16": "bfloat16",
        "fp64": "float64",
        "float": "float32",
        "double": "float64",
    }
    key = aliases.get(str(name).lower(), str(name).lower().removeprefix("torch."))
    dtype = getattr(torch, key, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError(f"unknown {what} {name!r} (choose from float32, float16, bfloat16, float64)")
    return dtype


def _labels(inputs: Sequence[TensorReader], has_base: bool) -> list[str]:
    return [
        ("base" if has_base and i == 0 else f"model {i + (0 if has_base else 1)}") + f" ({r.label})" for i, r in enumerate(inputs)
    ]


def _names(items: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(repr(x) for x in items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def common_keys(
    inputs: Sequence[TensorReader], has_base: bool, *, common_keys_only: bool, notify: Callable[[str], None]
) -> list[str]:
    """The names to merge, in the first input's storage order; mismatched key sets are an error unless ``common_keys_only``."""
    labels = _labels(inputs, has_base)
    ref = inputs[0]
    ref_keys = sorted(ref.keys(), key=ref.location)
    keysets = [set(r.keys()) for r in inputs]
    common = set.intersection(*keysets)
    buffers = buffer_only_keys(keysets, common)
    keysets = [keys - buffers for keys in keysets]
    ref_keys = [k for k in ref_keys if k not in buffers]
    if not common_keys_only:
        for label, keys in zip(labels[1:], keysets[1:], strict=True):
            missing = [k for k in ref_keys if k not in keys]
            extra = sorted(keys - keysets[0])
            if missing or extra:
                parts = []
                if missing:
                    parts.append(f"lacks {len(missing)} tensor(s) of {labels[0]}: {_names(missing)}")
                if extra:
                    parts.append(f"has {len(extra)} extra: {_names(extra)}")
                raise InputError(
                    f"{label} {'; '.join(parts)} (pass --common-keys-only to merge only the tensors every model has)"
                )
    keys = [k for k in ref_keys if k in common]
    if not keys:
        raise InputError("the models have no tensor names in common")
    skipped = len(set.union(*keysets)) - len(keys)
    if skipped:
        notify(f"note: merging the {len(keys)} tensors every model has; skipping {skipped} that some models lack")
    return keys


def buffer_only_keys(keysets: Sequence[set[str]], common: set[str]) -> set[str]:
    """Names of non-persistent buffers (:data:`NON_PERSISTENT`) that only some inputs store."""
    return {k for k in set.union(*keysets) - common if NON_PERSISTENT.search(k)}


def check_shapes(inputs: Sequence[TensorReader], has_base: bool, keys: Sequence[str]) -> None:
    labels = _labels(inputs, has_base)
    bad = []
    for key in keys:
        ref = inputs[0].shape(key)
        for label, reader in zip(labels[1:], inputs[1:], strict=True):
            shape = reader.shape(key)
            if shape != ref:
                bad.append(f"{key!r} is {list(ref)} in {labels[0]} but {list(shape)} in {label}")
                break
        if len(bad) >= 3:
            break
    if bad:
        raise InputError("tensor shapes differ between models: " + "; ".join(bad))


def plan_merge(
    inputs: Sequence[TensorReader],
    has_base: bool,
    *,
    common_keys_only: bool = False,
    out_dtype: torch.dtype | None = None,
    notify: Callable[[str], None] = lambda msg: None,
) -> list[TensorPlan]:
    """Validate the inputs (base first when ``has_base``) and plan every output tensor."""
    if not inputs:
        raise InputError("no models to merge")
    labels = _labels(inputs, has_base)
    keys = common_keys(inputs, has_base, common_keys_only=common_keys_only, notify=notify)
    check_shapes(inputs, has_base, keys)
    aliases = [r.aliases() for r in inputs]
    plans: list[TensorPlan] = []
    mixed: dict[tuple[str, ...], str] = {}
    tied: list[TensorPlan] = []
    for key in keys:
        dtypes = [r.dtype(key) for r in inputs]
        shape = tuple(inputs[0].shape(key))
        canonical = {a.get(key) for a in aliases}
        if len(canonical) == 1 and None not in canonical and canonical.pop() in keys:
            tied.append(TensorPlan(key, shape, dtypes[0], kind=ALIAS, source=aliases[0][key]))
            continue
        floats = [d.is_floating_point for d in dtypes]
        if all(floats):
            if len(set(dtypes)) > 1:
                mixed.setdefault(tuple(sorted({dtype_name(d) for d in dtypes})), key)
            if out_dtype is not None:
                out = out_dtype
            elif has_base or len(set(dtypes)) == 1:
                out = dtypes[0]
            else:
                out = dtypes[0]
                for d in dtypes[1:]:
                    out = torch.promote_types(out, d)
            plans.append(TensorPlan(key, shape, out))
        elif not any(floats):
            if len(set(dtypes)) > 1:
                detail = ", ".join(f"{dtype_name(d)} in {label}" for d, label in zip(dtypes, labels, strict=True))
                raise InputError(f"non-float tensor {key!r} has different dtypes ({detail}); it cannot be merged")
            plans.append(TensorPlan(key, shape, dtypes[0], kind=COPY))
        else:
            detail = ", ".join(f"{dtype_name(d)} in {label}" for d, label in zip(dtypes, labels, strict=True))
            raise InputError(f"tensor {key!r} is float in some models and not in others ({detail})")
    keysets = [set(r.keys()) for r in inputs]
    for key in sorted(buffer_only_keys(keysets, set.intersection(*keysets))):
        if key in keysets[0]:
            notify(f"note: {key!r} (a non-persistent buffer) is stored by only some inputs; taken from {labels[0]}")
            dtype = inputs[0].dtype(key)
            dtype = out_dtype if out_dtype is not None and dtype.is_floating_point else dtype
            plans.append(TensorPlan(key, tuple(inputs[0].shape(key)), dtype, kind=PASSTHROUGH, source=key, source_index=0))
    for names, key in mixed.items():
        target = "the --dtype given" if out_dtype is not None else ("the base's dtype" if has_base else "the promoted dtype")
        notify(
            f"note: inputs mix {' and '.join(names)} (e.g. tensor {key!r}): promoting to the compute dtype and writing {target}"
        )
    return plans + tied
