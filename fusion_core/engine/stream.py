"""The streaming merge loop: one tensor name at a time, reading ahead on a thread.

Two entry points share one loop:

- :func:`merge_pool` merges an in-memory model pool (``KernelMethod.run``) and
  returns the merged state dict;
- :func:`merge_to_path` merges readers (files, folders) straight to a
  ``.safetensors`` file or a sharded HF folder (``fuse merge``).

Memory.  For each output tensor the engine holds at most two *work units*
(the one being computed and the one being read ahead).  A unit is the tensor of
every input, or, for large tensors, a block of rows of every input:

- ``method.elementwise`` kernels see row blocks of at most ``chunk_bytes`` in all, in
  row order, with ``ctx.start`` the first row's index (random kernels continue one
  random stream per tensor across the blocks); ``method.rowwise`` kernels too, for
  tensors of two or more dims;
- kernels that also implement :class:`~fusion_core.engine.protocol.TwoPhaseKernel` see,
  for large tensors, one input at a time (plus the base), then row blocks;
- other kernels see whole tensors.

What the engine may do with a method is declared by the interfaces of
:mod:`fusion_core.engine.protocol` (:class:`Kernel`, :class:`TwoPhaseKernel`,
:class:`WholeModelPasses`, :class:`Passthrough`), never probed attribute by attribute.

Whole-model statistics (:class:`~fusion_core.engine.protocol.WholeModelPasses`), for kernels
that need a statistic of a model's *whole* task vector (FusionBench's TIES trims each model's
flattened task vector to its global top k%): before merging, the engine makes up to
``model_passes(n)`` passes.  Each pass reads, for every merged tensor name, the base and then
each model's tensor (read ahead on the prefetch thread), so it holds at most two tensors of
two inputs; the statistic itself must be small (e.g. :mod:`fusion_merging.model_trim`'s sample,
histogram and kept in-window offsets: a few MiB per model, found exactly in a sample pass and
usually one counting pass), so memory stays independent of the model's size.  A method may
rely on the order (tensor names in turn, within a name the models in pool order) to sum the
models' values of one tensor in a tensor-sized buffer (FusionBench's TIES tie-break: one more
pass counting the elected signs, :mod:`fusion_merging.ties_votes`).
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import torch

from ..errors import FuseError, InputError, PluginError
from ..output import atomic_output, check_output_path
from .protocol import Kernel, KernelContext, Passthrough, TwoPhaseKernel, WholeModelPasses, streams
from .readers import TensorReader, as_reader
from .validate import ALIAS, COPY, PASSTHROUGH, TensorPlan, dtype_name, parse_dtype, plan_merge
from .writer import DEFAULT_SHARD_SIZE, FilePlan, ModelWriter, copy_planned, parse_size, plan_model_files, write_model_card

if TYPE_CHECKING:  # pragma: no cover
    from ..components import ModelPool
    from ..run_context import RunContext


def _stderr(message: str) -> None:
    from ..consoles import error_console

    error_console().print(message, markup=False, highlight=False, soft_wrap=True)


@attrs.define
class MergeOptions:
    """Settings of one merge (the ``fuse merge`` flags)."""

    seed: int = 0
    compute_dtype: str = "float32"
    out_dtype: str | None = None
    """Output dtype of float tensors; ``None``: the base's (or the inputs') dtype."""
    device: str = "cpu"
    shard_size: int | str = DEFAULT_SHARD_SIZE
    common_keys_only: bool = False
    overwrite: bool = False
    chunk_bytes: int = 64 * 2**20
    """Largest work unit (all inputs together, compute dtype) for chunkable kernels."""
    prefetch: bool = True
    """Read the next unit on a thread while the current one is computed."""
    check_finite: bool = True
    copy_files: bool = True
    """Copy the base's config/tokenizer files into an HF output folder."""
    copy_code: bool = False
    """Also copy code files (``*.py``) of the base folder (they run with ``trust_remote_code``)."""
    inputs: tuple = ()
    """Paths the output must never replace or hold (the inputs; readers' own paths are added)."""
    recipe: dict | None = None
    """Recorded in the model card."""
    progress: bool = False
    notify: Callable[[str], None] | None = None
    """Where notes go (default: stderr)."""
    finish: Callable[[Path], None] | None = None
    """Completes an HF output folder (given its temporary path) after its files are copied."""


# ---------------------------------------------------------------------------
# work units


@attrs.frozen
class _Unit:
    plan: TensorPlan
    step: str  # "whole" | "rows" | "stats" | "scan" | "copy" | "alias" | "pass"
    start: int = 0
    stop: int = 0
    index: int = -1  # stats: the input
    last: bool = True  # the unit completing this tensor


class _Loader:
    """Reads the inputs of a unit (on the prefetch thread), cast to the compute dtype and device."""

    def __init__(
        self, inputs: Sequence[TensorReader], has_base: bool, dtype: torch.dtype, device: str, check_finite: bool
    ) -> None:
        self.inputs, self.has_base, self.dtype, self.device, self.check_finite = inputs, has_base, dtype, device, check_finite
        self._base_cache: tuple[str, torch.Tensor] | None = None

    def _prepare(self, reader: TensorReader, name: str, tensor: torch.Tensor, check: bool, copy: bool = True) -> torch.Tensor:
        out = tensor.to(device=self.device, dtype=self.dtype)
        if copy and out is tensor and not reader.owns_tensors:
            out = tensor.clone()
        if check and self.check_finite and out.numel() and not bool(torch.isfinite(out.sum())):
            bad = ~torch.isfinite(out)
            if bool(bad.any()):
                n_nan = int(torch.isnan(out).sum())
                what = "NaN" if n_nan else "Inf"
                raise InputError(
                    f"tensor {name!r} of {reader.label} contains {what} values ({int(bad.sum())} non-finite); fix or drop that input"
                )
        return out

    def read(self, unit: _Unit) -> Any:
        name, inputs = unit.plan.name, self.inputs
        if unit.step in ("alias",):
            return None
        if unit.step == "copy":
            return [r.get(name) for r in inputs]
        if unit.step == "pass":
            reader = inputs[unit.plan.source_index]
            src = unit.plan.source
            tensor = reader.get_rows(src, unit.start, unit.stop) if unit.stop > unit.start else reader.get(src)
            return tensor if reader.owns_tensors else tensor.clone()
        if unit.step == "whole":
            tensors = [self._prepare(r, name, r.get(name), True) for r in inputs]
        elif unit.step == "rows":
            check = unit.index != -2
            tensors = [self._prepare(r, name, r.get_rows(name, unit.start, unit.stop), check) for r in inputs]
        elif unit.step in ("stats", "scan"):
            # scan (a whole-model pass, start = the pass): read-only, no copy; checked for NaN/Inf in pass 0 only
            check, copy = (unit.start == 0, False) if unit.step == "scan" else (True, True)
            base = None
            if self.has_base:
                if self._base_cache is None or self._base_cache[0] != name:
                    self._base_cache = None
                    self._base_cache = (name, self._prepare(inputs[0], name, inputs[0].get(name), check, copy))
                base = self._base_cache[1]
            reader = inputs[unit.index + (1 if self.has_base else 0)]
            tensor = self._prepare(reader, name, reader.get(name), check, copy)
            if unit.index == len(inputs) - (2 if self.has_base else 1):
                self._base_cache = None
            return base, tensor
        else:  # pragma: no cover - internal
            raise AssertionError(unit.step)
        if self.has_base:
            return tensors[0], tensors[1:]
        return None, tensors


class _Prefetcher:
    """Iterates ``(unit, data)`` with at most two units loaded (one in use, one read ahead)."""

    def __init__(self, units: Sequence[_Unit], load: Callable[[_Unit], Any], enabled: bool) -> None:
        self.units, self.load, self.enabled = units, load, enabled
        self._slots = threading.Semaphore(2)
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _produce(self) -> None:
        try:
            for unit in self.units:
                while not self._slots.acquire(timeout=0.1):
                    if self._stop.is_set():
                        return
                if self._stop.is_set():
                    return
                self._queue.put(("ok", unit, self.load(unit)))
            self._queue.put(("end", None, None))
        except BaseException as exc:  # handed to the consumer
            self._queue.put(("error", None, exc))

    def __iter__(self) -> Iterator[tuple[_Unit, Any]]:
        if not self.enabled:
            for unit in self.units:
                yield unit, self.load(unit)
            return
        self._thread = threading.Thread(target=self._produce, name="fuse-prefetch", daemon=True)
        self._thread.start()
        try:
            while True:
                status, unit, data = self._queue.get()
                if status == "end":
                    return
                if status == "error":
                    raise data
                yield unit, data
                del data
                self._slots.release()
        finally:
            self._stop.set()
            self._thread.join(timeout=5)


# ---------------------------------------------------------------------------
# sinks


class _MemorySink:
    def __init__(self, plans: Sequence[TensorPlan]) -> None:
        self.state: dict[str, torch.Tensor] = {}
        self.plans = {p.name: p for p in plans}

    def put(self, name: str, tensor: torch.Tensor) -> None:
        self.state[name] = tensor

    def put_rows(self, name: str, start: int, tensor: torch.Tensor) -> None:
        if name not in self.state:
            plan = self.plans[name]
            self.state[name] = torch.empty(plan.shape, dtype=plan.out_dtype)
        self.state[name][start : start + tensor.shape[0]] = tensor

    def alias(self, name: str, source: str) -> None:
        self.state[name] = self.state[source]


class _FileSink:
    def __init__(self, writer: ModelWriter) -> None:
        self.writer = writer

    def put(self, name: str, tensor: torch.Tensor) -> None:
        self.writer.write(name, tensor)

    def put_rows(self, name: str, start: int, tensor: torch.Tensor) -> None:
        self.writer.write(name, tensor, start)

    def alias(self, name: str, source: str) -> None:
        """Tied tensors are stored once (``from_pretrained`` ties them again)."""


# ---------------------------------------------------------------------------
# the engine


def _rows_per_unit(plan: TensorPlan, n_inputs: int, itemsize: int, chunk_bytes: int) -> int:
    row = math.prod(plan.shape[1:]) * itemsize * n_inputs
    return max(1, chunk_bytes // max(1, row))


def _plan_units(
    method: Any, plans: Sequence[TensorPlan], n_inputs: int, n_models: int, itemsize: int, chunk_bytes: int
) -> list[_Unit]:
    elementwise = isinstance(method, Kernel) and method.elementwise
    rowwise = isinstance(method, Kernel) and method.rowwise
    two_phase = isinstance(method, TwoPhaseKernel)
    units: list[_Unit] = []
    for plan in plans:
        numel = math.prod(plan.shape)
        if plan.kind == ALIAS:
            units.append(_Unit(plan, "alias"))
            continue
        if plan.kind == COPY:
            units.append(_Unit(plan, "copy"))
            continue
        big = len(plan.shape) >= 1 and plan.shape[0] > 1
        if plan.kind == PASSTHROUGH:
            rows = _rows_per_unit(plan, 1, itemsize, chunk_bytes)
            if big and numel * itemsize > chunk_bytes:
                starts = list(range(0, plan.shape[0], rows))
                units += [_Unit(plan, "pass", s, min(s + rows, plan.shape[0]), last=s == starts[-1]) for s in starts]
            else:
                units.append(_Unit(plan, "pass"))
            continue
        big = big and numel * itemsize * n_inputs > chunk_bytes
        by_rows = elementwise or (rowwise and len(plan.shape) >= 2)
        if big and (by_rows or two_phase):
            rows = _rows_per_unit(plan, n_inputs, itemsize, chunk_bytes)
            if two_phase and not by_rows:
                units += [_Unit(plan, "stats", index=i, last=False) for i in range(n_models)]
            starts = list(range(0, plan.shape[0], rows))
            # rows already checked for NaN/Inf in the stats pass are not checked again
            index = -2 if (two_phase and not by_rows) else -1
            units += [_Unit(plan, "rows", s, min(s + rows, plan.shape[0]), index=index, last=s == starts[-1]) for s in starts]
        else:
            units.append(_Unit(plan, "whole"))
    return units


def _check_output(method: Any, name: str, out: Any, shape: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise PluginError(f"method {method.name!r} returned a {type(out).__name__} for tensor {name!r}, not a tensor")
    if tuple(out.shape) != tuple(shape):
        raise PluginError(f"method {method.name!r} returned shape {list(out.shape)} for tensor {name!r} of shape {list(shape)}")
    return out


def _run(
    method: Any,
    inputs: Sequence[TensorReader],
    has_base: bool,
    plans: Sequence[TensorPlan],
    sink: Any,
    *,
    kernel_context: Callable[[str], KernelContext],
    compute_dtype: torch.dtype,
    device: str,
    opts: MergeOptions,
    progress: Callable[[], None] | None = None,
) -> None:
    n_models = len(inputs) - (1 if has_base else 0)
    loader = _Loader(inputs, has_base, compute_dtype, device, opts.check_finite)
    _model_passes(method, plans, n_models, loader, kernel_context, opts.prefetch)
    units = _plan_units(method, plans, len(inputs), n_models, compute_dtype.itemsize, opts.chunk_bytes)
    stats: dict[str, list] = {}
    labels = [r.label for r in inputs]
    iterator = iter(_Prefetcher(units, loader.read, opts.prefetch))
    try:
        _consume(method, iterator, sink, stats, labels, kernel_context, progress, opts.check_finite)
    finally:
        iterator.close()


def _model_passes(method, plans, n_models: int, loader: "_Loader", kernel_context, prefetch: bool) -> None:
    """Run the method's whole-model passes (see the module docstring), if it asks for any."""
    if not isinstance(method, WholeModelPasses):
        return
    merged = [p for p in plans if p.kind not in (ALIAS, COPY, PASSTHROUGH)]
    for pass_index in range(int(method.model_passes(n_models))):
        units = [_Unit(plan, "scan", start=pass_index, index=i, last=False) for plan in merged for i in range(n_models)]
        iterator = iter(_Prefetcher(units, loader.read, prefetch))
        try:
            for unit, (base, tensor) in iterator:
                name = unit.plan.name
                method.model_pass(pass_index, name, base, tensor, unit.index, kernel_context(name))
                del base, tensor
        finally:
            iterator.close()
        if method.model_pass_end(pass_index):
            break


def _consume(method, iterator, sink, stats, labels, kernel_context, progress, check=True) -> None:
    while True:
        try:
            unit, data = next(iterator)
        except StopIteration:
            break
        _process(method, unit, data, sink, stats, labels, kernel_context, check)
        del data  # before the next read is allowed to start
        if unit.last and progress is not None:
            progress()


def _finish(plan: TensorPlan, out: torch.Tensor, method: Any = None, check: bool = False) -> torch.Tensor:
    done = out.detach().to(device="cpu", dtype=plan.out_dtype)
    # a sum is a cheap first test (no mask allocated); only a non-finite sum looks element by element
    if check and done.is_floating_point() and not bool(torch.isfinite(done.sum())) and not bool(torch.isfinite(done).all()):
        raise InputError(_non_finite_message(method, plan, out, done))
    return done


def _non_finite_message(method: Any, plan: TensorPlan, out: torch.Tensor, done: torch.Tensor) -> str:
    """Which merged tensor went non-finite, and the config field (or dtype) that most likely did it."""
    what = "NaN" if bool(torch.isnan(done).any()) else "Inf"
    head = f"merged tensor {plan.name!r} has {what} values, so nothing was written"
    if bool(torch.isfinite(out).all()):
        return f"{head}: it overflows {dtype_name(plan.out_dtype)}; choose a wider --dtype or smaller method fields"
    suspects = []
    config = getattr(method, "config", None)
    for field in attrs.fields(type(config)) if attrs.has(type(config)) else ():
        values = getattr(config, field.name)
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if isinstance(value, float) and (not math.isfinite(value) or abs(value) > 1e4):
                suspects.append(f"{field.name}={value}")
                break
    if suspects:
        return f"{head}; likely cause: {', '.join(suspects)} (fix the method field{'s' if len(suspects) > 1 else ''})"
    return f"{head}; check the method's fields (`fuse show {getattr(method, 'name', 'METHOD')}`) and the inputs"


def _process(method, unit: _Unit, data: Any, sink, stats: dict, labels: list[str], kernel_context, check=True) -> None:
    plan, name = unit.plan, unit.plan.name
    if unit.step == "alias":
        sink.alias(name, plan.source)
    elif unit.step == "copy":
        first = data[0]
        for label, other in zip(labels[1:], data[1:], strict=True):
            if not torch.equal(first, other):
                raise InputError(
                    f"non-float tensor {name!r} ({dtype_name(first.dtype)}) differs between {labels[0]} and {label}; "
                    "integer tensors cannot be merged"
                )
        sink.put(name, first)
    elif unit.step == "pass":
        if unit.stop > unit.start:
            sink.put_rows(name, unit.start, _finish(plan, data))
        else:
            sink.put(name, _finish(plan, data))
    elif unit.step == "whole":
        base, tensors = data
        out = method.kernel(name, base, tensors, kernel_context(name))
        sink.put(name, _finish(plan, _check_output(method, name, out, plan.shape), method, check))
    elif unit.step == "stats":
        base, tensor = data
        stats.setdefault(name, []).append(method.chunk_stats(name, base, tensor, unit.index, kernel_context(name)))
    elif unit.step == "rows":
        base, tensors = data
        shape = (unit.stop - unit.start,) + tuple(plan.shape[1:])
        if name in stats:
            out = method.kernel_chunk(name, base, tensors, kernel_context(name), stats[name], unit.start)
        else:  # an elementwise (or rowwise) kernel on rows [start, stop): ctx.start says where they begin
            out = method.kernel(name, base, tensors, attrs.evolve(kernel_context(name), start=unit.start))
        sink.put_rows(name, unit.start, _finish(plan, _check_output(method, name, out, shape), method, check))
        if unit.last:
            stats.pop(name, None)


def _prepare_method(method: Any, n_models: int, has_base: bool) -> None:
    if not streams(method):
        raise InputError(
            f"method {getattr(method, 'name', method)!r} is not a per-tensor method; it cannot be used by the merge engine"
        )
    method.check_inputs(n_models, has_base)


def _plans(
    method: Any, inputs: Sequence[TensorReader], has_base: bool, opts: MergeOptions, notify: Callable[[str], None]
) -> list[TensorPlan]:
    out_dtype = parse_dtype(opts.out_dtype, what="output dtype")
    if isinstance(method, Passthrough):
        return method.passthrough_plan(inputs, has_base, out_dtype=out_dtype)
    return plan_merge(inputs, has_base, common_keys_only=opts.common_keys_only, out_dtype=out_dtype, notify=notify)


def _kernel_contexts(seed: int, compute: torch.dtype, device: str) -> Callable[[str], KernelContext]:
    """Tensor name → its kernel context: the one route by which the seed reaches kernels."""
    dtype = dtype_name(compute)
    return lambda name: KernelContext(name=name, seed=seed, compute_dtype=dtype, device=device)


def _check_device(device: str) -> str:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device} but no CUDA device is available (use --device cpu)")
    try:
        torch.device(device)
    except RuntimeError:
        raise InputError(f"unknown device {device!r} (use cpu or cuda)") from None
    return device


def merge_readers(
    method: Any,
    base: Any,
    models: Sequence[Any],
    options: MergeOptions | None = None,
    progress: Callable[[], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Merge in memory: ``base`` (or ``None``) and ``models`` are readers, paths, state dicts or modules."""
    opts = options or MergeOptions()
    notify = opts.notify or _stderr
    inputs = ([as_reader(base, label="base")] if base is not None else []) + [
        as_reader(m, label=f"model {i + 1}") for i, m in enumerate(models)
    ]
    has_base = base is not None
    _prepare_method(method, len(models), has_base)
    compute = parse_dtype(opts.compute_dtype, what="compute dtype")
    device = _check_device(opts.device)
    plans = _plans(method, inputs, has_base, opts, notify)
    sink = _MemorySink(plans)
    ctx_for = _kernel_contexts(opts.seed, compute, device)
    _run(
        method,
        inputs,
        has_base,
        plans,
        sink,
        kernel_context=ctx_for,
        compute_dtype=compute,
        device=device,
        opts=opts,
        progress=progress,
    )
    return sink.state


def merge_pool(method: Any, pool: "ModelPool", ctx: "RunContext") -> dict[str, torch.Tensor]:
    """Merge the models of ``pool`` in memory with ``method``'s kernel; returns the merged state dict."""
    names = list(pool.model_names)
    base = pool.reader(None) if pool.has_base else None
    readers = [pool.reader(name) for name in names]
    opts = MergeOptions(seed=ctx.seed, compute_dtype=ctx.compute_dtype, device=ctx.device, prefetch=False)
    total = len(readers[0].keys()) if readers else 0
    ticks = (
        ctx.track(range(total), f"merging ({method.name})", total=total)
        if ctx.show_progress and total
        else None
    )
    try:
        return merge_readers(
            method,
            base,
            readers,
            opts,
            progress=(lambda: next(ticks, None)) if ticks is not None else None,
        )
    finally:
        if ticks is not None:
            for _ in ticks:  # finish the bar (keys skipped or tied) and close it
                pass
        for reader in ([base] if base is not None else []) + readers:
            reader.close()


def reader_paths(readers: Sequence[TensorReader | None]) -> list[Path]:
    """The files or folders ``readers`` read (what an output must never replace)."""
    paths = []
    for reader in readers:
        folder = getattr(reader, "folder", None)
        file = getattr(getattr(reader, "file", None), "path", None)
        for path in (folder, file):
            if path is not None:
                paths.append(Path(path))
    return paths


def _plan_files(source: Path | None, opts: MergeOptions, notify: Callable[[str], None]) -> FilePlan:
    """The base folder's files for the output, checked before any work (links out, code, a broken config)."""
    if not opts.copy_files:
        return FilePlan()
    files = plan_model_files(source, copy_code=opts.copy_code)
    if files.skipped_code:
        notify(f"note: not copied: {', '.join(files.skipped_code)} (code; pass --copy-code to copy it)")
    if files.config_invalid:
        where = Path(files.source or "") / "config.json"
        if opts.out_dtype is not None:
            raise InputError(
                f"{where} is {files.config_invalid}, so --dtype {opts.out_dtype} cannot be recorded in it; fix the file or drop --dtype"
            )
        notify(f"warning: {where} is {files.config_invalid}; copied as it is")
    return files


def merge_to_path(
    method: Any,
    base_reader: TensorReader | None,
    readers: Sequence[TensorReader],
    output: str | Path,
    options: MergeOptions | None = None,
) -> Path:
    """Merge ``readers`` (with ``base_reader``) to ``output``: a ``.safetensors`` file, or else an HF folder.

    Validates everything from headers first (and the output path: see
    :func:`fusion_core.output.check_output_path`); writes to a temporary path beside
    ``output`` and renames it into place when complete.
    """
    opts = options or MergeOptions()
    notify = opts.notify or _stderr
    output = Path(output)
    has_base = base_reader is not None
    inputs = ([base_reader] if has_base else []) + list(readers)
    protected = [*opts.inputs, *reader_paths(inputs)]
    _prepare_method(method, len(readers), has_base)
    compute = parse_dtype(opts.compute_dtype, what="compute dtype")
    out_dtype = parse_dtype(opts.out_dtype, what="output dtype")
    device = _check_device(opts.device)
    shard_size = parse_size(opts.shard_size)
    check_output_path(output, overwrite=opts.overwrite, inputs=protected)
    plans = _plans(method, inputs, has_base, opts, notify)
    entries = [(p.name, p.shape, p.out_dtype) for p in plans if p.kind != ALIAS]
    single = output.suffix == ".safetensors"
    files = FilePlan() if single else _plan_files(inputs[0].folder, opts, notify)
    ctx_for = _kernel_contexts(opts.seed, compute, device)
    with atomic_output(output, overwrite=opts.overwrite, inputs=protected, notify=notify) as tmp:
        writer = ModelWriter(tmp, entries, shard_size=shard_size, single_file=single)
        try:
            with _cli_progress(opts.progress, f"merging ({getattr(method, 'name', 'merge')})", len(plans)) as advance:
                _run(
                    method,
                    inputs,
                    has_base,
                    plans,
                    _FileSink(writer),
                    kernel_context=ctx_for,
                    compute_dtype=compute,
                    device=device,
                    opts=opts,
                    progress=advance,
                )
            writer.finish()
        finally:
            writer.close()
        if not single:
            copy_planned(files, tmp, dtype=out_dtype)
            if opts.copy_files and isinstance(method, Passthrough):
                method.update_config(tmp / "config.json")
            if opts.finish is not None:
                opts.finish(tmp)
            recipe = dict(opts.recipe or {})
            tied = {p.name: p.source for p in plans if p.kind == ALIAS}
            if tied:
                recipe.setdefault("tied", tied)
            write_model_card(tmp, recipe)
    return output


class _cli_progress:
    """A transient rich progress bar on stderr (a no-op when off or not a terminal)."""

    def __init__(self, enabled: bool, description: str, total: int) -> None:
        self.enabled, self.description, self.total = enabled, description, total
        self._progress = None

    def __enter__(self) -> Callable[[], None] | None:
        if not self.enabled:
            return None
        from ..consoles import error_console

        console = error_console()
        if not console.is_terminal:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self._progress.__enter__()
        task = self._progress.add_task(self.description, total=self.total)
        return lambda: self._progress.advance(task)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)


__all__ = ["MergeOptions", "merge_pool", "merge_readers", "merge_to_path", "FuseError"]
