"""FusionBench's CLIP-ViT-B/32 eight-task setting, by hub id (``configs/clip-vit-b32-tall8.yaml`` says the same).

Checkpoints: ``openai/clip-vit-base-patch32`` and the vision encoders fine-tuned by the
FusionBench authors, ``tanganke/clip-vit-base-patch32_<task>``; test splits of the
``tanganke/<dataset>`` datasets.  Class names come from each dataset's ``ClassLabel``
column; the prompt templates are short descriptions written for this project.
"""

from __future__ import annotations

BASE = "openai/clip-vit-base-patch32"
TASKS = ("sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")
DATASETS = {task: "tanganke/" + task.replace("-", "_") for task in TASKS}
TEMPLATES = {
    "sun397": ["a photo of a {}.", "a picture of the scene: {}."],
    "stanford-cars": ["a photo of a {}, a type of car.", "a photo of the car {}."],
    "resisc45": ["satellite imagery of {}.", "an aerial photo of {}."],
    "eurosat": ["a satellite photo of {}.", "a centered satellite image of {}."],
    "svhn": ['a photo of the house number "{}".', 'a street sign showing the digit "{}".'],
    "gtsrb": ['a photo of the traffic sign "{}".', 'a road sign meaning "{}".'],
    "mnist": ['a photo of the handwritten digit "{}".', 'an image of the number "{}".'],
    "dtd": ["a photo of a {} texture.", "a close-up of a {} surface."],
}


def modelpool() -> dict:
    return {
        "name": "hf_clip_vision",
        "base": {"path": BASE, "revision": "main"},
        "models": {task: {"path": f"tanganke/clip-vit-base-patch32_{task}", "revision": "main"} for task in TASKS},
    }


def taskpool() -> dict:
    return {
        "name": "clip_zero_shot",
        "clip_model": {"path": BASE, "revision": "main"},
        "batch_size": 128,
        "tasks": {task: {"dataset": DATASETS[task], "split": "test", "image_column": "image", "label_column": "label",
                         "templates": list(TEMPLATES[task])} for task in TASKS},
    }


def register(register_benchmark) -> None:
    register_benchmark(
        "clip-vit-b32-tall8",
        summary="FusionBench CLIP-ViT-B/32 on 8 image tasks (hub checkpoints and datasets; needs network or a filled HF cache).",
        modelpool=modelpool(),
        taskpool=taskpool(),
        methods=[{"name": "task_arithmetic", "scaling_factor": 0.3}, {"name": "ties"}, {"name": "simple_average"}],
    )
