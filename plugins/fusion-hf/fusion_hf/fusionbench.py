"""FusionBench's CLIP-ViT-B/32 task sets (8, 14 and 20 tasks), by hub id.

Checkpoints: ``openai/clip-vit-base-patch32`` and the vision encoders fine-tuned by the
FusionBench authors, ``tanganke/clip-vit-base-patch32_<task>``
(``fusion_bench_config/modelpool/CLIPVisionModelPool/clip-vit-base-patch32_TALL20.yaml``); the
test splits of the datasets FusionBench's ``dataset/image_classification/test/<task>.yaml`` load.

Class names (in label order) and prompt templates are FusionBench 0.2.33's, i.e. CLIP's
(``fusion_bench/tasks/clip_classification/<dataset>.py``), kept as data in ``clip_tasks.json``
with the source file cited per dataset (regenerate with ``tools/extract_clip_tasks.py``), so a
filled HF cache reproduces FusionBench's zero-shot row.
"""

from __future__ import annotations

import functools
from typing import Any

BASE = "openai/clip-vit-base-patch32"
TASKS = ("sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")
TASKS_14 = TASKS + ("oxford_flowers102", "pcam", "fer2013", "oxford-iiit-pet", "stl10", "cifar100")
TASKS_20 = TASKS_14 + ("cifar10", "food101", "fashion_mnist", "emnist_letters", "kmnist", "rendered-sst2")
TASK_SETS = {8: TASKS, 14: TASKS_14, 20: TASKS_20}

FER2013 = {"dataset": "clip-benchmark/wds_fer2013", "image_column": "jpg", "label_column": "cls"}
"""FusionBench loads fer2013 with ``fusion_bench.dataset.fer2013.load_fer2013``: this hub dataset, columns renamed."""


@functools.cache
def clip_tasks() -> dict[str, Any]:
    """The data of ``clip_tasks.json``: per dataset its source, hub dataset, split, class names and templates."""
    import json
    from importlib import resources

    return json.loads(resources.files(__package__).joinpath("clip_tasks.json").read_text(encoding="utf-8"))


def task_spec(task: str) -> dict[str, Any]:
    """The ``clip_zero_shot`` task fields of ``task`` with FusionBench's dataset, class names and templates.

    A task pool config says ``{fusionbench: <task>}`` for this (the ``clip_zero_shot`` task pool expands it).
    """
    data = clip_tasks()["datasets"][task]
    spec = {"dataset": data["dataset"], "split": data["split"], "image_column": "image", "label_column": "label",
            "class_names": list(data["class_names"]), "templates": list(data["templates"])}
    if "config" in data:
        spec["config"] = data["config"]
    if task == "fer2013":
        spec.update(FER2013)
    return spec


def modelpool(tasks: tuple[str, ...] = TASKS) -> dict:
    return {
        "name": "hf_clip_vision",
        "base": {"path": BASE, "revision": "main"},
        "models": {task: {"path": f"tanganke/clip-vit-base-patch32_{task}", "revision": "main"} for task in tasks},
    }


def taskpool(tasks: tuple[str, ...] = TASKS) -> dict:
    return {
        "name": "clip_zero_shot",
        "clip_model": {"path": BASE, "revision": "main"},
        "batch_size": 128,
        "tasks": {task: {"fusionbench": task} for task in tasks},
    }


def register(register_benchmark) -> None:
    names = {8: "clip-vit-b32-tall8", 14: "clip-vit-b32-tall14", 20: "clip-vit-b32-tall20"}
    for size, tasks in TASK_SETS.items():
        register_benchmark(
            names[size],
            summary=f"FusionBench CLIP-ViT-B/32 on {size} image tasks, FusionBench's class names and templates "
                    "(hub checkpoints and datasets; needs network or a filled HF cache).",
            modelpool=modelpool(tasks),
            taskpool=taskpool(tasks),
            methods=[{"name": "task_arithmetic", "scaling_factor": 0.3}, {"name": "ties"}, {"name": "simple_average"}],
        )
