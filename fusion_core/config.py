"""Typed component configs: field declarations, validation and conversion from YAML values."""

from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import Any, Literal

import attrs

from .errors import ConfigError, did_you_mean

_NOTHING = attrs.NOTHING


@attrs.frozen
class DefaultCase:
    """A refinement of :class:`DefaultBy`: under ``choice``, when field ``when`` equals ``equals``, the default is ``value``."""

    choice: str
    when: str
    equals: Any
    value: Any


@attrs.frozen
class DefaultBy:
    """The default of a field left unset (``None``) that another field of the same config chooses.

    ``values`` maps each value of the choosing ``field`` (e.g. a ``convention`` field) to this
    field's default; ``cases`` refine it by a third field's value.  The component fills the
    field at construction (its ``__attrs_post_init__``); this declaration is what ``fuse show``
    and ``fuse ui`` read to show the effective default and where it comes from.
    """

    field: str
    values: Mapping[str, Any] = attrs.field(converter=dict)
    cases: tuple[DefaultCase, ...] = attrs.field(default=(), converter=tuple)

    @staticmethod
    def of(field: attrs.Attribute) -> DefaultBy | None:
        """The :class:`DefaultBy` declared on a config field by ``option(default_by=...)``, if any."""
        return field.metadata.get("default_by")

    def value_for(self, config: Mapping[str, Any]) -> Any:
        """This field's default for the other fields' ``config`` values (field name → value)."""
        choice = config[self.field]
        for case in self.cases:
            if case.choice == choice and config.get(case.when) == case.equals:
                return case.value
        return self.values[choice]

    def describe(self, config: Mapping[str, Any], show=repr) -> str:
        """``0.2 (convention fusionbench; mergekit: 1.0, paper: 0.2)``: the value for ``config``, then the others."""
        choice = config[self.field]
        others = ", ".join(f"{name}: {show(value)}" for name, value in self.values.items() if name != choice)
        cases = "".join(f"; {c.choice} with {c.when}={show(c.equals)}: {show(c.value)}" for c in self.cases)
        return f"{show(self.value_for(config))} ({self.field} {choice}{'; ' + others if others else ''}{cases})"


def option(default: Any = _NOTHING, *, help: str, validator=None, factory=None, default_by: DefaultBy | None = None):
    """Declare a config field with its help text (shown by ``fuse show``).

    ``default`` may be omitted for a required field; use ``factory`` for mutable defaults.
    ``default_by`` declares that another field chooses the value of this one when it is left
    unset (its default must then be ``None``); see :class:`DefaultBy`.
    """
    kwargs: dict[str, Any] = {"metadata": {"help": help}}
    if default_by is not None:
        if default is not None:
            raise TypeError("option(default_by=...) needs default=None: the choosing field fills it")
        kwargs["metadata"]["default_by"] = default_by
    if validator is not None:
        kwargs["validator"] = validator
    if factory is not None:
        kwargs["factory"] = factory
    elif default is not _NOTHING:
        kwargs["default"] = default
    return attrs.field(**kwargs)


def in_range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False):
    """Validator: a number (or every number of a list) in [lo, hi] (ends open if asked); ``None`` passes.

    NaN is never in range (every comparison with NaN is false, so the test is written as "inside").
    """

    def check(instance, attribute, value):
        if value is None:
            return
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            inside = (lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or (v < hi if hi_open else v <= hi))
            if not inside:
                left = "(" if lo_open else "["
                right = ")" if hi_open else "]"
                span = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
                raise ValueError(f"{attribute.name} must be in {span}, got {summarize(v)}")

    return check


def positive(instance, attribute, value):
    """Validator: a number > 0 (``None`` passes; NaN fails)."""
    if value is not None and not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, got {summarize(value)}")


#: the seeds torch.manual_seed and numpy's generators both take
SEED_MAX = 2**63 - 1


def seed_range(instance, attribute, value):
    """Validator: a seed in [0, 2**63 - 1] (what torch and numpy generators accept)."""
    if value is not None and not 0 <= value <= SEED_MAX:
        raise ValueError(f"{attribute.name} must be in [0, 2**63 - 1], got {summarize(value)}")


def at_least_one(instance, attribute, value):
    """Validator: an integer >= 1 (``None`` passes)."""
    if value is not None and not value >= 1:
        raise ValueError(f"{attribute.name} must be >= 1, got {summarize(value)}")


_DEVICE = __import__("re").compile(r"^(cpu|mps|cuda(:[0-9]{1,3})?)$")
KNOWN_DEVICES = "cpu, cuda, cuda:N, mps"


def check_device(device: str, *, what: str = "device") -> str:
    """``device`` if it is one fuse computes on (cpu, cuda, cuda:N, mps); else a ConfigError listing them."""
    if not isinstance(device, str) or not _DEVICE.match(device):
        raise ConfigError(f"{what} must be one of {KNOWN_DEVICES}, got {summarize(device)}")
    return device


def known_device(instance, attribute, value):
    """Validator form of :func:`check_device`."""
    if not isinstance(value, str) or not _DEVICE.match(value):
        raise ValueError(f"{attribute.name} must be one of {KNOWN_DEVICES}, got {summarize(value)}")


def summarize(value: Any, *, limit: int = 80) -> str:
    """A bounded ``repr`` of ``value`` for messages: short values as is, long ones cut, with type and size.

    Never expands a whole structure (an aliased YAML value can be billions of nodes once expanded).
    """
    import reprlib

    short = reprlib.Repr()
    short.maxstring = short.maxother = limit
    short.maxlist = short.maxtuple = short.maxdict = short.maxset = 6
    short.maxlevel = 3
    short.maxlong = 40
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 10_000:
        return f"<int of {value.bit_length():,} bits>"  # str() of it would raise (int max str digits)
    text = short.repr(value)
    cut = len(text) > limit or "..." in text
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    if cut and isinstance(value, (str, bytes, list, tuple, dict, set)):
        unit = "characters" if isinstance(value, str) else "bytes" if isinstance(value, bytes) else "items"
        return f"{text} ({type(value).__name__} of {len(value):,} {unit})"
    if cut and isinstance(value, int) and not isinstance(value, bool):
        return f"{text} (int of {value.bit_length()} bits)"
    return text


# --------------------------------------------------------------------------- values and overrides

_KEY_SEGMENT = __import__("re").compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


def plain_override(key: str, value: Any) -> str:
    """``key=value`` with the value written so that :func:`parse_override` reads it back (for messages)."""
    import json

    return f"{key}={json.dumps(value, separators=(',', ':'))}" if not isinstance(value, str) else f"{key}={value}"


def parse_value(text: str) -> Any:
    """Type a command-line value the way YAML would (``0.2`` → float, ``[1,2]`` → list, ``null`` → None).

    Read with the bounded loader of :mod:`fusion_core.safe_yaml` (``1e-3`` is a number; alias bombs are refused).
    """
    import yaml

    from .safe_yaml import load_text

    if text.strip() == "":
        return ""
    try:
        return load_text(text)
    except ConfigError as exc:
        raise ConfigError(f"cannot read value {summarize(text)}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot read value {summarize(text)}: {_yaml_problem(exc)}") from None
    except ValueError as exc:  # e.g. an integer over Python's 4300-digit limit
        raise ConfigError(f"cannot read value {summarize(text)}: {str(exc).splitlines()[0]}") from None


def _yaml_problem(exc: Exception) -> str:
    problem = getattr(exc, "problem", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
    return clip(str(problem), 200)


def clip(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters (one line) for messages."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_override(arg: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into (``["a", "b"]``, typed value); malformed overrides raise ConfigError."""
    if "=" not in arg:
        raise ConfigError(f"malformed override {summarize(arg)}: expected key=value (e.g. method.density=0.2)")
    key, _, raw = arg.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"malformed override {summarize(arg)}: the key before '=' is empty")
    parts = key.split(".")
    for part in parts:
        if not _KEY_SEGMENT.match(part):
            raise ConfigError(
                f"malformed override {summarize(arg)}: {'empty' if not part else 'invalid'} key segment {summarize(part)} in {summarize(key)}"
            )
    return parts, parse_value(raw)


def refuse_repeated_keys(args, *, what: str = "override") -> None:
    """Refuse ``key=value`` arguments that set the same key twice (the last would silently win)."""
    seen: dict[str, str] = {}
    for arg in args:
        key = arg.partition("=")[0].strip()
        if key.startswith("method.") and what == "--set":
            key = key[len("method."):]
        if key in seen:
            raise ConfigError(
                f"{what} {summarize(key)} is given twice ({summarize(seen[key], limit=40)} and {summarize(arg, limit=40)}); give it once"
            )
        seen[key] = arg


def read_yaml(path, *, what: str = "config file"):
    """Read any YAML value safely; a missing/unreadable file or invalid YAML is a ConfigError naming file:line:col.

    Files over :data:`fusion_core.safe_yaml.MAX_YAML_BYTES` and anything but regular files (FIFOs,
    devices) are refused before reading; the bounded loader refuses alias bombs.
    """
    import os
    import stat

    import yaml

    from .safe_yaml import MAX_YAML_BYTES, load_text

    path = os.fspath(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    if stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{what} path is a directory, not a YAML file: {path}")
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{what} {path} is not a regular file (a FIFO or device?); give a YAML file")
    if info.st_size > MAX_YAML_BYTES:
        raise ConfigError(
            f"{what} {path} is {info.st_size / 2**20:.1f} MB; fuse reads YAML files up to {MAX_YAML_BYTES // 2**20} MB"
        )
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read(MAX_YAML_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"cannot read {what} {path}: not UTF-8 text (byte {exc.start})") from None
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{what} {path} is over {MAX_YAML_BYTES // 2**20} MB; fuse reads YAML files up to that size")
    try:
        return load_text(text)
    except ConfigError as exc:
        raise ConfigError(f"{what} {path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        raise ConfigError(f"invalid YAML at {where}: {_yaml_problem(exc)}") from None
    except ValueError as exc:
        raise ConfigError(f"invalid YAML in {path}: {str(exc).splitlines()[0]}") from None


def load_yaml_file(path) -> dict:
    """Read a YAML mapping safely; errors name file:line:col."""
    import os

    data = read_yaml(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{os.fspath(path)}: expected a mapping at the top level, got {type(data).__name__}")
    return data


# --------------------------------------------------------------------------- typed conversion


def _type_name(tp) -> str:
    if isinstance(tp, str):
        return tp
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    pass


class _NotFinite(Exception):
    """A float field given NaN, ±inf, or a number beyond float32's range (it would be inf in the kernels)."""


#: largest magnitude a float field takes: float32's (kernels compute in float32 by default; beyond it is inf)
FLOAT_LIMIT = 3.4028234663852886e38


def _convert(value: Any, tp: Any) -> Any:
    """Convert a YAML value to ``tp`` or raise _Mismatch.  Accepts int for float, list for tuple."""
    if tp is Any or tp is object:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if value in args:
            return value
        raise _Mismatch
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin in (list, tuple, typing.Sequence, __import__("collections.abc").abc.Sequence):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise _Mismatch
            return tuple(_convert(v, a) for v, a in zip(value, args, strict=True))
        inner = args[0] if args else Any
        items = [_convert(v, inner) for v in value]
        return tuple(items) if origin is tuple else items
    if origin in (dict, typing.Mapping, __import__("collections.abc").abc.Mapping):
        if not isinstance(value, dict):
            raise _Mismatch
        kt, vt = (args + (Any, Any))[:2] if args else (Any, Any)
        return {_convert(k, kt): _convert(v, vt) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                raise _NotFinite(value) from None
            if not -FLOAT_LIMIT <= number <= FLOAT_LIMIT:  # NaN fails both comparisons
                raise _NotFinite(value)
            return number
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _Mismatch


def config_fields(config_cls) -> list:
    """The attrs fields of a component's ``Config`` with types resolved."""
    attrs.resolve_types(config_cls)
    return list(attrs.fields(config_cls))


def make_config(config_cls, mapping: Mapping[str, Any] | None, *, where: str = "config"):
    """Build a validated ``config_cls`` from a mapping of YAML values.

    Unknown keys → "did you mean"; wrong types → key, expected type and value;
    validator failures → the validator's message, prefixed with the key.
    """
    mapping = dict(mapping or {})
    fields = {f.name: f for f in config_fields(config_cls)}
    kwargs = {}
    for key, value in mapping.items():
        if key not in fields:
            name = key if isinstance(key, str) and len(key) <= 80 else summarize(key)
            raise ConfigError(f"unknown field {where}.{name}{did_you_mean(str(name), fields)}")
        field = fields[key]
        try:
            kwargs[key] = _convert(value, field.type) if field.type is not None else value
        except _Mismatch:
            raise ConfigError(
                f"{where}.{key}: expected {_type_name(field.type)}, got {summarize(value)} ({type(value).__name__})"
            ) from None
        except _NotFinite as exc:
            raise ConfigError(
                f"{where}.{key}: {summarize(exc.args[0])} is not a finite number within float32's range (±3.4e38); "
                "give a finite value"
            ) from None
    missing = [name for name, f in fields.items() if f.default is attrs.NOTHING and name not in kwargs]
    if missing:
        raise ConfigError(f"{where}: missing required field(s): {', '.join(missing)}")
    try:
        return config_cls(**kwargs)
    except (ValueError, TypeError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{where}: {clip(msg, 300)}") from None


def config_to_dict(config) -> dict:
    """A component config as plain YAML-able data (tuples become lists)."""
    from .output import plain_data

    return plain_data(attrs.asdict(config, recurse=True))


def field_defaults(config_cls) -> dict[str, Any]:
    """Field name → its declared default (a factory's value; required fields left out)."""
    out = {}
    for f in config_fields(config_cls):
        if isinstance(f.default, attrs.Factory):  # type: ignore[arg-type]
            out[f.name] = f.default.factory()
        elif f.default is not attrs.NOTHING:
            out[f.name] = f.default
    return out


def describe_fields(config_cls) -> list[dict]:
    """Name, type, default and help of each field (for ``fuse show``).

    A field whose default another field chooses (:class:`DefaultBy`) shows the value chosen by
    that field's default and the other choices (``0.2 (convention fusionbench; mergekit: 1.0)``),
    and gains ``default_by_<field>`` (choice → value) and, if any, ``default_cases``.
    """
    from .output import plain_data

    defaults = field_defaults(config_cls)
    out = []
    for f in config_fields(config_cls):
        chosen = DefaultBy.of(f)
        row: dict[str, Any] = {"name": f.name, "type": _type_name(f.type)}
        if chosen is not None:
            row["default"] = chosen.describe(defaults)
        else:
            row["default"] = repr(defaults[f.name]) if f.name in defaults else "(required)"
        row["help"] = f.metadata.get("help", "")
        if chosen is not None:
            row[f"default_by_{chosen.field}"] = plain_data(chosen.values)
            if chosen.cases:
                row["default_cases"] = [plain_data(attrs.asdict(c)) for c in chosen.cases]
        out.append(row)
    return out
