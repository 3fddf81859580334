"""A small recipe builds in seconds from the real data and MiniLM; the pools and the plugin work end to end."""

from __future__ import annotations

import json
import math

import attrs
import pytest
from fusion_minibench import cache, plugin
from fusion_minibench.pools import MiniBenchConfig, MiniBenchModelPool, MiniBenchTaskPool, MiniBenchTaskPoolConfig
from fusion_minibench.recipe import recipe_hash, recipe_of

from fusion_core.errors import InputError

SMALL = dict(
    tasks=("chatter_topic", "language_id"),
    n_train=120,
    n_val=40,
    n_test=80,
    max_tokens=16,
    layers=1,
    epochs=2,
    lr=5e-4,
    progress=False,
)
"""MiniLM's first layer, 120 texts per task, 16 tokens, 2 epochs: a build in seconds."""


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("minibench-cache")
    config = MiniBenchConfig(cache_dir=str(root), **SMALL)
    return MiniBenchModelPool(config), MiniBenchTaskPool(MiniBenchTaskPoolConfig(cache_dir=str(root), **SMALL))


def test_task_pool_split_field_selects_the_scored_split(small):
    pool, taskpool = small
    val_pool = MiniBenchTaskPool(attrs.evolve(taskpool.config, split="val"))
    base = pool.load_model(None)
    assert val_pool.evaluate(base) == taskpool.evaluate(base, split="val")
    assert taskpool.evaluate(base) == taskpool.evaluate(base, split="test")


def test_unlabelled_batches_cover_the_test_split_once_in_a_seeded_shuffled_order(small):
    """Test-time adaptation reads every test text once per pass, in similar-length batches whose order is
    drawn from the recipe seed (not the stored shortest-first order); sorted keeps the stored order."""
    import torch

    pool, taskpool = small
    ids, _ = taskpool.built().split("chatter_topic", "test")
    ids = ids.long()
    shuffled = taskpool.unlabelled_batches("chatter_topic")
    stored = MiniBenchTaskPool(attrs.evolve(taskpool.config, adapt_order="sorted")).unlabelled_batches("chatter_topic")
    assert [len(b["input_ids"]) for b in stored] == [16] * 5  # 80 test texts, adapt_batch_size 16
    assert torch.equal(torch.cat([b["attention_mask"].sum(1) for b in stored]), (ids != 0).sum(1))  # stored order
    key = [tuple(map(tuple, b["input_ids"].tolist())) for b in shuffled]
    assert sorted(key) == sorted(tuple(map(tuple, b["input_ids"].tolist())) for b in stored)  # the same batches
    assert key != [tuple(map(tuple, b["input_ids"].tolist())) for b in stored]  # in another order
    again = MiniBenchTaskPool(taskpool.config).unlabelled_batches("chatter_topic")
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(shuffled, again, strict=True))  # deterministic
    assert sorted(len(b["input_ids"]) for b in taskpool.unlabelled_batches("chatter_topic", batch_size=64)) == [16, 64]


def test_build_records_the_recipe_and_the_splits(small):
    pool, _ = small
    built = pool.built()
    meta = built.meta
    assert built.folder.name == recipe_hash(recipe_of(pool.config))
    assert meta["recipe"]["tasks"] == list(SMALL["tasks"]) and meta["recipe"]["seed"] == 0
    for task in SMALL["tasks"]:
        sizes = meta["tasks"][task]["split_sizes"]
        assert abs(sizes["train"] - 120) <= 6 and abs(sizes["val"] - 40) <= 6 and abs(sizes["test"] - 80) <= 6
        assert len(meta["finetune"][task]["val_curve"]) == SMALL["epochs"] + 1
        assert all(len(templates) == 3 for templates in meta["tasks"][task]["prompts"])
        assert 3 <= meta["tasks"][task]["mean_tokens"]["test"] <= 16
    assert meta["bert_config"]["num_hidden_layers"] == 1 and meta["bert_config"]["hidden_size"] == 384
    assert cache.check(built.folder) is None


def test_model_pool_serves_encoders_readers_and_data(small):
    import torch
    from fusion_minibench.model import FROZEN
    from transformers import BertModel

    pool, _ = small
    assert pool.model_names == ["chatter_topic", "language_id"] and pool.has_base
    base = pool.load_model(None)
    expert = pool.load_model("language_id")
    assert isinstance(base, BertModel) and base.pooler is None and len(base.encoder.layer) == 1
    keys = set(base.state_dict())
    assert keys == set(expert.state_dict()) and FROZEN[0] in keys and "encoder.layer.0.attention.self.query.weight" in keys
    assert not any(k.startswith("pooler") for k in keys)
    reader = pool.reader("language_id")
    assert sorted(reader.keys()) == sorted(expert.state_dict())
    key = "encoder.layer.0.output.dense.weight"
    assert torch.equal(reader.get(key), expert.state_dict()[key])
    # the frozen embedding tables never move; an expert moved iff some epoch beat the base on val
    for task in pool.model_names:
        state = pool.load_model(task).state_dict()
        assert all(torch.equal(base.state_dict()[k], state[k]) for k in FROZEN)
        moved = not torch.equal(base.state_dict()[key], state[key])
        assert moved == (pool.built().meta["finetune"][task]["best_epoch"] > 0)
    assert pool.built().meta["finetune"]["language_id"]["best_epoch"] > 0
    batches = pool.data("chatter_topic", "train")
    seen = list(batches)
    assert (
        len(seen) == len(batches)
        and sum(len(y) for _, y in seen) == pool.built().meta["tasks"]["chatter_topic"]["split_sizes"]["train"]
    )
    inputs, labels = seen[0]
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape and ids.shape[0] == labels.shape[0] == 32
    assert int(labels.max()) < 6 and bool((ids[:, 0] == 101).all())  # [CLS] first
    assert torch.equal(mask.bool(), ids != 0) and bool(mask[:, -1].any())  # trimmed to the longest text
    features = base(**inputs)
    assert features.shape == (32, 384) and torch.allclose(features.norm(dim=-1), torch.ones(32), atol=1e-5)
    with pytest.raises(InputError, match="unknown split"):
        pool.data("chatter_topic", "dev")
    with pytest.raises(InputError, match="did you mean 'language_id'"):
        pool.load_model("languag_id")


def test_pretrained_encoder_is_minilm_sentence_embedding(small):
    """Mean pooling over the mask, normalised: padding a text further does not change its feature."""
    import torch
    import torch.nn.functional as F

    pool, _ = small
    base = pool.load_model(None)
    inputs = next(iter(pool.data("language_id", "test", batch_size=4)))[0]
    padded = {k: F.pad(v, (0, 5)) for k, v in inputs.items()}
    with torch.no_grad():
        last = super(type(base), base).forward(**inputs).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).float()
        expected = F.normalize((last * mask).sum(1) / mask.sum(1), dim=-1)
        assert torch.allclose(base(**inputs), expected, atol=1e-6)
        assert torch.allclose(base(**padded), expected, atol=1e-5)


def test_task_pool_evaluates_through_the_fixed_heads(small):
    import torch
    import torch.nn.functional as F

    pool, taskpool = small
    assert taskpool.task_names == ["chatter_topic", "language_id"]
    base = pool.load_model(None)
    result = taskpool.evaluate(base)
    assert set(result) == {"chatter_topic", "language_id"}
    for task, metrics in result.items():
        assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["loss"] > 0
        # same numbers by hand: the whole test split at once → encoder → head
        ids, labels = pool.built().split(task, "test")
        with torch.no_grad():
            logits = taskpool.head(task)(base(input_ids=ids, attention_mask=(ids != 0).long()))
        assert metrics["accuracy"] == pytest.approx(float((logits.argmax(-1) == labels).float().mean()), abs=1.5 / len(labels))
        assert metrics["loss"] == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-4)
    assert taskpool.evaluate(base, tasks=["language_id"]) == {"language_id": result["language_id"]}
    assert taskpool.evaluate(base.state_dict()) == result  # a state dict is accepted too
    # the expert was kept at its best validation epoch, so it is no worse than the base there
    for task in taskpool.task_names:
        expert = pool.load_model(task)
        val_expert = taskpool.evaluate(expert, tasks=[task], split="val")[task]["accuracy"]
        val_base = taskpool.evaluate(base, tasks=[task], split="val")[task]["accuracy"]
        assert val_expert >= val_base
        assert val_expert == pytest.approx(pool.built().meta["finetune"][task]["best_val_accuracy"], abs=1e-4)


def test_merged_state_dict_becomes_an_encoder(small):
    import torch

    pool, taskpool = small
    experts = [pool.reader(name) for name in pool.model_names]
    average = {k: sum(r.get(k) for r in experts) / len(experts) for k in experts[0].keys()}
    merged = pool.model_from_state_dict(average)
    key, other = "encoder.layer.0.intermediate.dense.weight", "encoder.layer.0.output.dense.bias"
    assert torch.equal(merged.state_dict()[key], average[key])
    partial = pool.model_from_state_dict({other: average[other]})  # the rest comes from the base
    assert torch.equal(partial.state_dict()[key], pool.load_model(None).state_dict()[key])
    scores = taskpool.evaluate(merged)
    assert all(0 <= m["accuracy"] <= 1 and math.isfinite(m["loss"]) for m in scores.values())
    with pytest.raises(InputError, match="lacks: extra"):
        pool.model_from_state_dict({"extra": torch.zeros(1)})
    with pytest.raises(InputError, match="shape"):
        pool.model_from_state_dict({other: torch.zeros(3)})


def test_build_is_deterministic_and_pools_must_agree(small, tmp_path):
    pool, taskpool = small
    again = MiniBenchModelPool(attrs.evolve(pool.config, cache_dir=str(tmp_path)))
    first = json.loads((pool.built().folder / "manifest.json").read_text())
    second = json.loads((again.built().folder / "manifest.json").read_text())
    for name in first:
        if name.endswith(".safetensors"):
            assert first[name]["sha256"] == second[name]["sha256"], name
    other = MiniBenchModelPool(attrs.evolve(pool.config, cache_dir=str(tmp_path), seed=1))
    with pytest.raises(InputError, match="same recipe fields"):
        taskpool.evaluate(other.load_model(None))


def test_plugin_registers_pools_and_the_mini_benchmark():
    pools, taskpools, benches = [], [], []
    plugin.fusion_register_model_pools(pools.append)
    plugin.fusion_register_task_pools(taskpools.append)
    plugin.fusion_register_benchmarks(lambda name, **kw: benches.append((name, kw)))
    assert pools[0] is MiniBenchModelPool and taskpools[0] is MiniBenchTaskPool  # then mini-backdoor's (test_minibench_backdoor)
    (name, spec), *_ = benches
    assert name == "mini" and spec["modelpool"] == {"name": "minibench"} and spec["taskpool"] == {"name": "minibench"}
    assert spec["methods"][0] == {"name": "ties"}
    assert {m["name"] for m in spec["methods"]} >= {"ties", "simple_average", "task_arithmetic"}


def test_plugin_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, fusion_minibench.plugin; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_data_first_read_in_inference_mode_still_trains(small):
    """A data-driven method after an evaluation: cached splits and heads must not be inference tensors."""
    import torch
    from fusion_minibench.store import Built

    pool, taskpool = small
    fresh = Built(pool.built().folder)
    with torch.inference_mode():
        ids, labels = fresh.split(pool.model_names[0], "train")
        head = fresh.head(pool.model_names[0])
    assert not fresh._data[f"{pool.model_names[0]}/train/ids"].is_inference()
    assert not any(t.is_inference() for t in fresh._heads.values())
    encoder = pool.load_model(None)
    loss = torch.nn.functional.cross_entropy(fresh.head(pool.model_names[0])(encoder(ids[:8])), labels[:8])
    loss.backward()
    assert any(p.grad is not None for p in encoder.parameters())
    assert head is not None


def _run_config(small, **settings):
    pool, _ = small
    fields = {**{k: list(v) if isinstance(v, tuple) else v for k, v in SMALL.items()}, "cache_dir": pool.config.cache_dir}
    return {"method": "simple_average", "modelpool": {"name": "minibench", **fields},
            "taskpool": {"name": "minibench", **fields}, "progress": False, **settings}


def test_fuse_run_on_the_small_recipe_matches_a_direct_evaluation(small, tmp_path):
    import torch

    import fusion_core

    pool, taskpool = small
    report = fusion_core.run(_run_config(small, output_dir=str(tmp_path / "out")))
    states = [pool.load_model(name).state_dict() for name in pool.model_names]
    average = {key: torch.stack([s[key] for s in states]).mean(0) for key in states[0]}
    expected = taskpool.evaluate(pool.model_from_state_dict(average))
    for task, metrics in expected.items():
        assert report["results"]["merged"][task] == pytest.approx(metrics, abs=1e-6)
    assert report["results"]["pretrained"] == taskpool.evaluate(pool.load_model(None))
    assert report["results"]["individual"] == {n: taskpool.evaluate(pool.load_model(n), tasks=[n])[n] for n in pool.model_names}
    assert set(report["timings"]) >= {"prepare", "method", "evaluate"}


def test_materialize_follows_the_run_progress_setting(small, monkeypatch):
    from fusion_core.run_context import RunContext

    pool, _ = small
    seen = []
    real = cache.ensure_built

    def spy(recipe, cache_dir=None, *, show_progress=True, builder=None):
        seen.append(show_progress)
        return real(recipe, cache_dir, show_progress=show_progress)

    monkeypatch.setattr(cache, "ensure_built", spy)
    loud = MiniBenchModelPool(attrs.evolve(pool.config, progress=True))
    loud.materialize(RunContext(show_progress=False))
    loud.materialize(RunContext(show_progress=True))
    assert seen == [False, True]


def test_pools_built_from_different_recipes_are_refused_before_any_build(tmp_path):
    from fusion_core.errors import ConfigError

    pool = MiniBenchModelPool(MiniBenchConfig(cache_dir=str(tmp_path), seed=1, n_train=500))
    taskpool = MiniBenchTaskPool(MiniBenchTaskPoolConfig(cache_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"different mini-benchmark recipes \(seed, n_train\); give both the same fields, "
                                          r"e.g. taskpool.seed=1 taskpool.n_train=500$"):
        taskpool.check_pool(pool)
    MiniBenchTaskPool(MiniBenchTaskPoolConfig(cache_dir=str(tmp_path), seed=1, n_train=500, split="val")).check_pool(pool)
    assert not any(tmp_path.iterdir())  # nothing was built
