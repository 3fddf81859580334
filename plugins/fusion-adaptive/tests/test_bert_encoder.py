"""The data-driven methods on a BERT encoder (the architecture of the ``mini`` benchmark), tiny and built from a config."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from bert_fixtures import FROZEN, BertWorld  # noqa: E402
from fusion_adaptive.adamerging import AdaMerging  # noqa: E402
from fusion_adaptive.common import adaptation_tasks, split_batch  # noqa: E402
from fusion_adaptive.ewemoe import EWEMoE  # noqa: E402
from fusion_adaptive.fisher import FisherMerging  # noqa: E402
from fusion_adaptive.layers import WeightEnsemblingMoE  # noqa: E402
from fusion_adaptive.regmean import RegMean, RegMeanPlusPlus  # noqa: E402
from fusion_adaptive.wemoe import WEMoE  # noqa: E402

from fusion_core.config import make_config  # noqa: E402


@pytest.fixture(scope="module")
def bert() -> BertWorld:
    torch.set_num_threads(1)
    return BertWorld()


def logits(world, model, task):
    with torch.no_grad():
        return world.tasks[task]["head"](model(world.tasks[task]["test"][0]))


def encoder_with(world, state):
    model = type(world.base)().eval()
    model.load_state_dict(state)
    return model


def test_adamerging_at_zero_steps_is_task_arithmetic_and_stacks_no_frozen_tensor(bert):
    ctx = bert.ctx()
    out = AdaMerging(AdaMerging.Config(steps=0, init=0.3)).run(bert.pool(), ctx)
    expected = bert.task_arithmetic(0.3)
    for key, value in expected.items():
        torch.testing.assert_close(out[key], value)
    # the experts froze the word embeddings: that tensor is the base's and is not stacked
    assert ctx.extras["adamerging"]["tensors_unchanged"] == len(FROZEN)
    torch.testing.assert_close(out[FROZEN[0]], bert.base.state_dict()[FROZEN[0]], rtol=0, atol=0)


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_adamerging_adapts_on_bert(bert, granularity):
    ctx = bert.ctx()
    AdaMerging(AdaMerging.Config(steps=8, lr=0.05, granularity=granularity)).run(bert.pool(), ctx)
    info = ctx.extras["adamerging"]
    assert info["steps"] == 8 and info["loss_min"] < info["loss_first"]
    assert 0 < info["seconds_per_step"] < 10  # the median step time, which `fuse show` durations are measured from


@pytest.mark.parametrize("cls", [WEMoE, EWEMoE], ids=["wemoe", "e_wemoe"])
@pytest.mark.parametrize("batch_reduce", [True, False])
def test_wemoe_upscales_each_bert_block_feed_forward_routed_once_and_starts_at_task_arithmetic(bert, cls, batch_reduce):
    fields = {"steps": 0, "init_lambda": 0.3, "router_init": "zero_last", "batch_reduce": batch_reduce,
              **({"sparsity": 0.0} if cls is EWEMoE else {})}
    ctx = bert.ctx()
    model = cls(make_config(cls.Config, fields)).run(bert.pool(), ctx)
    info = ctx.extras[cls.name]
    blocks = [f"bert.encoder.layer.{i}" for i in range(2)]
    assert info["upscaled"] == [f"{b}.{m}" for b in blocks for m in ("intermediate.dense", "output.dense")]
    assert info["routed_with"] == {f"{b}.output.dense": f"{b}.intermediate.dense" for b in blocks}
    if cls is EWEMoE:  # one router, shared by both blocks: every leader takes the hidden width
        assert info["routers"] == 1
    ta = encoder_with(bert, bert.task_arithmetic(0.3))
    for task in bert.tasks:
        torch.testing.assert_close(logits(bert, model, task), logits(bert, ta, task), rtol=1e-5, atol=1e-5)


def test_the_second_feed_forward_layer_uses_the_first_ones_routing_weights(bert):
    model = WEMoE(WEMoE.Config(steps=0, batch_reduce=True)).run(bert.pool(), bert.ctx())  # routers ~ N(0, 0.01²): input-dependent
    follower = model.get_submodule("bert.encoder.layer.1.output.dense")
    leader = model.get_submodule("bert.encoder.layer.1.intermediate.dense")
    assert isinstance(follower, WeightEnsemblingMoE) and follower.router is None and follower.shared is leader.shared
    seen = {}
    handle = follower.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    try:
        with torch.no_grad():
            model(bert.tasks["beta"]["test"][0][:7])
    finally:
        handle.remove()
    weights = leader.shared.weights.mean(dim=0)  # the batch's one weight vector, from the leader's input
    w = follower.base.weight + torch.tensordot(weights, follower.expert("weight"), dims=1)
    b = follower.base.bias + torch.tensordot(weights, follower.expert("bias"), dims=1)
    torch.testing.assert_close(seen["y"], torch.nn.functional.linear(seen["x"], w, b))
    assert not torch.allclose(weights, torch.full_like(weights, 0.3))


@pytest.mark.parametrize("cls", [RegMean, RegMeanPlusPlus, FisherMerging])
def test_merging_one_bert_model_gives_it_back(bert, cls):
    from adaptive_fixtures import MemoryPool

    pool = bert.pool()
    one = MemoryPool(bert.base, {"beta": bert.models["beta"]}, {("beta", "train"): pool.data("beta", "train")})
    ctx = bert.ctx()
    out = cls(cls.Config()).run(one, ctx)
    for key, value in bert.models["beta"].state_dict().items():
        torch.testing.assert_close(out[key], value, rtol=1e-4, atol=1e-5)
    if cls is RegMeanPlusPlus:
        assert ctx.extras["regmean_plusplus"]["blocks"] == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
        assert ctx.extras["regmean_plusplus"]["layers_solved"] == 12  # q, k, v, attention out, intermediate, output × 2


def test_adaptation_batches_are_cut_to_the_batch_size(bert):
    ids = torch.arange(40).reshape(20, 2)
    parts = split_batch({"input_ids": ids, "mask": ids > 3, "note": "x"}, 8)
    assert [p["input_ids"].shape[0] for p in parts] == [8, 8, 4] and parts[2]["note"] == "x"
    torch.testing.assert_close(torch.cat([p["mask"] for p in parts]), ids > 3)
    assert split_batch(ids, 32) == [ids]
    tasks = adaptation_tasks(bert.pool(), bert.taskpool(), method="t", device="cpu", batch_size=5)
    sizes = [tasks[0].next_inputs().shape[0] for _ in range(12)]  # 48 test inputs, the task pool's batches of 32
    assert sizes == [5] * 6 + [2] + [5] * 3 + [1, 5]
