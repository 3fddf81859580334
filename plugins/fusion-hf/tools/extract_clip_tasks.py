"""Regenerate ``fusion_hf/clip_tasks.json`` from an installed FusionBench (run with FusionBench's Python).

The JSON holds facts only: per dataset, the class names in label order, the prompt templates as
``str.format`` strings (each template applied to ``"{}"``), the hub dataset FusionBench's test
config names and the FusionBench source file they come from.

    /path/to/fusionbench-env/bin/python plugins/fusion-hf/tools/extract_clip_tasks.py > plugins/fusion-hf/fusion_hf/clip_tasks.json
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

TASKS_8 = ["sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]
TASKS_14 = TASKS_8 + ["oxford_flowers102", "pcam", "fer2013", "oxford-iiit-pet", "stl10", "cifar100"]
TASKS_20 = TASKS_14 + ["cifar10", "food101", "fashion_mnist", "emnist_letters", "kmnist", "rendered-sst2"]


def _dataset_fields(config: dict) -> dict:
    """Where FusionBench's test config loads the dataset from: hub path (and config name), split."""
    out = {"split": config.get("split", "test")}
    if config.get("_target_") == "datasets.load_dataset":
        args = list(config.get("_args_", []))
        out["dataset"] = config.get("path") or args[0]
        if len(args) > 1:
            out["config"] = args[1]
    else:  # a FusionBench loader function: its default path, and the columns it renames
        out["dataset"] = config["_target_"]
    return out


def main() -> None:
    import fusion_bench
    import yaml
    from fusion_bench.tasks.clip_classification import CLIPTemplateFactory

    root = Path(fusion_bench.__file__).parent
    configs = root.parent / "fusion_bench_config" / "dataset" / "image_classification" / "test"
    mapping = CLIPTemplateFactory._dataset_mapping
    out = {"fusion_bench_version": fusion_bench.__version__ if hasattr(fusion_bench, "__version__") else "0.2.33",
           "sets": {"8": TASKS_8, "14": TASKS_14, "20": TASKS_20}, "datasets": {}}
    for task in TASKS_20:
        info = mapping[task]
        module_name = info if isinstance(info, str) else info["module"]
        attr = "classnames" if isinstance(info, str) else info["classnames"]
        module = importlib.import_module("fusion_bench.tasks.clip_classification" + module_name)
        classnames, templates = CLIPTemplateFactory.get_classnames_and_templates(task)
        config = yaml.safe_load((configs / f"{task}.yaml").read_text())[task]
        source = f"fusion_bench/tasks/clip_classification/{Path(module.__file__).name} ({attr}, templates)"
        out["datasets"][task] = {
            "source": f"FusionBench 0.2.33 {source}",
            **_dataset_fields(config),
            "class_names": list(classnames),
            "templates": [t("{}") for t in templates],
        }
    json.dump(out, sys.stdout, indent=1, ensure_ascii=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
