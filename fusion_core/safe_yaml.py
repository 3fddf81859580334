"""Reading untrusted YAML with bounds: input size, alias expansion, YAML 1.2 number spellings.

Every YAML that fuse reads (config files, ``key=value`` overrides, methods and points files,
mergekit recipes) goes through :func:`load_text`:

- the C loader (``yaml.CSafeLoader``) is used where PyYAML was built with libyaml;
- ``1e-3``, ``1E5``, ``2.5e3`` are numbers (YAML 1.1, PyYAML's default, reads them as strings);
- aliases may add at most :data:`MAX_ALIAS_NODES` nodes to the document once expanded, so a
  "billion laughs" bomb is refused after composing its few hundred nodes instead of being
  expanded (by a message, a copy or a traversal) into gigabytes;
- recursive aliases (``&a [*a]``) are refused;
- files are read up to :data:`MAX_YAML_BYTES`.
"""

from __future__ import annotations

import re

import yaml

from .errors import ConfigError

#: largest YAML file (or value) fuse reads
MAX_YAML_BYTES = 10 * 1024 * 1024
#: most nodes that aliases may add to a document once expanded
MAX_ALIAS_NODES = 100_000

_BASE = getattr(yaml, "CSafeLoader", None) or yaml.SafeLoader

#: floats with an exponent, with or without a dot or an exponent sign (YAML 1.2 core schema)
_FLOAT_EXP = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$")


class YamlBombError(ConfigError):
    """A YAML document whose aliases expand beyond :data:`MAX_ALIAS_NODES` (or refer to themselves)."""


class FuseLoader(_BASE):  # type: ignore[misc, valid-type]
    """The safe loader (C where available) with exponent floats and bounded merge keys."""

    def flatten_mapping(self, node):
        super().flatten_mapping(node)
        if len(node.value) > MAX_ALIAS_NODES:  # merge keys (<<: [*a, *a]) copy entries: bound them too
            raise YamlBombError(f"YAML merge keys ('<<') expand a mapping to more than {MAX_ALIAS_NODES:,} entries; refusing it")

    def construct_yaml_float(self, node):
        value = self.construct_scalar(node)
        if _FLOAT_EXP.match(value):
            return float(value.replace("_", ""))
        return super().construct_yaml_float(node)


FuseLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_EXP, list("-+0123456789."))
FuseLoader.add_constructor("tag:yaml.org,2002:float", FuseLoader.construct_yaml_float)


class FuseDumper(yaml.SafeDumper):
    """The safe dumper, quoting strings that :class:`FuseLoader` would read as numbers (``'1e5'``)."""


FuseDumper.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_EXP, list("-+0123456789."))


def dump(value, **kwargs) -> str:
    """``yaml.safe_dump`` whose output :func:`load_text` reads back identically."""
    return yaml.dump(value, Dumper=FuseDumper, **kwargs)


def expanded_size(value, *, limit: int = MAX_ALIAS_NODES) -> int:
    """Nodes of ``value`` with every shared (aliased) container counted each time it appears.

    Runs in time proportional to the distinct containers (sizes are memoised), so it measures a
    bomb without expanding it.  Raises :class:`YamlBombError` when the aliases add more than
    ``limit`` nodes, or when a container contains itself.
    """
    sizes: dict[int, int] = {}
    active: set[int] = set()
    seen_text: set[int] = set()
    distinct = 0

    def size(v) -> int:
        nonlocal distinct
        if not isinstance(v, (dict, list, tuple, set)):
            if isinstance(v, (str, bytes)) and len(v) > 64:  # a long aliased string weighs its length
                weight = 1 + len(v) // 64
                if id(v) not in seen_text:
                    seen_text.add(id(v))
                    distinct += weight - 1
                return weight
            return 1
        key = id(v)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise YamlBombError("YAML aliases refer to themselves (a recursive structure); refusing it")
        active.add(key)
        items = [*v.keys(), *v.values()] if isinstance(v, dict) else v
        total = 1 + sum(size(item) for item in items)
        active.discard(key)
        sizes[key] = total
        distinct += 1 + sum(1 for item in items if not isinstance(item, (dict, list, tuple, set)))
        return total

    import sys

    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 10_000))
    try:
        total = size(value)
    except RecursionError:
        raise YamlBombError("YAML nesting is too deep; refusing it") from None
    finally:
        sys.setrecursionlimit(old)
    if total - distinct > limit:
        raise YamlBombError(
            f"YAML aliases expand this document to {_human(total)} nodes (more than {limit:,} added by aliases: "
            "an alias bomb?); write the values out instead of repeating anchors"
        )
    return total


def _human(n: int) -> str:
    for unit, size in (("billion", 10**9), ("million", 10**6)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:,}"


def load_text(text: str):
    """``yaml.safe_load(text)`` with the bounds of this module; YAML errors propagate as ``yaml.YAMLError``."""
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"YAML text of {len(text) / 2**20:.1f} MB is over fuse's limit of {MAX_YAML_BYTES // 2**20} MB")
    loader = FuseLoader(text)
    try:
        value = loader.get_single_data()
    except RecursionError:
        raise YamlBombError("YAML nesting is too deep; refusing it") from None
    except (ValueError, TypeError, IndexError, AttributeError, KeyError, OverflowError) as exc:
        # PyYAML's constructors crash on some explicit tags (``!!float ''``, ``!!timestamp x``)
        text = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ConfigError(f"YAML value cannot be read ({type(exc).__name__}: {text}); check explicit tags like !!float") from None
    finally:
        loader.dispose()
    expanded_size(value)
    return value
