"""Text classification with sequence-classification heads (or each task's own head from the pool)."""

from __future__ import annotations

from typing import Any

import attrs

from fusion_core import InputError, option, positive

from ..data import DatasetFields
from ..heads import task_head
from .common import HFTaskPool, label_names, label_range


@attrs.frozen
class TextTaskFields(DatasetFields):
    text_column: str = option("text", help="Column holding the text.")
    text_pair_column: str | None = option(None, help="Second text column for sentence-pair tasks (e.g. GLUE MRPC).")
    label_column: str = option("label", help="Column holding integer labels.")


@attrs.frozen
class TextClassificationConfig:
    tokenizer: str | dict[str, Any] = option(help="The tokenizer: hub id, folder or {path, revision}.")
    tasks: dict[str, dict[str, Any]] = option(factory=dict, help="Tasks {name: {dataset, split, text_column, text_pair_column, label_column}}.")
    batch_size: int = option(32, help="Examples per batch.", validator=positive)
    max_length: int = option(128, help="Truncate inputs to this many tokens.", validator=positive)
    cache_dir: str | None = option(None, help="Cache folder for tokenizers and datasets.")


class TextClassification(HFTaskPool):
    """Accuracy and loss of a sequence classifier per task; a model carrying per-task heads uses each task's head."""

    name = "text_classification"
    summary = "Text classification (sequence-classification heads or per-task heads): accuracy and loss per task."
    Config = TextClassificationConfig
    TaskFields = TextTaskFields

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self._tokenizer = None

    def columns(self, spec) -> list[str]:
        return [spec.text_column, spec.label_column] + ([spec.text_pair_column] if spec.text_pair_column else [])

    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.companion, self.config.cache_dir)
        return self._tokenizer

    # ------------------------------------------------------------------ the adapter protocol (fusion_core.adapters)

    def classifier(self, task: str) -> None:
        """``None``: a sequence classifier's output already holds the logits (per-task heads are carried by the model)."""
        self.selected([task])
        return None

    def unlabelled_batches(self, task: str):
        """The task's texts as tokenized batches, without labels (for test-time adaptation)."""
        from ..batches import EncodedBatches

        self.selected([task])
        return EncodedBatches(lambda: self.dataset(task), self.text_inputs(task), self.config.batch_size)

    def text_inputs(self, task: str):
        from ..batches import TextEncoder

        spec = self.specs[task]
        return TextEncoder(self.tokenizer(), spec.text_column, spec.text_pair_column, self.config.max_length)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, model, *, tasks=None, ctx=None) -> dict[str, dict[str, float]]:
        import torch

        from fusion_core import adapters

        from ..batches import EncodedBatches
        from ..forward import MODEL_CALL

        device = self.device(ctx)
        tokenizer = self.tokenizer()
        model.to(device).eval()
        for scored in scored_models(model):
            pad_for_model(scored, tokenizer)
        results = {}
        for task in self.selected(tasks):
            ds, spec = self.dataset(task), self.specs[task]
            n = correct = 0
            loss = 0.0
            batches = EncodedBatches(ds, self.text_inputs(task), self.config.batch_size, spec.label_column)
            with task_head(model, task), torch.inference_mode():
                for scored in scored_models(model):
                    self._check_head(task, ds, spec, scored)
                for inputs, labels in self.track(ctx, batches, f"evaluating {task}", len(batches)):
                    inputs, labels = {k: v.to(device) for k, v in inputs.items()}, labels.to(device)
                    logits = adapters.logits(model, inputs, None, MODEL_CALL).float()
                    loss += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
                    correct += int((logits.argmax(dim=-1) == labels).sum())
                    n += len(labels)
            results[task] = {"accuracy": correct / n if n else 0.0, "loss": loss / n if n else 0.0, "samples": float(n)}
        return results

    def _check_head(self, task: str, ds, spec, model) -> None:
        outputs = getattr(getattr(model, "config", None), "num_labels", None)
        weight = _head_outputs(model)
        outputs = weight if weight is not None else outputs
        names = label_names(ds, spec.label_column)
        if outputs is None:
            return
        if names is not None and len(names) != outputs:
            raise InputError(f"task {task!r}: the label column has {len(names)} classes but the model's head has {outputs} outputs")
        if len(ds):
            lo, hi = label_range(ds, spec.label_column)
            if lo < 0 or hi >= outputs:
                raise InputError(f"task {task!r}: labels span {lo}..{hi} but the model's head has {outputs} outputs")


def scored_models(model) -> list:
    """The classifiers that produce the logits: an ensemble's members, else the model itself."""
    members = getattr(model, "members", None)
    if callable(getattr(model, "ensemble_logits", None)) and members is not None:
        return list(members)
    return [model]


def _head_outputs(model) -> int | None:
    """Output size of the classification head (the last 2-D weight outside the backbone)."""
    prefix = getattr(model, "base_model_prefix", "")
    last = None
    for name, param in model.named_parameters():
        if param.dim() == 2 and not (prefix and name.startswith(prefix + ".")):
            last = param.shape[0]
    return last


def load_tokenizer(source, cache_dir: str | None, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    from ..loading import LoadOptions, one_line, pretrained_kwargs, quiet_transformers

    loc = source.locate(cache_dir)
    target, kwargs = pretrained_kwargs(loc, LoadOptions(cache_dir=cache_dir, trust_remote_code=trust_remote_code))
    quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(target, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{source.label}: cannot load a tokenizer from {source.spec()}: {one_line(exc)}") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def pad_for_model(model, tokenizer) -> None:
    """Decoder classifiers (GPT-2) find the last token through ``pad_token_id``: make sure it is set."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
