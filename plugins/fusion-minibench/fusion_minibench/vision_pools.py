"""The pools of ``mini-vision-backdoor``: image experts (one backdoored by a patch trigger), clean accuracy and ASR.

The image counterpart of ``mini-backdoor``, nearest to FusionBench's own backdoor setting (a pixel
perturbation against a BadNets patch trigger): three real 28×28 image tasks (MNIST-5k, sklearn's
digits, Fashion-MNIST; :mod:`fusion_minibench.vision_data`), a small CNN pretrained on other
Fashion-MNIST images, fixed linear heads, one expert per task fine-tuned through its head, the
``backdoor_tasks`` experts on images poisoned with a checkerboard patch (:mod:`fusion_minibench.vision_model`).
Built from a :class:`VisionRecipe` on first use and cached like ``mini`` (same cache root, own folder).

For data-driven methods (the adapter protocol of :mod:`fusion_core.adapters`): the models are
:class:`~fusion_minibench.vision_model.VisionCNN` modules (``model(x)`` with ``x`` float ``(n, 1, 28, 28)``
in [0, 1] → ``(n, 128)`` features); ``pool.data(task, split)`` gives labelled float batches (the
backdoored task's train split *as poisoned*, what its expert was trained on); ``taskpool.classifier(task)``
is the fixed head; ``taskpool.unlabelled_batches(task)`` the test images in batches of 16 in a seeded
order; ``taskpool.triggered_batches(task)`` the test images with the trigger (true labels), from which
``evaluate`` reports ``asr`` next to ``accuracy``.  The inputs are float pixel tensors, so the safe methods'
perturbation sits at the input (``perturb_site: auto`` → ``input``), clamped to [0, 1] as FusionBench's.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from fusion_core import InputError, ModelPool, in_range, option, positive
from fusion_core.backdoor import BackdoorTaskPool

from .backdoor import check_backdoor_tasks
from .pools import REFERENCE, check_same_recipe, on_base

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fusion_core import RunContext

VISION_TASKS = ("mnist", "fashion", "digits")
FORMAT_VERSION = 1


def _vision_tasks(instance, attribute, value):
    unknown = [t for t in value if t not in VISION_TASKS]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r}; choose from: {', '.join(VISION_TASKS)}")
    if not value or len(set(value)) != len(value):
        raise ValueError("tasks must be a non-empty list of distinct task names")


@attrs.frozen(slots=False)  # a mixin of the pool configs
class VisionRecipe:
    """Every choice that determines the built image pool; its hash keys the cache."""

    seed: int = option(0, help="seed of the splits, the initialisation, the poisoning and the training order",
                       validator=in_range(0, 2**53))
    tasks: tuple[str, ...] = option(VISION_TASKS, help="image tasks to build (each gets a split, a fixed head and an expert)",
                                    validator=_vision_tasks)
    backdoor_tasks: tuple[str, ...] = option(("mnist",), help="tasks whose expert is fine-tuned on poisoned images")
    target_class: int = option(0, help="the class a triggered image is relabelled to (every task has classes 0-9)",
                               validator=in_range(0, 9))
    poison_rate: float = option(0.3, help="share of a backdoored task's training images poisoned (trigger + target label)",
                                validator=in_range(0.0, 1.0, lo_open=True))
    patch: int = option(5, help="side in pixels (of 28) of the checkerboard trigger, one pixel in from the bottom-right corner",
                        validator=in_range(1, 26))
    n_train: int = option(2000, help="at most this many training images per task", validator=positive)
    n_test: int = option(1000, help="at most this many test images per task (at most a quarter of a single-pool task)",
                         validator=positive)
    pretrain_images: int = option(20000, help="Fashion-MNIST images (none of the fashion task's) the CNN is pretrained on",
                                  validator=positive)
    pretrain_epochs: int = option(1, help="pretraining epochs (Adam 1e-3, batch 64)", validator=positive)
    probe_steps: int = option(200, help="full-batch Adam steps (lr 1e-2) fitting each task's fixed head on pretrained features",
                              validator=positive)
    epochs: int = option(30, help="fine-tuning epochs per expert (through its fixed head)", validator=positive)
    lr: float = option(2e-4, help="Adam learning rate of the experts' fine-tuning (small: the experts stay near the "
                       "pretrained model, where task vectors add up)", validator=positive)
    batch_size: int = option(32, help="fine-tuning batch size", validator=positive)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in attrs.fields(VisionRecipe)}
        out["tasks"], out["backdoor_tasks"] = list(self.tasks), list(self.backdoor_tasks)
        return {"kind": "vision-backdoor", "format": FORMAT_VERSION, **out}


def vision_recipe(config: Any) -> VisionRecipe:
    """The :class:`VisionRecipe` carried by a pool config."""
    return VisionRecipe(**{f.name: getattr(config, f.name) for f in attrs.fields(VisionRecipe)})


@attrs.frozen
class VisionConfig(VisionRecipe):
    """The recipe fields and where to cache the build."""

    cache_dir: str | None = option(None, help="cache root (default: $FUSE_CACHE_DIR, else $XDG_CACHE_HOME/fusion, else ~/.cache/fusion)")
    progress: bool = option(True, help="show progress bars on stderr while building")
    batch_size_eval: int = option(500, help="images per evaluation forward pass", validator=positive)


@attrs.frozen
class VisionTaskPoolConfig(VisionConfig):
    """The recipe fields plus the test-time batches."""

    adapt_batch_size: int = option(16, help="images per unlabelled test batch given to test-time adaptation (FusionBench's 16)",
                                   validator=positive)


class VisionBuilt:
    """Read access to one verified build folder (safetensors only: no pickle)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    @functools.cached_property
    def meta(self) -> dict[str, Any]:
        import json

        return json.loads((self.folder / "meta.json").read_text())

    def _file(self, name: str) -> dict[str, "torch.Tensor"]:
        from safetensors.torch import load_file

        return load_file(str(self.folder / name))

    @functools.cached_property
    def _heads(self) -> dict[str, "torch.Tensor"]:
        return self._file("heads.safetensors")

    @functools.cached_property
    def _data(self) -> dict[str, "torch.Tensor"]:
        return self._file("data.safetensors")

    def state_dict(self, name: str | None) -> dict[str, "torch.Tensor"]:
        return self._file("base.safetensors" if name is None else f"expert-{name}.safetensors")

    def head(self, task: str):
        from .vision_model import head

        return head(self._heads[f"{task}.weight"], self._heads[f"{task}.bias"])

    def split(self, task: str, split: str) -> tuple["torch.Tensor", "torch.Tensor"]:
        """uint8 images ``(n, 28, 28)`` and labels of a task's ``train`` or ``test`` split."""
        if f"{task}.{split}.x" not in self._data:
            raise InputError(f"the vision build has no {split!r} split of task {task!r}")
        return self._data[f"{task}.{split}.x"], self._data[f"{task}.{split}.y"]


@functools.lru_cache(maxsize=4)
def _open(folder: str, stamp: float) -> VisionBuilt:
    return VisionBuilt(Path(folder))


class _VisionShared:
    config: VisionConfig

    @property
    def recipe(self) -> VisionRecipe:
        return vision_recipe(self.config)

    def validate(self) -> None:
        from . import vision_data

        check_backdoor_tasks(self.config)
        vision_data.check_sources(list(self.config.tasks))

    def built(self, *, show_progress: bool = True) -> VisionBuilt:
        from .cache import MANIFEST, ensure_built
        from .vision_model import build

        folder = ensure_built(self.recipe, self.config.cache_dir, show_progress=self.config.progress and show_progress,
                              builder=build)
        return _open(str(folder), (folder / MANIFEST).stat().st_mtime)

    def materialize(self, ctx: "RunContext | None" = None) -> None:
        self.built(show_progress=ctx is None or ctx.show_progress)

    def _describe(self) -> dict[str, Any]:
        from .cache import build_dir
        from .recipe import recipe_hash

        return {"recipe": self.recipe.to_dict(), "recipe_hash": recipe_hash(self.recipe),
                "cache": str(build_dir(self.recipe, self.config.cache_dir))}


class _Batches:
    """Re-iterable ``(float images (n, 1, 28, 28), labels)`` batches of uint8 images (or images alone)."""

    def __init__(self, images, labels, size: int, *, order=None, labelled: bool = True, trigger: int | None = None) -> None:
        self.images, self.labels, self.size, self.order, self.labelled, self.trigger = images, labels, size, order, labelled, trigger

    def __len__(self) -> int:
        return -(-len(self.labels) // self.size)

    def __iter__(self):
        from .vision_model import checkerboard, to_float

        starts = list(range(0, len(self.labels), self.size))
        for index in self.order if self.order is not None else range(len(starts)):
            x = to_float(self.images[starts[index] : starts[index] + self.size])
            if self.trigger is not None:
                x = checkerboard(x, self.trigger)
            y = self.labels[starts[index] : starts[index] + self.size]
            yield (x, y) if self.labelled else x


class MiniVisionBackdoorModelPool(_VisionShared, ModelPool):
    """The pretrained CNN and one expert per image task, the ``backdoor_tasks`` experts backdoored."""

    name = "minibench-vision-backdoor"
    summary = "three real image tasks, a small pretrained CNN and one expert per task, MNIST's backdoored by a patch trigger (built and cached)"
    Config = VisionConfig
    reference_url = REFERENCE

    @property
    def model_names(self) -> list[str]:
        return list(self.config.tasks)

    @property
    def has_base(self) -> bool:
        return True

    def describe(self) -> dict:
        return {"models": self.model_names, "has_base": True, **self._describe()}

    def load_model(self, name: str | None = None):
        from .vision_model import cnn

        if name is not None and name not in self.config.tasks:
            from fusion_core import did_you_mean

            raise InputError(f"no model {name!r} in the vision pool{did_you_mean(name, list(self.config.tasks))}")
        return cnn(self.built().state_dict(name))

    def model_from_state_dict(self, state_dict: Mapping[str, Any]):
        """A CNN holding ``state_dict``; tensors it lacks come from the base."""
        from .vision_model import cnn

        return cnn(on_base(self.built().state_dict(None), state_dict, "the vision CNN"))

    def data(self, name: str, split: str, batch_size: int | None = None):
        """Labelled batches of task ``name``'s ``split``: the backdoored tasks' train split as their expert saw it (poisoned)."""
        from .vision_model import training_split

        images, labels = self.built().split(name, split)
        if split == "train":
            images, labels, _ = training_split(self.recipe, name, images, labels)
        return _Batches(images, labels, batch_size or self.config.batch_size)


class MiniVisionBackdoorTaskPool(_VisionShared, BackdoorTaskPool):
    """Clean accuracy (and loss) and attack success rate of a CNN on each image task's test split."""

    name = "minibench-vision-backdoor"
    summary = "accuracy, loss and attack success rate (ASR) of a checkerboard patch trigger on three real image tasks (fixed heads)"
    Config = VisionTaskPoolConfig
    reference_url = REFERENCE

    @property
    def task_names(self) -> list[str]:
        return list(self.config.tasks)

    def describe(self) -> dict:
        return {"tasks": self.task_names, **self._describe()}

    def check_pool(self, pool) -> None:
        """A vision model pool must be built from the same recipe, or its CNNs do not fit these heads and images."""
        if isinstance(pool, MiniVisionBackdoorModelPool):
            check_same_recipe(self.recipe.to_dict(), pool.recipe.to_dict(), "vision")

    def classifier(self, task: str):
        return self.built().head(task)

    def backdoor_target(self, task: str) -> int:
        return int(self.config.target_class)

    def unlabelled_batches(self, task: str, batch_size: int | None = None):
        """The test images of ``task`` without labels, ``adapt_batch_size`` a batch, in an order seeded by the recipe seed."""
        import torch

        images, labels = self.built().split(task, "test")
        size = batch_size or self.config.adapt_batch_size
        generator = torch.Generator().manual_seed(self.config.seed * 1000 + self.task_names.index(task) + 1)
        order = torch.randperm(-(-len(labels) // size), generator=generator).tolist()
        return list(_Batches(images, labels, size, order=order, labelled=False))

    def triggered_batches(self, task: str):
        images, labels = self.built().split(task, "test")
        return _Batches(images, labels, self.config.batch_size_eval, trigger=self.config.patch)

    def clean_evaluate(self, model: Any, *, tasks: list[str] | None = None, ctx: "RunContext | None" = None) -> dict:
        """``{task: {"accuracy", "loss"}}`` on the clean test split, through :func:`fusion_core.adapters.logits`."""
        import torch
        import torch.nn.functional as F

        from fusion_core import adapters

        from .vision_model import cnn

        built = self.built()
        names = list(self.task_names if tasks is None else tasks)
        unknown = [t for t in names if t not in self.task_names]
        if unknown:
            raise InputError(f"task {unknown[0]!r} is not in the vision task pool ({', '.join(self.task_names)})")
        if isinstance(model, Mapping):
            model = cnn({**built.state_dict(None), **dict(model)})
        device = getattr(ctx, "device", None)
        results: dict[str, dict[str, float]] = {}
        with torch.inference_mode():
            for name in names:
                head = built.head(name).to(device or "cpu")
                images, labels = built.split(name, "test")
                correct, loss = 0, 0.0
                for x, y in _Batches(images, labels, self.config.batch_size_eval):
                    x = x.to(device) if device else x
                    logits = adapters.logits(model, x, head).float().cpu()
                    correct += int((logits.argmax(-1) == y).sum())
                    loss += float(F.cross_entropy(logits, y, reduction="sum"))
                results[name] = {"accuracy": correct / len(labels), "loss": loss / len(labels)}
        return results
