"""Batches of tokenised texts: padded ids in, ``{"input_ids", "attention_mask"}`` mappings out.

Splits are stored as padded id matrices (0 = [PAD]).  Evaluation batches follow the stored order
(each split is stored sorted by length, so a batch is trimmed to little padding); training
batches group texts of similar length (:func:`length_bucketed`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

BUCKET = 16
"""Training batches are cut from shuffled runs of ``BUCKET`` batches sorted by length."""


def inputs(ids: "torch.Tensor") -> dict[str, "torch.Tensor"]:
    """``{"input_ids", "attention_mask"}`` of padded ids (int64), trimmed to the longest row.

    Never inference tensors (even when made inside ``torch.inference_mode``): a method may train on them later.
    """
    import torch

    with torch.inference_mode(False):
        ids = ids.long()
        mask = ids != 0
        width = max(1, int(mask.sum(1).max())) if len(ids) else 1
        return {"input_ids": ids[:, :width].clone(), "attention_mask": mask[:, :width].to(torch.long)}


class Batches:
    """Re-iterable ``(inputs, labels)`` batches of one split, in the stored order."""

    def __init__(self, ids: "torch.Tensor", labels: "torch.Tensor", batch_size: int) -> None:
        self.ids, self.labels, self.batch_size = ids, labels, batch_size

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[dict[str, "torch.Tensor"], "torch.Tensor"]]:
        for start in range(0, len(self.labels), self.batch_size):
            yield inputs(self.ids[start : start + self.batch_size]), self.labels[start : start + self.batch_size]


def length_bucketed(ids: "torch.Tensor", batch_size: int, generator: "torch.Generator") -> list["torch.Tensor"]:
    """One epoch of index batches: shuffled, then each run of ``BUCKET`` batches sorted by length
    and cut into batches, whose order is shuffled again (deterministic given ``generator``)."""
    import torch

    lengths = (ids != 0).sum(1)
    order = torch.randperm(len(ids), generator=generator)
    batches: list[torch.Tensor] = []
    run = batch_size * BUCKET
    for start in range(0, len(order), run):
        chunk = order[start : start + run]
        chunk = chunk[torch.sort(lengths[chunk], stable=True).indices]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
