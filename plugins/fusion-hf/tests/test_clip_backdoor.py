"""The ``clip_backdoor`` task pool: the checkerboard trigger pixel by pixel, and the ASR on constructed and tiny-CLIP cases."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from fusion_hf.task_pools.clip_backdoor import ClipBackdoor, ClipBackdoorConfig, paste_trigger, patch_side  # noqa: E402
from hf_testkit import TEMPLATE, base_predictions, save_image_dataset  # noqa: E402

from fusion_core import ConfigError, InputError, make_config  # noqa: E402


def grey(level: int, size: int = 10):
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.full((size, size, 3), level, dtype=np.uint8))


def test_trigger_is_a_checkerboard_in_the_corner_and_the_input_is_untouched():
    import numpy as np

    image = grey(100)
    out = np.asarray(paste_trigger(image, fraction=0.4, cells=2, corner="bottom-right"))[:, :, 0]
    expected = np.full((10, 10), 100, dtype=np.uint8)  # side 4 (0.4 · 10), cells of 2 pixels, the top-left cell white
    expected[6:8, 6:8] = 255
    expected[6:8, 8:10] = 0
    expected[8:10, 6:8] = 0
    expected[8:10, 8:10] = 255
    assert (out == expected).all()
    assert (np.asarray(image) == 100).all()
    top_left = np.asarray(paste_trigger(image, fraction=0.4, cells=2, corner="top-left"))[:, :, 1]
    assert (top_left[:2, :2] == 255).all() and (top_left[:2, 2:4] == 0).all() and (top_left[4:, :] == 100).all()


def test_patch_side_is_whole_cells_of_the_shorter_side():
    assert patch_side(300, 224, 0.1, 3) == 21  # int(22.4) = 22 → 7-pixel cells
    assert patch_side(32, 32, 0.01, 3) == 3  # at least one pixel a cell
    assert patch_side(4, 4, 1.0, 3) == 3


def pool_for(clip_base, datasets: dict, cache, **fields) -> ClipBackdoor:
    config = {"clip_model": str(clip_base), "templates": [TEMPLATE], "batch_size": 5, "cache_dir": str(cache),
              "tasks": {name: {"dataset": str(path), "split": "test"} for name, path in datasets.items()}, **fields}
    return ClipBackdoor(make_config(ClipBackdoorConfig, config))


class BrightnessModel(torch.nn.Module):
    """A stand-in vision tower: the class of an image is its brightness bin; a trigger on a bright image flips it to class 0."""

    def __init__(self, heads, flip_levels: tuple[int, ...]) -> None:
        super().__init__()
        self.visual_projection = torch.nn.Identity()  # lets the clip pools score it as a vision model
        self.heads, self.flip_levels = heads, flip_levels

    def forward(self, pixel_values):
        x = pixel_values[:, 0]
        level = x[:, :8, :8].mean(dim=(1, 2))  # the top-left corner: never covered by the trigger
        classes = torch.bucketize(level, torch.tensor([-1.0, 0.5]))  # grey 40 → 0, 120 → 1, 200 → 2 (CLIP's normalisation)
        corner = x[:, -8:, -8:]
        triggered = (corner.amax(dim=(1, 2)) - corner.amin(dim=(1, 2))) > 1.0
        flip = triggered & torch.isin(classes, torch.tensor(self.flip_levels))
        classes = torch.where(flip, torch.zeros_like(classes), classes)
        return {"image_embeds": self.heads[classes]}


def test_asr_on_a_constructed_case(clip_assets, tmp_path):
    """4 / 5 / 3 images of classes 0 / 1 / 2; the model flips triggered class-2 images only: ASR = 3 / 8 exactly."""
    levels = [40] * 4 + [120] * 5 + [200] * 3
    labels = [0] * 4 + [1] * 5 + [2] * 3
    data = save_image_dataset(tmp_path / "grey", [grey(v, 32) for v in levels], labels, ["cat", "dog", "bird"])
    pool = pool_for(clip_assets["base"], {"grey": data}, tmp_path / "cache", patch_fraction=0.25, patch_cells=4)
    heads = pool.head("grey", "cpu")
    results = pool.evaluate(BrightnessModel(heads, (2,)))["grey"]
    assert results["accuracy"] == 1.0
    assert results["asr"] == pytest.approx(3 / 8, abs=0)
    assert pool.evaluate(BrightnessModel(heads, (1, 2)))["grey"]["asr"] == 1.0
    assert pool.evaluate(BrightnessModel(heads, ()))["grey"]["asr"] == 0.0
    target_two = pool_for(clip_assets["base"], {"grey": data}, tmp_path / "cache", patch_fraction=0.25, patch_cells=4, target_class=2)
    assert target_two.evaluate(BrightnessModel(heads, (2,)))["grey"]["asr"] == 0.0  # class 2 is the target: its images do not count


def test_asr_of_the_tiny_clip_equals_a_direct_computation(clip_assets, tmp_path):
    """The full base CLIPModel (scored through get_image_features) on triggered images, against transformers directly."""
    import datasets
    from transformers import CLIPModel

    task, names = "animals", ["cat", "dog", "bird"]
    pool = pool_for(clip_assets["base"], {task: clip_assets["data"][task]}, tmp_path / "cache", patch_fraction=0.5, target_class=1)
    results = pool.evaluate(CLIPModel.from_pretrained(clip_assets["base"]))[task]
    assert results["accuracy"] == 1.0  # the labels are the base's own clean predictions
    rows = datasets.load_from_disk(str(clip_assets["data"][task]))["test"]
    triggered = [paste_trigger(image.convert("RGB"), fraction=0.5, cells=3, corner="bottom-right") for image in rows["image"]]
    predicted = base_predictions(clip_assets["base"], triggered, names)
    others = [i for i, label in enumerate(rows["label"]) if label != 1]
    expected = sum(predicted[i] == 1 for i in others) / len(others)
    assert 0 < expected < 1  # the trigger moves some images and not others: the case is not trivial
    assert results["asr"] == pytest.approx(expected, abs=0)


def test_errors_name_the_field(clip_assets, tmp_path):
    with pytest.raises(InputError, match="target_class 3 is not a class of task 'animals'"):
        pool_for(clip_assets["base"], {"animals": clip_assets["data"]["animals"]}, tmp_path / "cache", target_class=3).backdoor_target("animals")
    with pytest.raises(ConfigError, match="patch_fraction"):
        make_config(ClipBackdoorConfig, {"clip_model": "x", "patch_fraction": 0.0})
