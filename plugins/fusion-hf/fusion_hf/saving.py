"""Saving a merged model: ``save_pretrained`` (safetensors) + processor/tokenizer + a model card, atomically."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fusion_core import plain_data

CARD_TITLE = "# Merged model"


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shaped the saved model."""
    from importlib import metadata

    out: dict[str, str] = {}
    for dist in ("fusion-core", "fusion-hf", "fusion-merging", "torch", "transformers", "safetensors", "peft"):
        module = dist.replace("-", "_")
        if dist in ("peft",) and module not in sys.modules:
            continue
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def build_recipe(config: Mapping[str, Any], inputs: Mapping[str, str]) -> dict[str, Any]:
    """The card's recipe from a run's resolved config (``report["config"]``) and the pool's inputs."""
    method = config.get("method") or {}
    method = dict(method) if isinstance(method, Mapping) else {"name": str(method)}
    name = method.pop("name", "?")
    settings = {k: v for k, v in config.items() if k not in ("method", "modelpool", "taskpool")}
    return {
        "method": name,
        "fields": method,
        "inputs": dict(inputs),
        "seed": config.get("seed"),
        "settings": settings,
        "modelpool": config.get("modelpool"),
        "versions": library_versions(),
    }




def heads_section(heads: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The card's lines on the per-task heads saved beside the model (``head-<task>.safetensors``)."""
    first_task = next(iter(heads))
    weight = next((k for k in heads[first_task] if k.endswith(".weight")), next(iter(heads[first_task])))
    lines = [
        "## Task heads",
        "",
        "The backbone above is merged; each task keeps its own classification head, taken from its fine-tuned",
        "model and saved beside the weights. The head inside `model.safetensors` is the base model's and does",
        "not discriminate the tasks' classes: load the one for your task on top of it.",
        "",
        "| task | file | tensors (shape) |",
        "|---|---|---|",
    ]
    for task, state in heads.items():
        shapes = ", ".join(f"`{k}` {list(getattr(v, 'shape', v))}" for k, v in state.items())
        lines.append(f"| {task} | `head-{task}.safetensors` | {shapes} |")
    lines += [
        "",
        "```python",
        "from safetensors.torch import load_file",
        "from transformers import AutoModelForSequenceClassification",
        "",
        f'head = load_file("head-{first_task}.safetensors")  # in this folder',
        "model = AutoModelForSequenceClassification.from_pretrained(",
        f'    ".", num_labels=head["{weight}"].shape[0], ignore_mismatched_sizes=True)',
        "model.load_state_dict(head, strict=False)",
        "```",
        "",
    ]
    return lines


def write_card(folder: Path, recipe: Mapping[str, Any], base: str | None,
               heads: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """``README.md`` with a YAML front matter (tags, base model), the per-task heads if any, and the recipe."""
    import yaml

    front: dict[str, Any] = {"library_name": "transformers", "tags": ["merge", "fusion", f"fusion-{recipe.get('method', 'merge')}"]}
    if base:
        front["base_model"] = [base]
    inputs = recipe.get("inputs") or {}
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        CARD_TITLE,
        "",
        f"Made with fusion (`fuse run`) by the method **{recipe.get('method')}** from {len(inputs)} input model(s).",
        "",
        "## Inputs",
        "",
        *[f"- {name}: `{spec}`" for name, spec in inputs.items()],
        "",
        *(heads_section(heads) if heads else []),
        "## Recipe",
        "",
        "```yaml",
        yaml.safe_dump(plain_data(dict(recipe)), sort_keys=False, allow_unicode=True).rstrip(),
        "```",
        "",
    ]
    (folder / "README.md").write_text("\n".join(lines), encoding="utf-8")


def save_model_folder(model, path: str | os.PathLike, *, recipe: Mapping[str, Any], base: str | None = None,
                      processor=None, overwrite: bool = False) -> Path:
    """Write ``model`` with ``save_pretrained`` into a temp folder beside ``path``, then rename it into place."""
    from fusion_core import atomic_output

    path = Path(path)
    with atomic_output(path, overwrite=overwrite) as tmp:
        tmp.mkdir()
        model.save_pretrained(str(tmp))
        if processor is not None:
            processor.save_pretrained(str(tmp))
        heads = getattr(model, "fusion_task_heads", None)
        if heads:
            from safetensors.torch import save_file

            for task, state in heads.items():
                save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / f"head-{task}.safetensors"))
        write_card(tmp, recipe, base, heads=heads)
    return path
