"""Bad inputs: missing splits, missing labels, missing base or task pool, unknown tasks — one clear line each."""

from __future__ import annotations

import pytest
from adaptive_fixtures import MemoryPool
from fusion_adaptive.adamerging import AdaMerging
from fusion_adaptive.fisher import FisherMerging
from fusion_adaptive.regmean import RegMean, RegMeanPlusPlus
from fusion_adaptive.smile import Smile
from fusion_adaptive.wemoe import WEMoE

from fusion_core.errors import InputError
from fusion_core.run_context import RunContext


@pytest.mark.parametrize("method", [FisherMerging(), RegMean(), RegMeanPlusPlus()], ids=lambda m: m.name)
def test_data_driven_method_on_a_pool_without_data_names_the_missing_split(world, method):
    pool = world.pool(with_data=False)
    with pytest.raises(InputError, match=rf"method '{method.name}' needs the 'train' split of model 'alpha', but model pool 'test_memory' gives no 'train' data"):
        method.run(pool, world.ctx())
    assert pool.loads == 0  # failed before loading any model


def test_a_split_other_than_train_is_named(world):
    with pytest.raises(InputError, match=r"needs the 'val' split of model 'alpha'"):
        RegMean(RegMean.Config(split="val")).run(world.pool(), world.ctx())


def test_empirical_fisher_without_labels_says_labels_are_missing(world):
    pool = MemoryPool(world.base, world.models, world.data(labelled=False))
    with pytest.raises(InputError, match=r"'fisher_merging' needs labelled batches, but the 'train' data of model 'alpha' gives a Tensor"):
        FisherMerging(FisherMerging.Config(estimator="empirical")).run(pool, world.ctx())


def test_fusionbench_fisher_needs_no_labels(world):
    pool = MemoryPool(world.base, world.models, world.data(labelled=False))
    out = FisherMerging(FisherMerging.Config(num_examples=64)).run(pool, world.ctx(world.taskpool()))
    assert set(out) == set(world.base.state_dict())


def test_regmean_does_not_need_labels(world):
    pool = MemoryPool(world.base, world.models, world.data(labelled=False))
    out = RegMean().run(pool, world.ctx())
    assert set(out) == set(world.base.state_dict())


@pytest.mark.parametrize("method", [AdaMerging(), WEMoE()], ids=lambda m: m.name)
def test_test_time_adaptation_needs_a_task_pool_with_unlabelled_batches(world, method):
    with pytest.raises(InputError, match=rf"method '{method.name}' adapts on unlabelled test batches of each task, but the run has no task pool"):
        method.run(world.pool(), RunContext(show_progress=False))
    with pytest.raises(InputError, match=r"needs the unlabelled 'test' split of task 'alpha', but task pool 'test_tasks' gives none"):
        method.run(world.pool(), world.ctx(world.taskpool(unlabelled=False)))


def test_a_model_without_a_matching_task_is_named(world):
    pool = MemoryPool(world.base, {"alpa": world.models["alpha"]})
    with pytest.raises(InputError, match=r"needs test batches of task 'alpa' .* has no such task \(did you mean 'alpha'\?\)"):
        AdaMerging().run(pool, world.ctx())


@pytest.mark.parametrize("method", [AdaMerging(), WEMoE(), Smile()], ids=lambda m: m.name)
def test_methods_that_need_a_base_refuse_a_pool_without_one(method):
    with pytest.raises(InputError, match=rf"method '{method.name}' needs a base \(pretrained\) model"):
        method.check_inputs(2, False)


def test_models_of_another_architecture_are_refused(world):
    from adaptive_fixtures import Encoder

    other = Encoder(hidden=5)
    pool = MemoryPool(world.base, {"alpha": world.models["alpha"], "beta": other})
    with pytest.raises(InputError, match=r"'fc1.weight' of model 'beta' has shape \[5, 8\], the base's \[16, 8\]"):
        AdaMerging(AdaMerging.Config(steps=1)).run(pool, world.ctx())
