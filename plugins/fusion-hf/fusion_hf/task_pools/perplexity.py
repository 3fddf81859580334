"""Causal-LM perplexity on text datasets: exp(mean next-token negative log-likelihood)."""

from __future__ import annotations

import math
from typing import Any

import attrs

from fusion_core import option, positive

from ..data import DatasetFields
from .common import HFTaskPool
from .text_classification import load_tokenizer, pad_for_model


@attrs.frozen
class PerplexityTaskFields(DatasetFields):
    text_column: str = option("text", help="Column holding the text.")


@attrs.frozen
class PerplexityConfig:
    tokenizer: str | dict[str, Any] = option(help="The tokenizer: hub id, folder or {path, revision}.")
    tasks: dict[str, dict[str, Any]] = option(factory=dict, help="Tasks {name: {dataset, split, config, data_files, text_column}}.")
    batch_size: int = option(8, help="Texts per batch.", validator=positive)
    max_length: int = option(512, help="Truncate each text to this many tokens.", validator=positive)
    cache_dir: str | None = option(None, help="Cache folder for tokenizers and datasets.")


class CausalLMPerplexity(HFTaskPool):
    """Token-weighted perplexity of a causal LM on each task's texts (each text scored on its own, truncated)."""

    name = "causal_lm_perplexity"
    summary = "Causal-LM perplexity on text datasets (token-weighted over all texts); lower is better."
    Config = PerplexityConfig
    TaskFields = PerplexityTaskFields

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self._tokenizer = None

    def columns(self, spec) -> list[str]:
        return [spec.text_column]

    def primary_metric(self) -> str:
        return "perplexity"

    def evaluate(self, model, *, tasks=None, ctx=None) -> dict[str, dict[str, float]]:
        import torch

        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.companion, self.config.cache_dir)
        tokenizer = self._tokenizer
        tokenizer.padding_side = "right"
        device = self.device(ctx)
        model.to(device).eval()
        pad_for_model(model, tokenizer)
        results = {}
        for task in self.selected(tasks):
            ds, spec = self.dataset(task), self.specs[task]
            nll = 0.0
            tokens = 0
            total = -(-len(ds) // self.config.batch_size)
            with torch.inference_mode():
                for batch in self.track(ctx, self.batches(ds, [spec.text_column], self.config.batch_size), f"evaluating {task}", total):
                    texts = [t for t in batch[spec.text_column] if isinstance(t, str) and t.strip()]
                    if not texts:
                        continue
                    enc = tokenizer(texts, padding=True, truncation=True, max_length=self.config.max_length, return_tensors="pt").to(device)
                    logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float()
                    targets = enc["input_ids"][:, 1:]
                    mask = enc["attention_mask"][:, 1:].bool()
                    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
                    nll += float(losses[mask].sum())
                    tokens += int(mask.sum())
            mean = nll / tokens if tokens else float("nan")
            results[task] = {"perplexity": math.exp(mean) if tokens else float("nan"), "loss": mean, "tokens": float(tokens)}
        return results
