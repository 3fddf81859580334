"""The data a Hugging Face model pool gives data-driven methods: ``ModelPool.data(name, split)``.

A pool's ``datasets`` maps a model name (= its task) to a dataset spec like a task pool's
task, except that instead of one ``split`` it has ``splits``, which maps the protocol's split
names (``train``, ``val``, ``test``: what methods ask for) to the dataset's own split names.
The default is ``{train: train, val: validation, test: test}``; a split a spec does not map
gives ``None`` (the method then says which split is missing), and a mapped split that the
dataset lacks is one error line listing the splits it has.

Rows are encoded for the pool's models: images → ``pixel_values`` with the base's (or
``processor``'s) image processor for CLIP vision and image classifiers, text →
``input_ids``/``attention_mask`` with its tokenizer for sequence classifiers.
"""

from __future__ import annotations

import attrs

from fusion_core import option

from .data import DataFiles, DatasetFields

DEFAULT_SPLITS = {"train": "train", "val": "validation", "test": "test"}

IMAGE_CLASSES = ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel", "AutoModelForImageClassification")
TEXT_CLASSES = ("AutoModelForSequenceClassification",)
LM_CLASSES = ("AutoModelForCausalLM",)


def input_kind(auto_class: str) -> str | None:
    """``"image"``, ``"text"`` (labelled), ``"lm"`` (plain text, calibration only) or ``None`` (no data for models of this class)."""
    if auto_class in IMAGE_CLASSES:
        return "image"
    if auto_class in TEXT_CLASSES:
        return "text"
    if auto_class in LM_CLASSES:
        return "lm"
    return None


@attrs.frozen
class ModelDataFields:
    """One model's (= task's) dataset, for data-driven methods."""

    dataset: str = option(help="A hub dataset ('org/name'), a builder (csv, json, parquet, arrow, text, imagefolder) with data_files, "
                          "or a local folder (saved with save_to_disk, or holding data files).")
    splits: dict[str, str] | None = option(None, help="Protocol split (train, val, test) → the dataset's split "
                                           "(default {train: train, val: validation, test: test}).")
    config: str | None = option(None, help="The dataset configuration name (hub datasets).")
    data_files: DataFiles | None = option(None, help="Local data files: a path, a list, or {split: path(s)}.")
    revision: str | None = option(None, help="Hub revision of the dataset.")
    max_samples: int | None = option(None, help="Use only the first N examples of each split.")
    image_column: str = option("image", help="Column holding the images (image models).")
    text_column: str = option("text", help="Column holding the text (text models).")
    text_pair_column: str | None = option(None, help="Second text column for sentence-pair tasks (text models).")
    label_column: str = option("label", help="Column holding integer labels.")

    def split_map(self) -> dict[str, str]:
        return dict(DEFAULT_SPLITS if self.splits is None else self.splits)

    def for_split(self, split: str) -> DatasetFields | None:
        """The :class:`DatasetFields` of protocol split ``split`` (``None``: not mapped)."""
        mapped = self.split_map().get(split)
        if mapped is None:
            return None
        return DatasetFields(dataset=self.dataset, split=mapped, config=self.config, data_files=self.data_files,
                             revision=self.revision, max_samples=self.max_samples)

    def columns(self, kind: str) -> list[str]:
        if kind == "image":
            return [self.image_column, self.label_column]
        if kind == "lm":
            return [self.text_column]
        return [self.text_column, self.label_column] + ([self.text_pair_column] if self.text_pair_column else [])

