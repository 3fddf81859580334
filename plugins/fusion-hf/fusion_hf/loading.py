"""Loading models safely: ``from_pretrained`` with safetensors only, no remote code, no hanging on the hub."""

from __future__ import annotations

from typing import Any

import attrs

from fusion_core import InputError

from . import hub
from .sources import CACHED, LOCAL, Location


@attrs.frozen
class LoadOptions:
    trust_remote_code: bool = False
    allow_pickle: bool = False
    cache_dir: str | None = None
    dtype: str | None = None


def pretrained_kwargs(loc: Location, opts: LoadOptions) -> tuple[str, dict[str, Any]]:
    """The first argument and keyword arguments of ``from_pretrained`` for ``loc``.

    Local and cached entries load with ``local_files_only``; hub-only entries first check
    that the hub can be reached (:func:`fusion_hf.hub.require_network`).
    """
    src = loc.source
    kwargs: dict[str, Any] = {"trust_remote_code": opts.trust_remote_code}
    if opts.cache_dir:
        kwargs["cache_dir"] = opts.cache_dir
    if loc.kind in (LOCAL, CACHED):
        return str(loc.folder), {**kwargs, "local_files_only": True}
    hub.require_network(f"{src.label}: hub id {src.path}@{src.revision or 'main'}")
    if src.revision:
        kwargs["revision"] = src.revision
    if src.subfolder:
        kwargs["subfolder"] = src.subfolder
    return src.path, kwargs


def one_line(exc: BaseException) -> str:
    if "contains custom code which must be executed" in str(exc) or "trust_remote_code=True" in str(exc):
        return ("it ships its own model code (auto_map in config.json, *.py files), which runs only with "
                "modelpool.trust_remote_code: true; set it only if you trust that code")
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def quiet_transformers():
    """Silence transformers' load reports and progress bars (the run has its own progress)."""
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        transformers.utils.logging.disable_progress_bar()
    except AttributeError:  # pragma: no cover - older versions
        pass


def load_pretrained(cls, loc: Location, opts: LoadOptions):
    """``cls.from_pretrained`` for ``loc`` with the safety settings; errors become one line."""
    loc.check_weights(opts.allow_pickle)
    target, kwargs = pretrained_kwargs(loc, opts)
    kwargs["use_safetensors"] = None if opts.allow_pickle else True
    if opts.dtype:
        kwargs["dtype"] = opts.dtype
    quiet_transformers()
    try:
        model = cls.from_pretrained(target, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise InputError(f"{loc.source.label}: cannot load {loc.source.spec()} as {cls.__name__}: {one_line(exc)}") from None
    model.eval()
    return model


def load_config(loc: Location, opts: LoadOptions):
    """``AutoConfig`` of ``loc`` (local or cached only: used to build meta-device models)."""
    from transformers import AutoConfig

    target, kwargs = pretrained_kwargs(loc, opts)
    try:
        return AutoConfig.from_pretrained(target, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{loc.source.label}: cannot read the config of {loc.source.spec()}: {one_line(exc)}") from None


def meta_model(cls, config, trust_remote_code: bool = False):
    """An instance of ``cls`` on the meta device (no memory, no weights) for ``config``.

    ``trust_remote_code`` is passed to the auto classes explicitly: left out, transformers asks on
    stdin whether to run a checkpoint's code (an EOFError in CI, a hang on a terminal).
    """
    import torch

    from .architectures import SUB_CONFIGS

    sub = SUB_CONFIGS.get(cls.__name__)
    if sub and hasattr(config, sub) and not isinstance(config, getattr(cls, "config_class", type(None))):
        config = getattr(config, sub)
    with torch.device("meta"):
        if hasattr(cls, "from_config"):
            return cls.from_config(config, trust_remote_code=trust_remote_code)
        return cls._from_config(config)


def load_processor(loc: Location, opts: LoadOptions):
    """The processor (or tokenizer, or image processor) stored with ``loc``; ``None`` when there is none."""
    import transformers

    target, kwargs = pretrained_kwargs(loc, opts)
    quiet_transformers()
    for name in ("AutoProcessor", "AutoTokenizer", "AutoImageProcessor"):
        try:
            return getattr(transformers, name).from_pretrained(target, **kwargs)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return None



def remote_code(loc: Location, config: dict | None) -> list[str]:
    """The code a checkpoint would run with ``trust_remote_code``: its ``auto_map`` entries and ``*.py`` files."""
    found: list[str] = []
    auto_map = (config or {}).get("auto_map") if isinstance(config, dict) else None
    if isinstance(auto_map, dict):
        for key, value in auto_map.items():
            targets = value if isinstance(value, (list, tuple)) else [value]
            found.extend(f"{key}={t}" for t in targets if t)
    if loc.folder is not None:
        try:
            found.extend(sorted(p.name for p in loc.folder.iterdir() if p.suffix == ".py" and p.is_file()))
        except OSError:
            pass
    return found


def warn_remote_code(pool_name: str, code: dict[str, list[str]]) -> None:
    """One warning line naming the code ``trust_remote_code`` lets run, per pool."""
    import warnings

    from fusion_core import clip_text as clip

    if code:
        listed = "; ".join(f"{label}: {', '.join(items)}" for label, items in code.items())
        text = f"trust_remote_code is on for model pool {pool_name!r}: this code from the checkpoints will run: {listed}"
    else:
        text = f"trust_remote_code is on for model pool {pool_name!r}; no model of it ships code now (hub ids are checked on download)"
    with warnings.catch_warnings():  # a security notice: every run says it, not only the first in a process
        warnings.simplefilter("always")
        warnings.warn(clip(text, 400), stacklevel=3)
