"""Evaluation datasets: hub names, local data files, or folders saved with ``save_to_disk``.

A task's dataset is described by :class:`DatasetFields` (``dataset``, ``config``, ``split``,
``data_files``...).  :func:`check_dataset` validates it from the file system alone (for
``--dry-run``); :func:`load_split` loads it with ``datasets`` and turns every failure
(missing split, missing column, unreachable hub) into one clear line.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from fusion_core import ConfigError, FuseError, InputError, option

from . import hub
from .sources import HUB_ID

if TYPE_CHECKING:  # pragma: no cover
    import datasets

BUILDERS = ("csv", "json", "parquet", "arrow", "text", "imagefolder")
DataFiles = str | list[str] | dict[str, str | list[str]]


@attrs.frozen
class DatasetFields:
    dataset: str = option(help="A hub dataset ('org/name'), a builder (csv, json, parquet, arrow, text, imagefolder) with data_files, "
                          "or a local folder (saved with save_to_disk, or holding data files).")
    split: str = option("test", help="The split to evaluate.")
    config: str | None = option(None, help="The dataset configuration name (hub datasets).")
    data_files: DataFiles | None = option(None, help="Local data files: a path, a list, or {split: path(s)}.")
    revision: str | None = option(None, help="Hub revision of the dataset.")
    max_samples: int | None = option(None, help="Evaluate only the first N examples.")


def describe_dataset(spec: DatasetFields) -> str:
    what = spec.dataset if spec.data_files is None else f"{spec.dataset} files {spec.data_files}"
    return f"{what} [{spec.split}]"


def _files(data_files: Any) -> list[str]:
    if data_files is None:
        return []
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, list):
        return list(data_files)
    return [f for v in data_files.values() for f in _files(v)]


def _is_local(text: str) -> bool:
    return Path(text).expanduser().exists() or os.path.isabs(text) or text.startswith((".", "~")) or text.count("/") > 1 or not HUB_ID.match(text)


def saved_folder_info(folder: Path) -> dict | None:
    """Splits and features of a ``save_to_disk`` folder from its JSON files (``None``: not one)."""
    if (folder / "dataset_dict.json").exists():
        try:
            splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(f"{folder}/dataset_dict.json is not readable: {exc}") from None
        return {"splits": list(splits), "features": {s: _features(folder / s) for s in splits}}
    if (folder / "state.json").exists() and (folder / "dataset_info.json").exists():
        return {"splits": None, "features": {None: _features(folder)}}
    return None


def _features(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "dataset_info.json").read_text()).get("features")
    except (OSError, ValueError):
        return None


def csv_columns(path: Path) -> list[str] | None:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return next(csv.reader(fh, delimiter="\t" if path.suffix == ".tsv" else ","), None)
    except (OSError, UnicodeDecodeError):
        return None


def check_dataset(spec: DatasetFields, label: str, columns: list[str]) -> str:
    """Dry-run check of a task's dataset: paths, split and ``columns`` where visible without loading.

    :returns: a line for the plan (``"local …"`` or ``"would fetch dataset …"``).
    """
    files = _files(spec.data_files)
    for f in files:
        if "://" not in f and not any(ch in f for ch in "*?[") and not Path(f).expanduser().exists():
            raise InputError(f"{label}: data file not found: {f}")
    if spec.dataset in BUILDERS:
        if not files:
            raise ConfigError(f"{label}: dataset {spec.dataset!r} is a file format; give data_files (a path, a list or {{split: path}})")
        if isinstance(spec.data_files, dict) and spec.split not in spec.data_files:
            raise InputError(f"{label}: split {spec.split!r} not found; data_files has: {', '.join(spec.data_files)}")
        if spec.dataset == "csv":
            _check_columns(label, csv_columns(Path(files[0])), columns, files[0])
        return f"local {describe_dataset(spec)}"
    if _is_local(spec.dataset):
        folder = Path(spec.dataset).expanduser()
        if not folder.exists():
            raise InputError(f"{label}: local dataset path not found: {spec.dataset} (give a folder, a hub dataset name, or a builder with data_files)")
        info = saved_folder_info(folder) if folder.is_dir() else None
        if info is not None:
            split = spec.split
            if info["splits"] is not None:
                if split not in info["splits"]:
                    raise InputError(f"{label}: split {split!r} not found in {folder}; available splits: {', '.join(info['splits'])}")
            features = info["features"].get(split if info["splits"] is not None else None)
            if features is not None:
                _check_columns(label, list(features), columns, str(folder))
        return f"local {describe_dataset(spec)}"
    return f"would fetch dataset {spec.dataset}" + (f"/{spec.config}" if spec.config else "") + f"@{spec.revision or 'main'} [{spec.split}]"


def _check_columns(label: str, have: list[str] | None, need: list[str], where: str) -> None:
    if have is None:
        return
    for column in need:
        if column not in have:
            raise InputError(f"{label}: column {column!r} not found in {where}; columns: {', '.join(have)}")


def _pick_split(obj, spec: DatasetFields, label: str, where: str):
    import datasets

    if isinstance(obj, (datasets.DatasetDict, dict)):
        if spec.split not in obj:
            raise InputError(f"{label}: split {spec.split!r} not found in {where}; available splits: {', '.join(obj)}")
        return obj[spec.split]
    return obj


def load_split(spec: DatasetFields, label: str, *, cache_dir: str | None = None) -> "datasets.Dataset":
    """Load the split of ``spec`` (never hangs on the hub; errors are one line)."""
    import datasets

    datasets.disable_progress_bars()
    kwargs: dict[str, Any] = {"cache_dir": cache_dir} if cache_dir else {}
    files = spec.data_files
    try:
        if spec.dataset in BUILDERS:
            if files is None:
                raise ConfigError(f"{label}: dataset {spec.dataset!r} is a file format; give data_files")
            check_dataset(spec, label, [])
            obj = datasets.load_dataset(spec.dataset, data_files=files, **kwargs)
            ds = _pick_split(obj, spec, label, f"data_files {files}")
        elif _is_local(spec.dataset):
            folder = Path(spec.dataset).expanduser()
            if not folder.exists():
                raise InputError(f"{label}: local dataset path not found: {spec.dataset}")
            if folder.is_dir() and saved_folder_info(folder) is not None:
                ds = _pick_split(datasets.load_from_disk(str(folder)), spec, label, str(folder))
            else:
                obj = datasets.load_dataset(str(folder), data_files=files, **kwargs)
                ds = _pick_split(obj, spec, label, str(folder))
        else:
            ds = _load_hub(spec, label, kwargs)
    except FuseError:
        raise
    except (OSError, ValueError, FileNotFoundError) as exc:
        from .loading import one_line

        raise InputError(f"{label}: cannot load dataset {describe_dataset(spec)}: {one_line(exc)}") from None
    if spec.max_samples is not None and spec.max_samples < len(ds):
        ds = ds.select(range(spec.max_samples))
    return ds


def _load_hub(spec: DatasetFields, label: str, kwargs: dict):
    import datasets

    what = f"{label}: dataset {spec.dataset}" + (f"/{spec.config}" if spec.config else "")
    if hub.hub_offline(datasets=True):
        try:
            return datasets.load_dataset(spec.dataset, spec.config, split=spec.split, revision=spec.revision, **kwargs)
        except ValueError as exc:
            _raise_split(exc, spec, label)
            raise
        except Exception:  # offline and not cached: datasets raises several kinds
            hub.require_network(what, datasets=True)
            raise
    hub.require_network(what, datasets=True)  # raises at once when the hub cannot be reached
    try:
        return datasets.load_dataset(spec.dataset, spec.config, split=spec.split, revision=spec.revision, **kwargs)
    except ValueError as exc:
        _raise_split(exc, spec, label)
        raise


def _raise_split(exc: ValueError, spec: DatasetFields, label: str) -> None:
    text = str(exc)
    if "split" in text.lower():
        from .loading import one_line

        raise InputError(f"{label}: split {spec.split!r} not found in {spec.dataset}: {one_line(exc)}") from None


def check_columns(ds, label: str, columns: list[str], where: str) -> None:
    _check_columns(label, list(ds.column_names), columns, where)
