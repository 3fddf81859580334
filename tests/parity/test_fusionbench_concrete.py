"""Parity of the Concrete subspace and backdoor-safe methods with FusionBench 0.2.33's own classes.

The tiny CLIP world of ``fusionbench_kit`` (3 tasks, 2 blocks, 32×32 images), the same batches on both
sides.  The Concrete masks are random: FusionBench draws them from torch's global generator, fusion
from a generator seeded with ``tensor_seed(seed, method, "mask")``; seeding the global generator
with that number before FusionBench runs aligns the draws (same shapes, same order), so the results
are compared to 1e-5.  FusionBench's safe/defense classes hard-code a 3×224×224 perturbation;
it is resized to the world's 3×32×32 images (the only change).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("fusion_bench")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))
from fusionbench_kit import World, fabric, max_diff  # noqa: E402

TOL = 1e-5
PEER = "fusionbench"


@pytest.fixture(scope="module")
def world():
    torch.set_num_threads(1)
    return World()


def fb_concrete(world: World, cls, steps: int, **fields):
    from omegaconf import DictConfig

    config = DictConfig({"name": "concrete", "batch_size": world.batch, "num_workers": 0, "merge_dtype": None, "optimizer": "adam",
                         "lr": 1e-3, "base_lr": 1, "adamerging_lr": 1e-3, "scaling_factor": 0.3, "max_steps": steps,
                         "max_adamerging_steps": steps, "save_interval": 10_000, "initial_logits": 0, "temperature": 0.5,
                         "eval_mask_type": "continuous", "mask_checkpoint": None, "clamp_weights": False, "tie_weights": True,
                         "strict": False, "skip_training": False, "cache_dir": "outputs", "fast_dev_run": False, "devices": 1,
                         **fields})
    algorithm = cls(config)
    algorithm._fabric_instance = fabric()
    algorithm.log_hyperparams = lambda *a, **k: None
    world.fb_heads(algorithm)
    algorithm.get_shuffled_test_loader_iter = world.fb_test_iterators()
    setup = algorithm.setup_models

    def setup_with_small_perturbation():  # the peer's perturbation is 3×224×224 whatever the images
        out = setup()
        holder = getattr(algorithm, "pertubed_model", None)
        if holder is not None:
            shape = world.images[world.tasks[0]][0].shape[1:]
            holder.perturbed_input = torch.nn.Parameter(torch.zeros(len(world.tasks), *shape), requires_grad=True)
        return out

    algorithm.setup_models = setup_with_small_perturbation
    return algorithm


def seed_peer(name: str, seed: int = 0) -> None:
    from fusion_core import tensor_seed

    torch.manual_seed(tensor_seed(seed, name, "mask"))


def k_bias_noise(got: dict) -> list[str]:
    """The attention key biases: their true gradient is 0 and Adam turns round-off into ±lr steps (as in the AdaMerging rows)."""
    return [k for k in got if k.endswith("k_proj.bias")]


def test_concrete_task_arithmetic_matches_fusionbench(world, parity_row):
    from fusion_adaptive.concrete import ConcreteTaskArithmetic
    from fusion_bench.method.concrete_subspace import ConcreteTaskArithmeticAlgorithmForCLIP

    steps = 3
    seed_peer("concrete_task_arithmetic")
    expected = fb_concrete(world, ConcreteTaskArithmeticAlgorithmForCLIP, steps).run(world.fb_pool()).state_dict()
    got = ConcreteTaskArithmetic(ConcreteTaskArithmetic.Config(steps=steps)).run(world.pool(with_data=False), world.ctx())
    noise = k_bias_noise(got)
    diff = max_diff(expected, {k: v for k, v in got.items() if k not in noise})
    parity_row("concrete_task_arithmetic", PEER, f"fusionbench (default), {steps} steps, draws aligned", diff,
               f"{len(noise)} k_proj biases left out: zero true gradient, Adam amplifies round-off")
    assert diff <= TOL


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_concrete_adamerging_matches_fusionbench(world, granularity, parity_row):
    from fusion_adaptive.concrete import ConcreteAdaMerging
    from fusion_bench.method.concrete_subspace import ConcreteLayerWiseAdaMergingForCLIP, ConcreteTaskWiseAdaMergingForCLIP

    steps = 3
    cls = ConcreteTaskWiseAdaMergingForCLIP if granularity == "task" else ConcreteLayerWiseAdaMergingForCLIP
    seed_peer("concrete_adamerging")
    expected = fb_concrete(world, cls, steps).run(world.fb_pool()).state_dict()
    got = ConcreteAdaMerging(ConcreteAdaMerging.Config(steps=steps, adamerging_steps=steps, granularity=granularity)).run(
        world.pool(with_data=False), world.ctx())
    noise = k_bias_noise(got)
    diff = max_diff(expected, {k: v for k, v in got.items() if k not in noise})
    parity_row(f"concrete_adamerging ({granularity}-wise)", PEER, f"fusionbench (default), {steps}+{steps} steps, draws aligned", diff,
               f"{len(noise)} k_proj biases left out: zero true gradient, Adam amplifies round-off")
    assert diff <= TOL


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_safe_concrete_adamerging_matches_fusionbench(world, granularity, parity_row, monkeypatch):
    """FusionBench 0.2.33's layer-wise safe class reads an undefined name ``config`` in ``setup_models`` (NameError) and
    passes ``layer_vector_dtype`` to ``LayerWiseMergedModel``, which has no such argument (TypeError); the row records it,
    and the comparison gives that name the algorithm's own config and drops the argument (``merge_dtype`` is None)."""
    from fusion_adaptive.safe import SafeConcreteAdaMerging
    from fusion_bench.method.concrete_subspace import (
        ConcreteSafeLayerWiseAdaMergingForCLIP,
        ConcreteSafeTaskWiseAdaMergingForCLIP,
    )
    from fusion_bench.method.concrete_subspace import clip_safe_concrete_adamerging as peer_module

    steps = 3
    cls = ConcreteSafeTaskWiseAdaMergingForCLIP if granularity == "task" else ConcreteSafeLayerWiseAdaMergingForCLIP
    fields = {"adv_lr": 1e-4, "trigger_norm": 1000, "adv_weight": 0.1}
    defect = ""
    probe = fb_concrete(world, cls, 0, **fields)
    probe.modelpool = world.fb_pool()
    try:
        probe.setup_models()
    except NameError as exc:
        defect = f"unpatched peer fails: NameError: {exc}; then passes layer_vector_dtype, which LayerWiseMergedModel refuses; "
        monkeypatch.setattr(peer_module, "config", fb_concrete(world, cls, steps, **fields).config, raising=False)
        merged_model = peer_module.LayerWiseMergedModel

        def without_dtype(*args, layer_vector_dtype=None, **kwargs):  # merge_dtype is None: the argument would do nothing
            return merged_model(*args, **kwargs)

        monkeypatch.setattr(peer_module, "LayerWiseMergedModel", without_dtype)
    seed_peer("safe_concrete_adamerging")
    expected = fb_concrete(world, cls, steps, **fields).run(world.fb_pool()).state_dict()
    got = SafeConcreteAdaMerging(SafeConcreteAdaMerging.Config(steps=steps, adamerging_steps=steps, granularity=granularity)).run(
        world.pool(with_data=False), world.ctx())
    noise = k_bias_noise(got)
    diff = max_diff(expected, {k: v for k, v in got.items() if k not in noise})
    parity_row(f"safe_concrete_adamerging ({granularity}-wise)", PEER,
               f"fusionbench (default), {steps}+{steps} steps, draws aligned", diff,
               f"{defect}peer's 3×224×224 perturbation resized to the 3×32×32 images; {len(noise)} k_proj biases left out")
    assert diff <= TOL


def fb_defense_pool(world: World):
    """FusionBench's post-defense pool: the pretrained tower and the merged one ("merge": task arithmetic, λ 0.3)."""
    import copy
    import types

    from fusion_adaptive.concrete import masked_merge
    from fusion_bench.modelpool import BaseModelPool
    from fusionbench_kit import V4Layout

    base = dict(world.base.named_parameters())
    stacked = {k: torch.stack([dict(world.models[t].named_parameters())[k].detach() - v.detach() for t in world.tasks]) for k, v in base.items()}
    merged_params = masked_merge({k: v.detach() for k, v in base.items()}, stacked, torch.full((len(world.tasks), 1), 0.3), None)
    merged = copy.deepcopy(world.base)
    merged.load_state_dict(merged_params, strict=False)
    class WithDevice(V4Layout):  # SAU reads merge_model.device, as a transformers model has
        @property
        def device(self):
            return next(self.parameters()).device

    pool = BaseModelPool({"_pretrained_": V4Layout(world.base), "merge": WithDevice(merged)})
    pool._config = types.SimpleNamespace(tta_datasets=[{"name": t} for t in world.tasks])
    type(pool).config = property(lambda self: self._config)
    pool.get_train_dataset_config = lambda task: {"dataset": types.SimpleNamespace(name=task)}
    load = pool.load_model
    pool.load_model = lambda name, *a, **k: copy.deepcopy(load(name, *a, **k))
    return pool


@pytest.mark.parametrize(("name", "adv_lr"), [("awm", 1e-4), ("sau", 1e-4), ("awm", 0.5), ("sau", 0.5)])
def test_post_merge_defenses_match_fusionbench(world, name, adv_lr, parity_row, monkeypatch):
    """FusionBench's AWM/SAU take the merged model from the pool ("merge"); fusion's merge task arithmetic (λ 0.3) itself:
    the peer is given that merge.  SAU reads each task's class names only to count them: the count is given."""
    from fusion_adaptive.safe import AWM, SAU
    from fusion_bench.method.concrete_subspace import PostDefenseAWMAlgorithmForCLIP, PostDefenseSAUAlgorithmForCLIP
    from fusion_bench.method.concrete_subspace import clip_post_defense as peer_module

    steps = 3
    monkeypatch.setattr(peer_module, "get_classnames_and_templates", lambda task: ([None] * world.text[task].shape[0], []))
    cls, ours = (PostDefenseAWMAlgorithmForCLIP, AWM) if name == "awm" else (PostDefenseSAUAlgorithmForCLIP, SAU)
    fields = {"adv_lr": adv_lr, "trigger_norm": 1000, "adv_weight": 0.01, "shared_weight": 0.01, "beta1": 0.5, "beta2": 0.5}
    pool = fb_defense_pool(world)
    seed_peer(name)
    expected = fb_concrete(world, cls, steps, **fields).run(pool).state_dict()
    ctx = world.ctx()
    got = ours(ours.Config(steps=steps, adv_lr=adv_lr)).run(world.pool(with_data=False), ctx)
    noise = k_bias_noise(got)
    diff = max_diff(expected, {k: v for k, v in got.items() if k not in noise})
    setting = "default" if adv_lr == 1e-4 else f"adv_lr {adv_lr}: attacks succeed" + (", shared terms active" if name == "sau" else "")
    parity_row(name, PEER, f"fusionbench ({setting}), {steps} steps, draws aligned, peer given the task-arithmetic merge (λ 0.3)", diff,
               f"peer's 3×224×224 perturbation resized to the 3×32×32 images; {len(noise)} k_proj biases left out")
    assert diff <= TOL
    if name == "sau" and adv_lr > 1e-3:
        assert ctx.extras["sau"]["shared_attack_samples"] > 0
