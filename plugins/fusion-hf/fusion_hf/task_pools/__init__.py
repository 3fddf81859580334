"""Task pools over Hugging Face datasets: CLIP zero-shot, text classification, causal-LM perplexity."""

from __future__ import annotations


def all_task_pools() -> list[type]:
    from .clip_zero_shot import ClipZeroShot
    from .perplexity import CausalLMPerplexity
    from .text_classification import TextClassification

    return [ClipZeroShot, TextClassification, CausalLMPerplexity]
