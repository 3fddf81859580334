"""CLIP zero-shot image classification: class names × prompt templates → a text head; accuracy and loss per task.

The head of a task is the normalized mean over templates of the normalized text
embeddings of each class (CLIP's recipe), computed once from the text tower of
``clip_model``.  The evaluated model may be a full ``CLIPModel``, a
``CLIPVisionModelWithProjection``, or a bare ``CLIPVisionModel`` (whose pooled output
goes through ``clip_model``'s visual projection, as for FusionBench's checkpoints).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from fusion_core import ConfigError, InputError, did_you_mean, option, positive

from ..data import DatasetFields
from .common import HFTaskPool, label_names, label_range

DEFAULT_TEMPLATES = ["a photo of a {}."]


@attrs.frozen
class ClipTaskFields(DatasetFields):
    image_column: str = option("image", help="Column holding the images (PIL images or uint8 arrays).")
    label_column: str = option("label", help="Column holding integer labels.")
    class_names: list[str] | None = option(None, help="Class names in label order (default: the ClassLabel names of the label column).")
    templates: list[str] | None = option(None, help="Prompt templates with one '{}' for the class name (default: the pool's templates).")


@attrs.frozen
class ClipZeroShotConfig:
    clip_model: str | dict[str, Any] = option(help="The full CLIP model whose text tower and processor build the heads: hub id, folder or {path, revision}.")
    tasks: dict[str, dict[str, Any]] = option(factory=dict, help="Tasks {name: {dataset, split, config, data_files, image_column, label_column, class_names, templates}}; "
                                                                "{fusionbench: <dataset>} fills them with FusionBench's dataset, class names and templates (e.g. sun397; other fields override).")
    templates: list[str] = option(factory=lambda: list(DEFAULT_TEMPLATES), help="Default prompt templates ('{}' is the class name).")
    batch_size: int = option(64, help="Images per batch.", validator=positive)
    cache_dir: str | None = option(None, help="Cache folder for models and datasets (default: HF_HOME's).")


@attrs.frozen
class PreparedTask:
    data: Any
    class_names: list[str]
    templates: list[str]


class ClipZeroShot(HFTaskPool):
    """Zero-shot classification with text heads from CLIP's text tower; reports accuracy and loss per task."""

    name = "clip_zero_shot"
    summary = "CLIP zero-shot image classification (class names × templates → text head): accuracy and loss per task."
    Config = ClipZeroShotConfig
    TaskFields = ClipTaskFields
    reference_url = "https://arxiv.org/abs/2103.00020"
    model_field = "clip_model"

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        for name, spec in self.specs.items():
            for template in spec.templates or self.config.templates:
                if template.count("{}") != 1:
                    raise ConfigError(f"taskpool.tasks.{name}: template {template!r} must contain '{{}}' exactly once")
        self._clip = None
        self._heads: dict[tuple[str, str], Any] = {}
        self._classifiers: dict[str, ClipHead] = {}

    def task_fields(self, name: str, fields: dict) -> dict:
        """``{fusionbench: <dataset>, ...}`` expanded with FusionBench's dataset, class names and templates (given fields win)."""
        preset = fields.get("fusionbench")
        if preset is None:
            return fields
        from .. import fusionbench

        known = fusionbench.clip_tasks()["datasets"]
        if preset not in known:
            raise ConfigError(f"taskpool.tasks.{name}.fusionbench: unknown FusionBench dataset {preset!r}{did_you_mean(str(preset), known)}")
        return {**fusionbench.task_spec(preset), **{k: v for k, v in fields.items() if k != "fusionbench"}}

    def columns(self, spec) -> list[str]:
        return [spec.image_column, spec.label_column]

    def prepare(self, task: str, ds) -> PreparedTask:
        spec = self.specs[task]
        label = f"task {task!r}"
        names = label_names(ds, spec.label_column)
        if spec.class_names is not None:
            if names is not None and len(names) != len(spec.class_names):
                raise InputError(f"{label}: class_names has {len(spec.class_names)} names but the label column "
                                 f"{spec.label_column!r} has {len(names)} classes ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})")
            names = list(spec.class_names)
        if names is None:
            raise ConfigError(f"{label}: the label column {spec.label_column!r} has no class names; give class_names")
        if len(ds):
            lo, hi = label_range(ds, spec.label_column)
            if lo < 0 or hi >= len(names):
                raise InputError(f"{label}: labels span {lo}..{hi} but there are {len(names)} class names; "
                                 "class_names must list one name per label")
        return PreparedTask(ds, names, list(spec.templates or self.config.templates))

    # ------------------------------------------------------------------ the CLIP text side

    def clip_parts(self):
        """(CLIPModel, tokenizer, image processor) of ``clip_model``, loaded once."""
        if self._clip is None:
            from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

            from ..loading import LoadOptions, load_pretrained, one_line, pretrained_kwargs, quiet_transformers

            opts = LoadOptions(cache_dir=self.config.cache_dir)
            loc = self.companion.locate(self.config.cache_dir)
            model = load_pretrained(CLIPModel, loc, opts).eval().requires_grad_(False)
            target, kwargs = pretrained_kwargs(loc, opts)
            quiet_transformers()
            try:
                tokenizer = AutoTokenizer.from_pretrained(target, **kwargs)
                images = AutoImageProcessor.from_pretrained(target, **kwargs)
            except (OSError, ValueError, KeyError) as exc:
                raise InputError(f"clip_model: cannot load the tokenizer/image processor of {self.companion.spec()}: {one_line(exc)}") from None
            self._clip = (model, tokenizer, images)
        return self._clip

    def head(self, task: str, device: str):
        """(classes, dim) normalized text embeddings of the task, times CLIP's logit scale."""
        key = (task, device)
        if key not in self._heads:
            import torch

            prepared = self.dataset(task)
            clip, tokenizer, _ = self.clip_parts()
            clip.to(device)
            prompts = [t.format(c) for c in prepared.class_names for t in prepared.templates]
            max_length = getattr(clip.config.text_config, "max_position_embeddings", None)
            chunks = []
            with torch.no_grad():  # not inference_mode: the head is also used under autograd (test-time adaptation)
                for start in range(0, len(prompts), self.config.batch_size):
                    enc = tokenizer(prompts[start : start + self.config.batch_size], padding=True, truncation=True,
                                    max_length=max_length, return_tensors="pt").to(device)
                    chunks.append(_tensor(clip.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])))
                emb = torch.cat(chunks).float()
                emb = emb / emb.norm(dim=-1, keepdim=True)
                emb = emb.view(len(prepared.class_names), len(prepared.templates), -1).mean(dim=1)
                emb = emb / emb.norm(dim=-1, keepdim=True)
                self._heads[key] = emb * clip.logit_scale.exp().float()
        return self._heads[key]

    # ------------------------------------------------------------------ the adapter protocol (fusion_core.adapters)

    def classifier(self, task: str) -> "ClipHead":
        """The task's zero-shot head: a model's image output (pooled or projected) → logits ``(batch, classes)``.

        Built once per task (text embeddings on the CPU, copied to a model's device on use); the
        same head scores models in :meth:`evaluate`.
        """
        self.selected([task])
        if task not in self._classifiers:
            self._classifiers[task] = ClipHead(self, task)
        return self._classifiers[task]

    def unlabelled_batches(self, task: str):
        """The task's test images as ``{"pixel_values"}`` batches, without labels (for test-time adaptation)."""
        from ..batches import EncodedBatches

        self.selected([task])
        return EncodedBatches(lambda: self.dataset(task).data, self.image_inputs(task), self.config.batch_size)

    def image_inputs(self, task: str):
        from ..batches import ImageEncoder

        return ImageEncoder(self.clip_parts()[2], self.specs[task].image_column)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, model, *, tasks=None, ctx=None) -> dict[str, dict[str, float]]:
        import torch

        from fusion_core import adapters

        from ..batches import EncodedBatches
        from ..forward import MODEL_CALL

        device = self.device(ctx)
        names = self.selected(tasks)
        check_vision_model(model, self.clip_parts()[0])
        model.to(device).eval()
        results = {}
        for task in names:
            prepared, spec = self.dataset(task), self.specs[task]
            head = self.classifier(task)
            n = correct = 0
            loss = 0.0
            batches = EncodedBatches(prepared.data, self.image_inputs(task), self.config.batch_size, spec.label_column)
            with torch.inference_mode():
                for inputs, labels in self.track(ctx, batches, f"evaluating {task}", len(batches)):
                    inputs, labels = {k: v.to(device) for k, v in inputs.items()}, labels.to(device)
                    logits = adapters.logits(model, inputs, head, MODEL_CALL).float()
                    loss += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
                    correct += int((logits.argmax(dim=-1) == labels).sum())
                    n += len(labels)
            results[task] = {"accuracy": correct / n if n else 0.0, "loss": loss / n if n else 0.0, "samples": float(n)}
        return results


class ClipHead:
    """The zero-shot head of one task: image output → logits ``(batch, classes)``.

    Reads ``image_embeds`` (a ``CLIPVisionModelWithProjection``, or a full CLIPModel run by
    :func:`fusion_hf.forward.hf_forward`) or ``pooler_output`` (a ``CLIPVisionModel``, put
    through ``clip_model``'s visual projection) from the output, or a tensor whose width says
    which of the two it is; then normalises and takes the dot product with the task's text
    embeddings (times CLIP's logit scale).  Fixed: no tensor of the head takes gradients, but
    gradients flow through it to the model (test-time adaptation).
    """

    def __init__(self, pool: ClipZeroShot, task: str) -> None:
        self.task = task
        text = pool.head(task, "cpu")  # built now, on the CPU: never inside a method's autograd/vmap transforms
        projection = pool.clip_parts()[0].visual_projection.weight.detach().clone()  # (joint dim, hidden)
        self._tensors = {"cpu": (text, projection)}

    def tensors(self, device: Any) -> tuple:
        """(text embeddings × logit scale, visual projection weight) on ``device`` (copied there once)."""
        key = str(device)
        if key not in self._tensors:
            text, projection = self._tensors["cpu"]
            self._tensors[key] = (text.to(device), projection.to(device))
        return self._tensors[key]

    def __call__(self, output: Any):
        import torch.nn.functional as F

        kind, value = _image_output(output)
        text, projection = self.tensors(value.device)
        if kind == "tensor":
            if projection.shape[0] == projection.shape[1]:
                raise InputError(f"clip_zero_shot task {self.task!r}: a bare tensor output is ambiguous (the visual projection is "
                                 "square, so pooled and projected features have the same width); return pooler_output or image_embeds")
            kind = "pooled" if value.shape[-1] == projection.shape[1] else "embeds"
        if kind == "pooled":
            if value.shape[-1] != projection.shape[1]:
                raise InputError(f"clip_zero_shot task {self.task!r}: the model's pooled output has {value.shape[-1]} features, but the "
                                 f"clip_model's visual projection takes {projection.shape[1]}: the model is not a vision tower of that CLIP")
            value = F.linear(value, projection.to(value.dtype))
        if value.shape[-1] != text.shape[-1]:
            raise InputError(f"clip_zero_shot task {self.task!r}: the model's image embeddings have {value.shape[-1]} features, "
                             f"but the clip_model's text embeddings have {text.shape[-1]}")
        feats = value.float()
        return (feats / feats.norm(dim=-1, keepdim=True)) @ text.T


def _image_output(output: Any):
    """``(kind, tensor)`` of an image output: ``("embeds", image_embeds)``, ``("pooled", pooler_output)`` or ``("tensor", output)``."""
    import torch

    if isinstance(output, torch.Tensor):
        return "tensor", output
    for name, kind in (("image_embeds", "embeds"), ("pooler_output", "pooled")):
        value = output.get(name) if isinstance(output, Mapping) else getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return kind, value
    raise InputError(f"clip_zero_shot: cannot read image features from a model output of type {type(output).__name__} "
                     "(expected pooler_output or image_embeds)")


def _tensor(output):
    """``get_*_features`` return tensors in transformers 4 and model outputs in 5."""
    return output if hasattr(output, "norm") else output.pooler_output


def check_vision_model(model, clip) -> None:
    """Refuse, before running it, a plain model that is not a CLIP vision model matching ``clip``'s visual projection."""
    if callable(getattr(model, "ensemble_logits", None)) or hasattr(model, "get_image_features") or hasattr(model, "visual_projection"):
        return
    if not hasattr(model, "config") or getattr(model.config, "hidden_size", None) != clip.visual_projection.in_features:
        raise InputError(f"cannot evaluate a {type(model).__name__} with clip_zero_shot: it is not a CLIP vision model "
                         f"matching the clip_model's visual projection ({clip.visual_projection.in_features} inputs)")
