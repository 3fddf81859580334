"""How Hugging Face models run on one batch of inputs (the ``forward`` of the adapter protocol).

``model(**inputs)`` for every model, except a full ``CLIPModel`` given images only, whose
image features come from ``get_image_features`` (returned as ``{"image_embeds": ...}``,
the field a CLIP zero-shot head reads).  The HF model pools use :func:`hf_forward` as their
``forward``; the HF task pools, which do not see the model pool, pass :data:`MODEL_CALL`
to :func:`fusion_core.adapters.logits` so that they run models the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def hf_forward(model: Any, inputs: Any) -> Any:
    """Run ``model`` on ``inputs`` (a dict of tensors): ``model(**inputs)``, or a CLIPModel's image features."""
    from fusion_core.adapters import forward

    if isinstance(inputs, Mapping) and "pixel_values" in inputs and "input_ids" not in inputs:
        features = getattr(model, "get_image_features", None)
        if callable(features):
            out = features(**inputs)
            return {"image_embeds": out if hasattr(out, "norm") else out.pooler_output}
    return forward(model, inputs)


class ModelCall:
    """Stands for a model pool where :func:`fusion_core.adapters.logits` takes one: runs models with :func:`hf_forward`."""

    @staticmethod
    def forward(model: Any, inputs: Any) -> Any:
        return hf_forward(model, inputs)


MODEL_CALL = ModelCall()
