"""Which ``transformers`` classes a pool may build (a fixed allowlist), and architecture signatures.

Configs name classes from :data:`AUTO_CLASSES` only; a dotted import path in a config is
never imported.  Signatures come from ``config.json`` alone, so pools are checked for
matching architectures before any weight is read.
"""

from __future__ import annotations

from typing import Any

AUTO_CLASSES: tuple[str, ...] = (
    "AutoModel",
    "AutoModelForSequenceClassification",
    "AutoModelForCausalLM",
    "AutoModelForSeq2SeqLM",
    "AutoModelForMaskedLM",
    "AutoModelForTokenClassification",
    "AutoModelForQuestionAnswering",
    "AutoModelForImageClassification",
    "CLIPModel",
    "CLIPVisionModel",
    "CLIPVisionModelWithProjection",
    "CLIPTextModel",
)
"""Every class a config may name (``auto_class``)."""

TASKS: dict[str, str] = {
    "feature-extraction": "AutoModel",
    "sequence-classification": "AutoModelForSequenceClassification",
    "text-classification": "AutoModelForSequenceClassification",
    "causal-lm": "AutoModelForCausalLM",
    "text-generation": "AutoModelForCausalLM",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "text2text-generation": "AutoModelForSeq2SeqLM",
    "masked-lm": "AutoModelForMaskedLM",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "image-classification": "AutoModelForImageClassification",
    "clip": "CLIPModel",
    "clip-vision": "CLIPVisionModel",
}
"""``task`` shortcuts → the auto class they choose."""

SUB_CONFIGS: dict[str, str] = {
    "CLIPVisionModel": "vision_config",
    "CLIPVisionModelWithProjection": "vision_config",
    "CLIPTextModel": "text_config",
}
"""Classes that load from the matching sub-config of a composite (e.g. a full CLIP) checkpoint."""

SIZE_FIELDS: tuple[tuple[str, ...], ...] = (
    ("hidden_size", "n_embd", "d_model"),
    ("num_hidden_layers", "n_layer", "num_layers"),
    ("num_attention_heads", "n_head", "num_heads"),
    ("intermediate_size", "n_inner", "d_ff"),
    ("image_size",),
    ("patch_size",),
    ("num_channels",),
    ("vocab_size",),
)


def model_class(name: str):
    """The ``transformers`` class called ``name`` from the allowlist."""
    if name not in AUTO_CLASSES:
        from fusion_core import ConfigError, did_you_mean

        raise ConfigError(f"auto class {name!r} is not allowed{did_you_mean(name, AUTO_CLASSES)}")
    import transformers

    return getattr(transformers, name)


def signature(config: dict[str, Any], auto_class: str) -> dict[str, Any]:
    """What must agree across a pool: the model type and the sizes, from a ``config.json`` dict.

    For classes that load a sub-model (the CLIP vision tower), a composite checkpoint's
    sub-config is used, so a full CLIP base and vision-only fine-tuned checkpoints agree.
    """
    sub = SUB_CONFIGS.get(auto_class)
    if sub and isinstance(config.get(sub), dict):
        config = config[sub]
        model_type = config.get("model_type") or f"{sub.removesuffix('_config')}"
    else:
        model_type = config.get("model_type")
    out: dict[str, Any] = {"model_type": model_type}
    if sub == "vision_config":  # vision-only checkpoints report clip_vision_model, composites clip
        out["model_type"] = "clip_vision_model" if model_type in ("clip", "clip_vision_model", "vision") else model_type
    for names in SIZE_FIELDS:
        for key in names:
            if key in config:
                out[names[0]] = config[key]
                break
    return out


def describe_signature(sig: dict[str, Any]) -> str:
    sizes = ", ".join(f"{k}={v}" for k, v in sig.items() if k != "model_type")
    return f"{sig.get('model_type')} ({sizes})" if sizes else str(sig.get("model_type"))


def signature_difference(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Fields present in both signatures whose values differ."""
    return [k for k in a if k in b and a[k] != b[k]]
