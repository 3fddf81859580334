"""What the Hugging Face task pools share: per-task dataset specs, lazy datasets, batching, progress."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

from fusion_core import ConfigError, TaskPool, did_you_mean, make_config

from ..data import DatasetFields, check_columns, check_dataset, describe_dataset, load_split
from ..sources import REMOTE, ModelSource, parse_entry

if TYPE_CHECKING:  # pragma: no cover
    from fusion_core import RunContext


class HFTaskPool(TaskPool):
    """A task pool whose tasks are ``{name: dataset spec}``; datasets load on first use and are kept."""

    TaskFields: ClassVar[type] = DatasetFields
    model_field: ClassVar[str] = "tokenizer"
    """The config field naming the companion model/tokenizer (hub id or folder)."""

    def task_fields(self, name: str, fields: dict) -> dict:
        """A task's fields as given in the config, before they are checked (subclasses expand presets here)."""
        return fields

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.specs = {name: make_config(self.TaskFields, self.task_fields(name, fields), where=f"taskpool.tasks.{name}")
                      for name, fields in self.config.tasks.items()}
        value = getattr(self.config, self.model_field)
        self.companion: ModelSource = parse_entry(self.model_field, value)
        self._data: dict[str, Any] = {}

    @property
    def task_names(self) -> list[str]:
        return list(self.specs)

    def columns(self, spec) -> list[str]:
        """The columns a task's dataset must have."""
        return []

    def validate(self) -> None:
        if not self.specs:
            raise ConfigError(f"task pool {self.name!r} has no tasks; set taskpool.tasks={{name: {{dataset: ..., split: ...}}}}")
        self.companion.locate(getattr(self.config, "cache_dir", None))
        for name, spec in self.specs.items():
            check_dataset(spec, f"task {name!r}", self.columns(spec))

    def describe(self) -> dict:
        loc = self.companion.locate(getattr(self.config, "cache_dir", None))
        tasks = {name: check_dataset(spec, f"task {name!r}", self.columns(spec)) for name, spec in self.specs.items()}
        out: dict[str, Any] = {self.model_field: loc.describe(), "tasks": tasks}
        fetch = [line.removeprefix("would fetch ") for line in tasks.values() if line.startswith("would fetch")]
        if loc.kind == REMOTE:
            fetch.insert(0, f"{self.companion.path}@{self.companion.revision or 'main'}")
        if fetch:
            out["would_fetch"] = fetch
        return out

    def selected(self, tasks: list[str] | None) -> list[str]:
        if tasks is None:
            return self.task_names
        unknown = [t for t in tasks if t not in self.specs]
        if unknown:
            raise ConfigError(f"task pool {self.name!r} has no task {unknown[0]!r}{did_you_mean(unknown[0], self.specs)}")
        return list(tasks)

    def dataset(self, task: str):
        """The task's split (loaded once, then kept), checked for the needed columns."""
        if task not in self._data:
            spec = self.specs[task]
            ds = load_split(spec, f"task {task!r}", cache_dir=getattr(self.config, "cache_dir", None))
            check_columns(ds, f"task {task!r}", self.columns(spec), describe_dataset(spec))
            self._data[task] = self.prepare(task, ds)
        return self._data[task]

    def prepare(self, task: str, ds):
        """Hook: turn the loaded split into what :meth:`evaluate` iterates (default: the split)."""
        return ds

    @staticmethod
    def device(ctx: "RunContext | None") -> str:
        return ctx.device if ctx is not None else "cpu"

    @staticmethod
    def batches(ds, columns: list[str], batch_size: int) -> Iterator[dict]:
        """Column batches of ``ds`` (only ``columns`` are decoded)."""
        view = ds.select_columns(columns)
        for start in range(0, len(view), batch_size):
            yield view[start : start + batch_size]

    @staticmethod
    def track(ctx: "RunContext | None", iterable, description: str, total: int):
        if ctx is None or not ctx.show_progress:
            return iterable
        return ctx.track(iterable, description, total=total)


def label_names(ds, label_column: str) -> list[str] | None:
    """Class names from a ``ClassLabel`` column, else ``None``."""
    feature = ds.features.get(label_column)
    names = getattr(feature, "names", None)
    return list(names) if names else None


def label_range(ds, label_column: str) -> tuple[int, int]:
    """(min, max) of an integer label column (from the Arrow column: no decoding)."""
    import pyarrow.compute as pc

    column = ds.data.column(label_column) if hasattr(ds, "data") else None
    if column is not None and len(ds) == ds.data.num_rows:
        result = pc.min_max(column)
        lo, hi = result["min"].as_py(), result["max"].as_py()
    else:
        values = ds[label_column]
        lo, hi = min(values), max(values)
    return int(lo), int(hi)
