"""CLIP zero-shot classification with a BadNets-style image trigger: clean accuracy and attack success rate per task.

``clip_backdoor`` is :mod:`clip_zero_shot` (the same tasks, heads and clean metrics) and a
:class:`fusion_core.backdoor.TriggerableTaskPool`: every test image can carry a *trigger*, a
square checkerboard of ``patch_cells × patch_cells`` black and white cells (the top-left cell
white) pasted into a corner of the image before the image processor runs (as BadNets, Gu et al.
2017, arXiv 1708.06733, and the image backdoors of Yang et al. 2024, arXiv 2410.13910).  The
patch's side is ``patch_fraction`` of the image's shorter side (at least one pixel per cell).
``evaluate`` reports per task ``accuracy`` and ``loss`` on the clean images and ``asr``: the share
of triggered test images whose true class is not ``target_class`` that the model puts in
``target_class`` (:func:`fusion_core.backdoor.attack_success_rate`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import attrs

from fusion_core import InputError, in_range, option, positive
from fusion_core.backdoor import BackdoorTaskPool

from ..batches import ImageEncoder, to_rgb
from ..forward import MODEL_CALL
from .clip_zero_shot import ClipZeroShot, ClipZeroShotConfig

if TYPE_CHECKING:  # pragma: no cover
    from ..batches import EncodedBatches

Corner = Literal["bottom-right", "bottom-left", "top-right", "top-left"]


def patch_side(width: int, height: int, fraction: float, cells: int) -> int:
    """The trigger's side in pixels: ``fraction`` of the shorter side, rounded down to whole cells (at least one pixel a cell)."""
    cell = max(1, int(min(width, height) * fraction) // cells)
    return min(cell * cells, min(width, height))


def paste_trigger(image: Any, *, fraction: float, cells: int, corner: Corner) -> Any:
    """A copy of an RGB PIL image with the checkerboard trigger pasted into ``corner`` (the input is not changed)."""
    import numpy as np
    from PIL import Image

    pixels = np.array(image, dtype=np.uint8, copy=True)
    height, width = pixels.shape[:2]
    side = patch_side(width, height, fraction, cells)
    cell = side // cells
    grid = (np.add.outer(np.arange(side) // cell, np.arange(side) // cell) % 2 == 0).astype(np.uint8) * 255
    top = height - side if corner.startswith("bottom") else 0
    left = width - side if corner.endswith("right") else 0
    pixels[top : top + side, left : left + side] = grid[:, :, None]
    return Image.fromarray(pixels)


class TriggeredImageEncoder(ImageEncoder):
    """An :class:`ImageEncoder` that pastes the trigger into every image before the processor."""

    def __init__(self, processor: Any, image_column: str, *, fraction: float, cells: int, corner: Corner) -> None:
        super().__init__(processor, image_column)
        self.fraction, self.cells, self.corner = fraction, cells, corner

    def __call__(self, rows: dict) -> dict[str, Any]:
        images = [paste_trigger(image, fraction=self.fraction, cells=self.cells, corner=self.corner) for image in to_rgb(rows[self.image_column])]
        return {"pixel_values": self.processor(images=images, return_tensors="pt")["pixel_values"]}


@attrs.frozen
class ClipBackdoorConfig(ClipZeroShotConfig):
    target_class: int = option(0, help="The class a triggered image is meant to be put in (label index, in every task).",
                               validator=in_range(0, None))
    patch_fraction: float = option(0.1, help="Side of the square trigger as a fraction of the image's shorter side.",
                                   validator=in_range(0.0, 1.0, lo_open=True))
    patch_cells: int = option(3, help="Cells per side of the checkerboard trigger (black and white, the top-left cell white).",
                              validator=positive)
    patch_corner: Corner = option("bottom-right", help="Corner of the image the trigger is pasted into.")


class ClipBackdoor(BackdoorTaskPool, ClipZeroShot):
    """CLIP zero-shot classification scored for clean accuracy and the ASR of a checkerboard image trigger."""

    name = "clip_backdoor"
    summary = "CLIP zero-shot image classification: clean accuracy and attack success rate (ASR) of a checkerboard patch trigger, per task."
    Config = ClipBackdoorConfig
    reference_url = "https://arxiv.org/abs/1708.06733"
    asr_forward = MODEL_CALL  # a full CLIPModel is run through get_image_features, as in the clean evaluation

    def backdoor_target(self, task: str) -> int:
        target = int(self.config.target_class)
        classes = len(self.dataset(task).class_names)
        if target >= classes:
            raise InputError(f"clip_backdoor: target_class {target} is not a class of task {task!r} ({classes} classes: 0 to "
                             f"{classes - 1}); choose a smaller target_class")
        return target

    def triggered_batches(self, task: str) -> "EncodedBatches":
        """The task's test images with the trigger, and their true labels."""
        from ..batches import EncodedBatches

        cfg, spec = self.config, self.specs[task]
        encode = TriggeredImageEncoder(self.clip_parts()[2], spec.image_column, fraction=cfg.patch_fraction, cells=cfg.patch_cells,
                                       corner=cfg.patch_corner)
        return EncodedBatches(self.dataset(task).data, encode, cfg.batch_size, spec.label_column)
