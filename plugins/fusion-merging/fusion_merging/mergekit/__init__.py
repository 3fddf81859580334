"""mergekit compatibility: read mergekit YAML recipes into fusion merges."""


def require_transformers(what: str) -> None:
    """Raise a one-line InputError when transformers is not installed (``what`` needs it)."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        from fusion_core import InputError

        raise InputError(f"{what} needs transformers: pip install 'fusion-merging[hf]' (or pip install transformers)")
