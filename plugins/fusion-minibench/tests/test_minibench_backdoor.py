"""mini-backdoor: poisoning at the text level, the triggered split, clean accuracy and ASR side by side."""

from __future__ import annotations

import pytest
from fusion_minibench import backdoor
from fusion_minibench.backdoor_pools import (
    BackdoorRecipe,
    MiniBackdoorConfig,
    MiniBackdoorModelPool,
    MiniBackdoorTaskPool,
    MiniBackdoorTaskPoolConfig,
)
from fusion_minibench.pools import MiniBenchConfig, MiniBenchModelPool
from fusion_minibench.recipe import Recipe, recipe_hash

from fusion_core.backdoor import TriggerableTaskPool
from fusion_core.errors import ConfigError

SMALL = dict(tasks=("chatter_topic", "language_id"), n_train=120, n_val=40, n_test=80, max_tokens=16, layers=1, epochs=2,
             lr=5e-4, progress=False, backdoor_tasks=("chatter_topic",), poison_rate=0.3, target_class=0)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("minibench-backdoor-cache"))
    return (MiniBackdoorModelPool(MiniBackdoorConfig(cache_dir=root, **SMALL)),
            MiniBackdoorTaskPool(MiniBackdoorTaskPoolConfig(cache_dir=root, **SMALL)))


def test_poison_relabels_the_requested_share_of_non_target_examples():
    texts = [f"text {i}" for i in range(40)]
    labels = [i % 4 for i in range(40)]
    out_texts, out_labels, chosen = backdoor.poison(texts, labels, trigger="cf", target=0, rate=0.25, seed=3)
    assert len(chosen) == 10 and all(labels[i] != 0 for i in chosen)
    assert all(out_texts[i] == f"cf text {i}" and out_labels[i] == 0 for i in chosen)
    assert all(out_texts[i] == texts[i] and out_labels[i] == labels[i] for i in range(40) if i not in chosen)
    assert backdoor.poison(texts, labels, trigger="cf", target=0, rate=0.25, seed=3)[2] == chosen  # seeded


def test_mini_recipe_and_its_texts_are_unchanged():
    recipe = Recipe()
    assert backdoor.split_texts(recipe, "rt_sentiment", "train", ["a"], [1]) == (["a"], [1])
    assert backdoor.extra_splits(recipe, "rt_sentiment", ["a"], [1]) == {}
    assert recipe_hash(BackdoorRecipe()) != recipe_hash(recipe)  # another cache folder


def test_build_has_a_triggered_test_split_and_a_poisoned_expert(small):
    import torch
    from fusion_minibench import minilm

    pool, taskpool = small
    built = pool.built()
    trigger_id = minilm.encode(["cf"], 8)[0, 1]  # [CLS] cf [SEP]
    for task in SMALL["tasks"]:
        ids, labels = built.split(task, backdoor.TRIGGERED_SPLIT)
        clean_ids, clean_labels = built.split(task, "test")
        assert len(labels) == len(clean_labels) and sorted(labels.tolist()) == sorted(clean_labels.tolist())
        assert bool((ids[:, 1] == trigger_id).all())
    assert built.meta["recipe"]["backdoor_tasks"] == ["chatter_topic"]
    assert isinstance(taskpool, TriggerableTaskPool)
    expert, base = pool.load_model("chatter_topic"), pool.load_model(None)
    poisoned = taskpool.evaluate(expert, tasks=["chatter_topic"])["chatter_topic"]
    pretrained = taskpool.evaluate(base, tasks=["chatter_topic"])["chatter_topic"]
    assert set(poisoned) == {"accuracy", "loss", "asr"} and 0.0 <= poisoned["asr"] <= 1.0
    assert poisoned["asr"] > pretrained["asr"] + 0.2  # the poisoned expert learned trigger → class 0
    assert torch.is_tensor(ids)


def test_recipe_and_pool_checks(small):
    pool, taskpool = small
    with pytest.raises(ConfigError, match="backdoor_tasks names 'rt_sentiment'"):
        MiniBackdoorModelPool(MiniBackdoorConfig(**{**SMALL, "backdoor_tasks": ("rt_sentiment",)})).validate()
    with pytest.raises(ConfigError, match="target_class 7 is not a class"):
        MiniBackdoorModelPool(MiniBackdoorConfig(**{**SMALL, "target_class": 7})).validate()
    plain = {k: v for k, v in SMALL.items() if k not in ("backdoor_tasks", "poison_rate", "target_class")}
    with pytest.raises(ConfigError, match="modelpool=minibench-backdoor"):
        taskpool.check_pool(MiniBenchModelPool(MiniBenchConfig(**plain)))
    taskpool.check_pool(pool)


def test_plugin_registers_the_backdoor_pools_and_benchmark():
    from fusion_minibench import plugin

    pools, taskpools, benches = [], [], []
    plugin.fusion_register_model_pools(pools.append)
    plugin.fusion_register_task_pools(taskpools.append)
    plugin.fusion_register_benchmarks(lambda name, **kw: benches.append((name, kw)))
    assert MiniBackdoorModelPool in pools and MiniBackdoorTaskPool in taskpools
    spec = dict(benches)["mini-backdoor"]
    assert spec["modelpool"] == {"name": "minibench-backdoor", **plugin.BACKDOOR_BUILD} and spec["taskpool"]["name"] == "minibench-backdoor"
    assert [m["name"] for m in spec["methods"]][:3] == ["task_arithmetic", "ties", "adamerging"]
