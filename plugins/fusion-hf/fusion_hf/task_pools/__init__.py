"""Task pools over Hugging Face datasets: CLIP zero-shot (and with an image backdoor trigger), text classification, causal-LM perplexity."""

from __future__ import annotations


def all_task_pools() -> list[type]:
    from .clip_backdoor import ClipBackdoor
    from .clip_zero_shot import ClipZeroShot
    from .perplexity import CausalLMPerplexity
    from .text_classification import TextClassification

    return [ClipZeroShot, ClipBackdoor, TextClassification, CausalLMPerplexity]
