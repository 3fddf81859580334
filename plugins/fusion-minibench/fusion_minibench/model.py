"""The mergeable encoder (a bag of MiniLM token embeddings and an MLP) and the fixed zero-shot heads.

Importing this module imports torch: only the builder and the pools' methods import it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

EMBEDDING_SCALE = 10.0
"""MiniLM's input embeddings have norms around 1; scaled so the MLP sees unit-scale inputs."""


class BagEncoder(nn.Module):
    """Token ids ``(batch, length)`` (0 = padding) → a 384-d vector in MiniLM's sentence space.

    ``embed`` is a mean-mode ``EmbeddingBag`` over the benchmark's vocabulary (row 0 is
    padding, left out of the mean); ``mlp`` is Linear-GELU-Linear-GELU-Linear.  Its
    ``state_dict()`` is exactly what methods merge.
    """

    def __init__(self, vocab_size: int, hidden: int, dim: int = 384) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(vocab_size, dim, mode="mean", padding_idx=0, sparse=True)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embed(ids))

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> "BagEncoder":
        vocab_size, dim = state["embed.weight"].shape
        hidden = state["mlp.0.weight"].shape[0]
        model = cls(vocab_size, hidden, dim)
        model.load_state_dict(dict(state))
        return model


class PromptHead(nn.Module):
    """A fixed zero-shot head: ``scale · cos(features, prompt_k)`` for each class ``k``.

    ``prompts`` are MiniLM's normalised sentence embeddings of the class descriptions (the
    analogue of CLIP's text-embedding heads).  Nothing here trains: both are buffers.
    """

    def __init__(self, prompts: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.register_buffer("prompts", F.normalize(prompts.float(), dim=-1))
        self.register_buffer("scale", torch.tensor(float(scale)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(features, dim=-1) @ self.prompts.T


def pad_ids(rows: Sequence[Sequence[int]]) -> torch.Tensor:
    """Right-pad lists of vocabulary ids with 0 into a LongTensor (an empty row stays all padding)."""
    width = max([1] + [len(r) for r in rows])
    out = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


def optimizers(model: BagEncoder, *, lr: float, embed_lr: float) -> list[torch.optim.Optimizer]:
    """AdamW (no weight decay) on the MLP, SparseAdam on the embedding bag (sparse gradients)."""
    return [
        torch.optim.AdamW(model.mlp.parameters(), lr=lr, weight_decay=0.0),
        torch.optim.SparseAdam([model.embed.weight], lr=embed_lr),
    ]
