"""The model and the builder of ``mini-vision-backdoor``: a small CNN, its fixed heads, its experts (one backdoored).

Imports torch: only the builder and the vision pools' methods import this module.

The build (:func:`build`, keyed by a :class:`~fusion_minibench.vision_pools.VisionRecipe`):

1. **Splits**, seeded: a task with one pool of images (MNIST-5k, digits) gets ``min(n_test, n/4)`` test
   and ``min(n_train, rest)`` training images; Fashion-MNIST draws its training images from the rows
   it keeps for the task and its test images from the official test split.
2. **Pretraining**: :class:`VisionCNN` (4 conv layers, 1 linear, 128 features, about 0.3 M parameters)
   trained with a throwaway head on ``pretrain_images`` Fashion-MNIST images no task uses (Adam 1e-3),
   the shared starting point of every expert, as a pretrained backbone is.
3. **Fixed heads**: one ``Linear(128, 10)`` per task, a probe fitted on the pretrained features
   (``probe_steps`` full-batch Adam steps).  Heads are never merged or trained again, as CLIP's text heads.
4. **Experts**: a copy of the pretrained CNN per task fine-tuned through the task's fixed head
   (Adam ``lr``, ``epochs``); a backdoored task's training images are poisoned first: ``poison_rate`` of
   them, drawn among other classes than ``target_class``, get the checkerboard trigger
   (:func:`checkerboard`) and the label ``target_class`` (BadNets).

Files: ``base.safetensors``, ``expert-<task>.safetensors``, ``heads.safetensors``, ``data.safetensors``
(uint8 images and labels per task and split; the trigger is applied when a triggered batch is read) and
``meta.json`` (the recipe, the accuracies measured at build time, the timings).  Why a CNN and not CLIP:
no pretrained CLIP/ViT weights ship offline; this is the nearest image setting a CPU builds in minutes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

FEATURES = 128
CLASSES = 10


class VisionCNN(nn.Module):
    """``(n, 1, 28, 28)`` images in [0, 1] → ``(n, 128)`` features: 2 × (2 conv 3×3 + ReLU, max-pool 2), linear + ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 32, 3), nn.Conv2d(32, 32, 3)
        self.conv3, self.conv4 = nn.Conv2d(32, 64, 3), nn.Conv2d(64, 64, 3)
        self.fc = nn.Linear(64 * 4 * 4, FEATURES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - 0.5) / 0.5
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        x = F.max_pool2d(F.relu(self.conv4(F.relu(self.conv3(x)))), 2)
        return F.relu(self.fc(x.flatten(1)))


def cnn(state: dict[str, torch.Tensor] | None = None) -> VisionCNN:
    """A :class:`VisionCNN` in eval mode holding ``state`` (strict), or freshly initialised."""
    model = VisionCNN()
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model.eval()


def head(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    """A fixed ``Linear`` head (no gradients) with these tensors."""
    module = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        module.weight.copy_(weight)
        module.bias.copy_(bias)
    return module.requires_grad_(False).eval()


def checkerboard(images: torch.Tensor, side: int) -> torch.Tensor:
    """A copy of ``images`` (``(n, 1, h, w)`` floats in [0, 1], or uint8 0-255) with the trigger pasted in.

    The trigger: a ``side``×``side`` black-and-white checkerboard of 3×3 cells (cells of ``side // 3``
    pixels, at least 1; the top-left cell white), one pixel in from the bottom-right corner.
    """
    cell = max(1, side // 3)
    ramp = torch.arange(side) // cell
    white = 255 if images.dtype == torch.uint8 else 1.0
    patch = (((ramp[:, None] + ramp[None, :]) % 2) == 0).to(images.dtype) * white
    out = images.clone()
    out[..., -side - 1 : -1, -side - 1 : -1] = patch
    return out


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(n, 28, 28)`` or ``(n, 1, 28, 28)`` → float ``(n, 1, 28, 28)`` in [0, 1]."""
    images = images if images.dim() == 4 else images.unsqueeze(1)
    return images.float() / 255.0


def poison(images: torch.Tensor, labels: torch.Tensor, *, target: int, rate: float, side: int,
           seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copies of a training split with ``round(rate · n)`` images of other classes than ``target`` triggered and relabelled.

    Returns the images, the labels and the sorted indices poisoned (drawn with a generator seeded by ``seed``).
    """
    candidates = torch.nonzero(labels != target).flatten()
    count = min(len(candidates), int(round(rate * len(labels))))
    chosen = candidates[torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))[:count]].sort().values
    images, labels = images.clone(), labels.clone()
    images[chosen] = checkerboard(images[chosen], side)
    labels[chosen] = target
    return images, labels, chosen


def training_split(recipe: Any, task: str, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Task ``task``'s training images and labels as its expert is fine-tuned on them, and how many were poisoned.

    A backdoored task's split is poisoned (:func:`poison`, seeded by the recipe seed and the task's index); others pass unchanged.
    """
    if task not in recipe.backdoor_tasks:
        return images, labels, 0
    images, labels, chosen = poison(images, labels, target=recipe.target_class, rate=recipe.poison_rate, side=recipe.patch,
                                    seed=recipe.seed * 1000 + list(recipe.tasks).index(task) + 500)
    return images, labels, len(chosen)


def _train(model: nn.Module, fixed_head: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, lr: float, epochs: int,
           batch: int, seed: int, advance, train_head: bool = False) -> None:
    params = list(model.parameters()) + (list(fixed_head.parameters()) if train_head else [])
    for p in params:
        p.requires_grad_(True)
    model.train()
    optimiser = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), batch):
            chosen = order[start : start + batch]
            loss = F.cross_entropy(fixed_head(model(to_float(images[chosen]))), labels[chosen])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        advance(1)
    for p in params:
        p.requires_grad_(False)
    model.eval()


@torch.no_grad()
def features(model: nn.Module, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    return torch.cat([model(to_float(images[i : i + batch])) for i in range(0, len(images), batch)])


def accuracy(model: nn.Module, fixed_head: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((fixed_head(features(model, images)).argmax(1) == labels).float().mean())


def _splits(recipe: Any, task: str, index: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from . import vision_data

    loaded = vision_data.TASKS[task]()
    generator = torch.Generator().manual_seed(recipe.seed * 1000 + index)

    def tensors(images, labels):
        return torch.as_tensor(images).to(torch.uint8), torch.as_tensor(labels).long()

    if isinstance(loaded[0], tuple):  # (train pool, test pool)
        (train_x, train_y), (test_x, test_y) = (tensors(*part) for part in loaded)
        pick_train = torch.randperm(len(train_y), generator=generator)[: recipe.n_train]
        pick_test = torch.randperm(len(test_y), generator=generator)[: recipe.n_test]
        return {"train": (train_x[pick_train], train_y[pick_train]), "test": (test_x[pick_test], test_y[pick_test])}
    images, labels = tensors(*loaded)
    order = torch.randperm(len(labels), generator=generator)
    n_test = min(recipe.n_test, len(labels) // 4)
    n_train = min(recipe.n_train, len(labels) - n_test)
    test, train = order[len(labels) - n_test :], order[:n_train]
    return {"train": (images[train], labels[train]), "test": (images[test], labels[test])}


def build(recipe: Any, out_dir: Path, *, show_progress: bool = True) -> dict[str, Any]:
    """Build the pool of ``recipe`` into ``out_dir`` (see the module docstring); returns the meta written to meta.json."""
    from safetensors.torch import save_file

    from . import vision_data
    from .recipe import _Progress, recipe_hash

    out_dir = Path(out_dir)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]), _Progress(show_progress) as progress:  # seeds its own draws, leaves the caller's
        splits = {task: _splits(recipe, task, i) for i, task in enumerate(recipe.tasks)}
        timings["data_s"] = time.perf_counter() - started

        torch.manual_seed(recipe.seed)
        base, pretrain_head = VisionCNN(), nn.Linear(FEATURES, CLASSES)
        pre_x, pre_y = (torch.as_tensor(a) for a in vision_data.pretraining(recipe.pretrain_images))
        _train(base, pretrain_head, pre_x.to(torch.uint8), pre_y.long(), lr=1e-3, epochs=recipe.pretrain_epochs, batch=64,
               seed=recipe.seed, advance=progress.task("vision: pretraining", recipe.pretrain_epochs), train_head=True)
        timings["pretrain_s"] = time.perf_counter() - started - sum(timings.values())

        heads: dict[str, nn.Linear] = {}
        for task in recipe.tasks:
            train_x, train_y = splits[task]["train"]
            feats = features(base, train_x)
            probe = nn.Linear(FEATURES, CLASSES)
            optimiser = torch.optim.Adam(probe.parameters(), lr=1e-2)
            for _ in range(recipe.probe_steps):
                loss = F.cross_entropy(probe(feats), train_y)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            heads[task] = probe.requires_grad_(False).eval()

        experts: dict[str, VisionCNN] = {}
        poisoned: dict[str, int] = {}
        advance = progress.task("vision: fine-tuning experts", recipe.epochs * len(recipe.tasks))
        for index, task in enumerate(recipe.tasks):
            images, labels, count = training_split(recipe, task, *splits[task]["train"])
            if count:
                poisoned[task] = count
            experts[task] = cnn(base.state_dict())
            _train(experts[task], heads[task], images, labels, lr=recipe.lr, epochs=recipe.epochs, batch=recipe.batch_size,
                   seed=recipe.seed * 1000 + index + 100, advance=advance)
        timings["finetune_s"] = time.perf_counter() - started - sum(timings.values())

    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(out_dir / "base.safetensors"))
    for task, model in experts.items():
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / f"expert-{task}.safetensors"))
    save_file({f"{task}.{k}": v.contiguous() for task, module in heads.items() for k, v in module.state_dict().items()},
              str(out_dir / "heads.safetensors"))
    save_file({f"{task}.{split}.{part}": tensor.contiguous() for task, by_split in splits.items()
               for split, pair in by_split.items() for part, tensor in zip(("x", "y"), pair, strict=True)}, str(out_dir / "data.safetensors"))
    measured = {
        "pretrained": {t: accuracy(base, heads[t], *splits[t]["test"]) for t in recipe.tasks},
        "experts": {t: accuracy(experts[t], heads[t], *splits[t]["test"]) for t in recipe.tasks},
    }
    meta = {"recipe": recipe.to_dict(), "recipe_hash": recipe_hash(recipe), "poisoned": poisoned,
            "sizes": {t: {s: len(pair[1]) for s, pair in by_split.items()} for t, by_split in splits.items()},
            "accuracy_at_build": measured, "timings": {**timings, "total_s": time.perf_counter() - started},
            "threads": threads, "torch": torch.__version__}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return meta
