"""The mergeable encoder (all-MiniLM-L6-v2, a ``transformers.BertModel``) and the fixed zero-shot heads.

Importing this module imports torch and transformers: only the builder and the pools' methods import it.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import BertConfig, BertModel

FROZEN = ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight", "embeddings.token_type_embeddings.weight")
"""Lookup tables the experts never train (see the README): their task vectors are zero."""


class MiniLMEncoder(BertModel):
    """all-MiniLM-L6-v2 as a sentence encoder: ``forward(input_ids, attention_mask)`` → ``(batch, 384)``.

    A plain ``BertModel`` (no pooler), so its ``state_dict()`` keys are BertModel's
    (``embeddings.*``, ``encoder.layer.<i>.*``) and linear-layer methods (RegMean, WEMoE...) see
    its ``nn.Linear`` modules; only ``forward`` differs: the last hidden states are mean-pooled
    over the attention mask and L2-normalised, the model's own sentence-embedding convention.
    """

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any) -> torch.Tensor:  # type: ignore[override]
        if attention_mask is None:
            attention_mask = (input_ids != 0).long()
        hidden = super().forward(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return F.normalize(pooled, dim=-1)

    @classmethod
    def from_state_dict(cls, config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> "MiniLMEncoder":
        """An encoder of the BERT ``config`` (a dict) holding a copy of ``state`` (BertModel's keys, no pooler)."""
        model = copy.deepcopy(_template(json.dumps(dict(config), sort_keys=True)))
        model.load_state_dict(dict(state), strict=True)
        return model.eval()


@functools.lru_cache(maxsize=4)
def _template(config_json: str) -> MiniLMEncoder:
    """One initialised encoder per configuration and process (BERT's random init takes about a second)."""
    bert_config = BertConfig(**json.loads(config_json))
    bert_config._attn_implementation = "sdpa"
    return MiniLMEncoder(bert_config, add_pooling_layer=False).eval()


class PromptHead(nn.Module):
    """A fixed zero-shot head: ``scale · cos(features, prompt_k)`` for each class ``k``.

    ``prompts`` are the pretrained MiniLM's normalised embeddings of the class descriptions
    (averaged over the templates, as CLIP's text-embedding heads).  Nothing here trains: both are buffers.
    """

    def __init__(self, prompts: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.register_buffer("prompts", F.normalize(prompts.float(), dim=-1))
        self.register_buffer("scale", torch.tensor(float(scale)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(features, dim=-1) @ self.prompts.T


def pad_ids(rows: Sequence[Sequence[int]], width: int | None = None) -> torch.Tensor:
    """Right-pad lists of token ids with 0 ([PAD]) into a LongTensor."""
    width = width or max([1] + [len(r) for r in rows])
    out = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out
