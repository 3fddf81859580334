"""LoRA/PEFT adapters as pool entries: checked against the base, then merged into it on load."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from fusion_core import InputError

from .sources import ModelSource

PEFT_MISSING = "{label} is a LoRA/PEFT adapter, and merging it needs the peft package: pip install peft (or pip install 'fusion-hf[peft]')"
LORA_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B"}
PEFT_PREFIX = "base_model.model."


def peft_available() -> bool:
    """Whether ``peft`` can be imported (found without importing it)."""
    if "peft" in sys.modules:
        return sys.modules["peft"] is not None
    try:
        return importlib.util.find_spec("peft") is not None
    except (ImportError, ValueError):
        return False


def import_peft(label: str):
    try:
        import peft
    except ImportError:
        raise InputError(PEFT_MISSING.format(label=label)) from None
    return peft


def _same_place(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        try:
            return os.path.samefile(pa, pb)
        except OSError:
            return False
    return a.rstrip("/") == b.rstrip("/")


def check_recorded_base(source: ModelSource, adapter_config: dict[str, Any], base: ModelSource | None) -> None:
    """Refuse an adapter whose ``base_model_name_or_path`` is not the pool's base (unless ``check_base: false``)."""
    if base is None:
        raise InputError(f"{source.label} is an adapter, but the pool has no base model to merge it into; set the pool's base")
    recorded = adapter_config.get("base_model_name_or_path")
    if not source.check_base or not recorded:
        return
    candidates = [base.path] + ([str(Path(base.path) / base.subfolder)] if base.subfolder else [])
    if not any(_same_place(str(recorded), c) for c in candidates):
        raise InputError(f"{source.label}: adapter was trained on base {recorded!r} but the pool's base is {base.spec()!r}; "
                         f"use the matching base, or set check_base: false on this entry if the base is a copy of it")


def lora_shapes(folder: Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """``{module path: {"A": shape, "B": shape}}`` from the adapter's safetensors header (nothing is read)."""
    from fusion_core import SafetensorsFile

    path = folder / "adapter_model.safetensors"
    if not path.exists():
        return {}
    header = SafetensorsFile(path)
    try:
        out: dict[str, dict[str, tuple[int, ...]]] = {}
        for key, (_, shape, _, _) in header.entries.items():
            for suffix, which in LORA_SUFFIXES.items():
                if key.endswith(suffix):
                    module = key[: -len(suffix)].removeprefix(PEFT_PREFIX)
                    out.setdefault(module, {})[which] = shape
        return out
    finally:
        header.close()


def check_fits(source: ModelSource, folder: Path | None, model) -> None:
    """Every LoRA module of the adapter exists in ``model`` with matching in/out sizes."""
    if folder is None:
        return
    for module_path, shapes in lora_shapes(folder).items():
        try:
            module = model.get_submodule(module_path)
        except AttributeError:
            raise InputError(f"{source.label}: adapter targets module {module_path!r}, which the base model lacks: "
                             "the adapter was made for another architecture") from None
        in_f, out_f = getattr(module, "in_features", None), getattr(module, "out_features", None)
        a, b = shapes.get("A"), shapes.get("B")
        bad_in = in_f is not None and a is not None and len(a) == 2 and a[1] != in_f
        bad_out = out_f is not None and b is not None and len(b) == 2 and b[0] != out_f
        if bad_in or bad_out:
            raise InputError(f"{source.label}: adapter module {module_path!r} expects a {a[1] if a else '?'}→{b[0] if b else '?'} layer "
                             f"but the base has {in_f}→{out_f}: the adapter was made for another base model")


def merge_adapter(base_model, source: ModelSource, folder: Path | None, allow_pickle: bool):
    """Apply the adapter at ``folder`` (or hub id) to ``base_model`` and merge it: a plain model."""
    peft = import_peft(source.label)
    if folder is not None and not (folder / "adapter_model.safetensors").exists() and not allow_pickle:
        if (folder / "adapter_model.bin").exists():
            raise InputError(f"{source.label}: {folder} holds a pickle adapter (adapter_model.bin): convert it to safetensors, "
                             "or set allow_pickle: true if you trust it")
        raise InputError(f"{source.label}: {folder} has no adapter_model.safetensors")
    check_fits(source, folder, base_model)
    target = str(folder) if folder is not None else source.path
    kwargs: dict[str, Any] = {"is_trainable": False}
    if folder is None:
        if source.revision:
            kwargs["revision"] = source.revision
        if source.subfolder:
            kwargs["subfolder"] = source.subfolder
    try:
        wrapped = peft.PeftModel.from_pretrained(base_model, target, **kwargs)
        merged = wrapped.merge_and_unload()
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        from .loading import one_line

        raise InputError(f"{source.label}: cannot apply adapter {source.spec()}: {one_line(exc)}") from None
    merged.eval()
    return merged
