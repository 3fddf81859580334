"""``fuse analyze task-vectors``: how task vectors relate, streamed tensor by tensor.

For task vectors ``τ_i = θ_i − θ₀`` (in float64) it reports, for the whole model and per layer:

- the pairwise cosine similarity ``τ_i·τ_j / (max(‖τ_i‖, ε)·max(‖τ_j‖, ε))`` (ε = 1e-8, torch's
  ``cosine_similarity``; FusionBench 0.2.33's ``TaskVectorCosSimilarity`` computes the same on the
  flattened trainable parameters);
- sign conflicts: per pair the fraction of entries where ``τ_i·τ_j < 0``, and for all models the
  fraction of entries where some task vector is positive and another negative (what TIES's sign
  election resolves);
- magnitudes per model: ‖τ‖₂, mean |τ|, max |τ|, and the fraction of exact zeros.

Only dot products, counts and sums are kept (an N×N matrix per layer), and tensors are read in
row blocks of 2¹⁶ entries per model (small, uniform allocations: larger blocks let glibc's heap grow with the
number of tensors), so memory does not depend on the model's size.  Torch is imported inside.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from fusion_core import InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fusion_core import TensorReader

EPS = 1e-8
BLOCK = 1 << 16
"""Entries read per model at a time (row blocks), so memory does not grow with the tensor."""
WHOLE = "(whole model)"


def block_of(name: str) -> str:
    """The layer a tensor belongs to: its numbered block (``model.layers.3``), else its module."""
    match = re.match(r"^(.*?\.\d+)\.", name)
    if match:
        return match.group(1)
    return name.rsplit(".", 1)[0] if "." in name else name


class _Stats:
    """Sums over the entries of one group of tensors, for N task vectors."""

    def __init__(self, n: int) -> None:
        import torch

        self.dot = torch.zeros(n, n, dtype=torch.float64)
        self.opposite = torch.zeros(n, n, dtype=torch.float64)
        self.abs_sum = [0.0] * n
        self.max_abs = [0.0] * n
        self.zeros = [0] * n
        self.conflicts = 0
        self.entries = 0

    def add(self, taus: Sequence["torch.Tensor"]) -> None:
        import torch

        flat = torch.stack([t.reshape(-1) for t in taus])  # (N, entries) float64
        signs = torch.sign(flat)
        self.dot += flat @ flat.t()
        self.opposite += (signs @ signs.t() - (signs.abs() @ signs.abs().t())).abs() / 2  # count of τ_i·τ_j < 0
        absolute = flat.abs()
        for i in range(len(taus)):
            self.abs_sum[i] += float(absolute[i].sum())
            self.max_abs[i] = max(self.max_abs[i], float(absolute[i].max()) if absolute.shape[1] else 0.0)
            self.zeros[i] += int((flat[i] == 0).sum())
        self.conflicts += int(((flat > 0).any(0) & (flat < 0).any(0)).sum())
        self.entries += flat.shape[1]

    def merge(self, other: "_Stats") -> None:
        self.dot += other.dot
        self.opposite += other.opposite
        self.abs_sum = [a + b for a, b in zip(self.abs_sum, other.abs_sum, strict=True)]
        self.max_abs = [max(a, b) for a, b in zip(self.max_abs, other.max_abs, strict=True)]
        self.zeros = [a + b for a, b in zip(self.zeros, other.zeros, strict=True)]
        self.conflicts += other.conflicts
        self.entries += other.entries

    def result(self, names: Sequence[str]) -> dict[str, Any]:
        n = len(names)
        norms = [math.sqrt(max(0.0, float(self.dot[i, i]))) for i in range(n)]
        entries = max(1, self.entries)
        cosine = [[float(self.dot[i, j]) / (max(norms[i], EPS) * max(norms[j], EPS)) for j in range(n)] for i in range(n)]
        return {
            "entries": self.entries,
            "cosine": cosine,
            "sign_conflict": [[float(self.opposite[i, j]) / entries for j in range(n)] for i in range(n)],
            "any_sign_conflict": self.conflicts / entries,
            "magnitude": {
                name: {"l2": norms[i], "mean_abs": self.abs_sum[i] / entries, "max_abs": self.max_abs[i],
                       "zero_fraction": self.zeros[i] / entries}
                for i, name in enumerate(names)
            },
        }


def analyze(base: "TensorReader", models: Sequence["TensorReader"], names: Sequence[str], *,
            group: Callable[[str], str] | None = block_of) -> dict[str, Any]:
    """The analysis of ``models`` against ``base``: ``{"models", "whole", "layers": {layer: ...}}``.

    Floating-point tensors of the base are read one at a time (every model must have each one, with
    the same shape); tied copies are counted once.  ``group=None`` gives one row per tensor.
    """
    if len(models) < 2:
        raise InputError("analyze task-vectors needs at least two models besides the base (--model M1 --model M2)")
    aliases = base.aliases()
    layers: dict[str, _Stats] = {}
    for key in base.keys():
        if key in aliases or not base.dtype(key).is_floating_point:
            continue
        shape = tuple(base.shape(key))
        for reader in models:
            if key not in reader:
                raise InputError(f"model {reader.label} has no tensor {key!r} of the base; task vectors need the same architecture")
            if tuple(reader.shape(key)) != shape:
                raise InputError(f"tensor {key!r} of model {reader.label} has shape {list(reader.shape(key))}, the base's {list(shape)}")
        layer = group(key) if group else key
        stats = layers.setdefault(layer, _Stats(len(models)))
        for start, stop in _row_blocks(shape):
            b = _rows(base, key, start, stop)
            stats.add([_rows(reader, key, start, stop) - b for reader in models])
    if not layers:
        raise InputError(f"the base {base.label} has no floating-point tensors to compare")
    whole = _Stats(len(models))
    for stats in layers.values():
        whole.merge(stats)
    return {"models": list(names), "whole": whole.result(names), "layers": {k: v.result(names) for k, v in layers.items()}}


def _row_blocks(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """Row ranges of about :data:`BLOCK` entries (a 0-d tensor: one block)."""
    if not shape:
        return [(0, 1)]
    row = math.prod(shape[1:])
    step = max(1, BLOCK // max(1, row))
    return [(start, min(shape[0], start + step)) for start in range(0, shape[0], step)] or [(0, 0)]


def _rows(reader: "TensorReader", key: str, start: int, stop: int) -> "torch.Tensor":
    import torch

    value = reader.get(key) if not reader.shape(key) else reader.get_rows(key, start, stop)
    return value.to(torch.float64)


def pair_records(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per (layer, pair of models): cosine and pairwise sign conflict; the whole model first."""
    names = report["models"]
    out = []
    for layer, row in [(WHOLE, report["whole"]), *report["layers"].items()]:
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                out.append({"layer": layer, "a": names[i], "b": names[j], "cosine": f"{row['cosine'][i][j]:.4f}",
                            "sign_conflict": f"{row['sign_conflict'][i][j]:.4f}", "any_conflict": f"{row['any_sign_conflict']:.4f}"})
    return out


def magnitude_records(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per model: the whole model's task-vector magnitudes."""
    return [{"model": name, "l2": f"{m['l2']:.4g}", "mean_abs": f"{m['mean_abs']:.4g}", "max_abs": f"{m['max_abs']:.4g}",
             "zero_fraction": f"{m['zero_fraction']:.4f}"} for name, m in report["whole"]["magnitude"].items()]


def heatmap_png(report: dict[str, Any], path: Path) -> None:
    """The whole-model cosine matrix as an annotated heat map (matplotlib, the ``plot`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--png needs matplotlib: pip install 'fusion-merging[plot]' (or pip install matplotlib)") from None
    from fusion_core import atomic_output

    names, matrix = report["models"], report["whole"]["cosine"]
    size = 1.2 + 0.7 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    image = ax.imshow(matrix, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if abs(value) > 0.6 else "black", fontsize=8)
    ax.set_title("task-vector cosine similarity")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    with atomic_output(path, overwrite=False) as tmp:
        fig.savefig(tmp, format="png", dpi=120, metadata={"Software": None})
    plt.close(fig)


def _labels(paths: Sequence[str]) -> list[str]:
    labels = [Path(p).stem if Path(p).suffix == ".safetensors" else Path(p).name for p in paths]
    return [f"{label}#{i}" if labels.count(label) > 1 else label for i, label in enumerate(labels)]


@click.group("analyze")
def analyze_group():
    """Analyses of models that merge nothing (task vectors)."""


@analyze_group.command("task-vectors")
@click.option("--base", required=True, metavar="PATH", help="The pretrained model (.safetensors file or HF folder).")
@click.option("--model", "models", required=True, multiple=True, metavar="PATH", help="A fine-tuned model; repeat (at least two).")
@click.option("--per", type=click.Choice(["block", "tensor"]), default="block", show_default=True,
              help="Rows per numbered block (model.layers.3) or per tensor.")
@click.option("--png", "png", default=None, metavar="FILE", help="Write the whole-model cosine heat map (needs matplotlib).")
@click.option("--json", "json_path", default=None, metavar="FILE", help="Write every matrix and statistic as JSON.")
@click.option("--allow-pickle", is_flag=True, help="Read pickle checkpoints (they can run code: only trusted files).")
@click.option("--format", "fmt", type=click.Choice(["table", "plain", "json", "csv"]), default=None,
              help="Output format (default: tables on a terminal, tab-separated records when piped).")
def task_vectors_command(base, models, per, png, json_path, allow_pickle, fmt):
    """Pairwise cosine similarity, sign conflicts and magnitudes of the task vectors MODEL − BASE.

    \b
      fuse analyze task-vectors --base base/ --model a/ --model b/ --model c/ --png cos.png
    """
    from fusion_core import Column, check_output_path, default_format, emit, open_reader, write_text_atomic

    inputs = [base, *models]
    for out in (png, json_path):
        if out:
            check_output_path(out, overwrite=False, inputs=inputs)
    names = _labels(models)
    base_reader = open_reader(base, allow_pickle=allow_pickle, label=str(base))
    readers = [open_reader(p, allow_pickle=allow_pickle, label=str(p)) for p in models]
    try:
        report = analyze(base_reader, readers, names, group=block_of if per == "block" else None)
    finally:
        for reader in [base_reader, *readers]:
            reader.close()
    if json_path:
        write_text_atomic(json_path, json.dumps(report, indent=2) + "\n")
    if png:
        heatmap_png(report, Path(png))
    pairs = [Column("layer", keep=True), Column("a", keep=True), Column("b", keep=True), Column("cosine", justify="right", keep=True),
             Column("sign_conflict", justify="right"), Column("any_conflict", justify="right")]
    if fmt == "json":
        emit([], pairs, "json", json_data=report)
        return
    emit(pair_records(report), pairs, fmt, title="task vectors: cosine similarity and sign conflicts")
    if (fmt or default_format()) in ("plain", "csv"):
        click.echo("")  # records of the second table after one blank line
    mags = [Column("model", keep=True), Column("l2", justify="right"), Column("mean_abs", justify="right"),
            Column("max_abs", justify="right"), Column("zero_fraction", justify="right")]
    emit(magnitude_records(report), mags, fmt, title="task-vector magnitudes (whole model)")

