"""Dataset rows → model inputs: the batches the task pools score and the model pools hand to data-driven methods.

An *encoder* turns a batch of dataset rows (a dict of columns) into the keyword inputs of
a model: :class:`ImageEncoder` gives ``{"pixel_values"}`` (CLIP vision towers),
:class:`TextEncoder` gives the tokenizer's ``{"input_ids", "attention_mask", ...}``.
:class:`EncodedBatches` iterates a dataset (loaded on first use) in batches of such inputs,
with or without their labels; it can be iterated any number of times.  Evaluation and the
protocol of :mod:`fusion_core.adapters` use the same class, so a method adapting on
``unlabelled_batches`` sees exactly the inputs the task pool scores.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fusion_core import InputError


class ImageEncoder:
    """Rows with an image column → ``{"pixel_values": (B, 3, H, W)}`` through an image processor."""

    def __init__(self, processor: Any, image_column: str = "image") -> None:
        self.processor, self.image_column = processor, image_column

    @property
    def columns(self) -> list[str]:
        return [self.image_column]

    def __call__(self, rows: dict) -> dict[str, Any]:
        return {"pixel_values": self.processor(images=to_rgb(rows[self.image_column]), return_tensors="pt")["pixel_values"]}


class TextEncoder:
    """Rows with a text column (and optionally a second one) → the tokenizer's padded tensors."""

    def __init__(self, tokenizer: Any, text_column: str = "text", text_pair_column: str | None = None, max_length: int = 128) -> None:
        self.tokenizer, self.text_column, self.text_pair_column, self.max_length = tokenizer, text_column, text_pair_column, max_length

    @property
    def columns(self) -> list[str]:
        return [self.text_column] + ([self.text_pair_column] if self.text_pair_column else [])

    def __call__(self, rows: dict) -> dict[str, Any]:
        pair = rows[self.text_pair_column] if self.text_pair_column else None
        enc = self.tokenizer(rows[self.text_column], pair, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return dict(enc)


class TokenWindows:
    """Rows of plain text → windows of ``max_length`` tokens of their concatenation (no padding): causal-LM calibration inputs.

    The texts of a batch are tokenized, joined (the tokenizer's EOS between them when it has
    one) and cut into consecutive windows of ``max_length`` tokens; a last partial window is
    dropped unless it is the only one.  As the C4 windows of FusionBench's pruning (``seqlen``
    tokens each), every position is a real token.
    """

    def __init__(self, tokenizer: Any, text_column: str = "text", max_length: int = 128) -> None:
        self.tokenizer, self.text_column, self.max_length = tokenizer, text_column, int(max_length)

    @property
    def columns(self) -> list[str]:
        return [self.text_column]

    def __call__(self, rows: dict) -> dict[str, Any]:
        import torch

        texts = [t for t in rows[self.text_column] if isinstance(t, str) and t.strip()]
        eos = self.tokenizer.eos_token_id
        stream: list[int] = []
        for text in texts:
            stream += list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
            if eos is not None:
                stream.append(eos)
        if not stream:
            raise InputError(f"no tokens in a batch of column {self.text_column!r} (every text is empty)")
        n = self.max_length
        windows = [stream[i : i + n] for i in range(0, len(stream) - n + 1, n)] or [stream[:n]]
        ids = torch.tensor(windows, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class EncodedBatches:
    """Batches of a dataset encoded for a model: ``(inputs, labels)`` pairs, or ``inputs`` alone.

    :param dataset: the dataset, or a function loading it (called once, on the first iteration).
    :param encode: an encoder (rows → inputs) with a ``columns`` attribute.
    :param label_column: the integer label column; ``None`` gives unlabelled inputs.
    """

    def __init__(self, dataset: Any, encode: ImageEncoder | TextEncoder, batch_size: int, label_column: str | None = None) -> None:
        self._dataset, self.encode, self.batch_size, self.label_column = dataset, encode, int(batch_size), label_column

    def dataset(self):
        if callable(self._dataset):
            self._dataset = self._dataset()
        return self._dataset

    def __len__(self) -> int:
        return -(-len(self.dataset()) // self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        import torch

        ds = self.dataset()
        columns = list(self.encode.columns) + ([self.label_column] if self.label_column else [])
        view = ds.select_columns(columns)
        for start in range(0, len(view), self.batch_size):
            rows = view[start : start + self.batch_size]
            inputs = self.encode(rows)
            if self.label_column is None:
                yield inputs
            else:
                yield inputs, torch.as_tensor(rows[self.label_column], dtype=torch.long)


def to_rgb(images) -> list:
    """PIL images (or uint8 arrays, grey or colour) → RGB PIL images."""
    import numpy as np
    from PIL import Image

    out = []
    for image in images:
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image, dtype=np.uint8))
        out.append(image if image.mode == "RGB" else image.convert("RGB"))
    return out


def load_image_processor(loc, opts, label: str):
    """The image processor saved with ``loc`` (a :class:`~fusion_hf.sources.Location`), or one clear error."""
    from transformers import AutoImageProcessor

    from .loading import one_line, pretrained_kwargs, quiet_transformers

    target, kwargs = pretrained_kwargs(loc, opts)
    quiet_transformers()
    try:
        return AutoImageProcessor.from_pretrained(target, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{label}: cannot load an image processor from {loc.source.spec()}: {one_line(exc)}") from None

