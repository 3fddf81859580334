"""Parity of the continual-merging methods (DOP, continual TA / TIES / weight average) with FusionBench 0.2.33's classes.

The tiny CLIP world of ``fusionbench_kit``; FusionBench's classes are run in the pool order
(their shuffle is unseeded Python ``random``) with saving and per-step evaluation off, the
program's task pool replaced by an empty stand-in (they read its private ``_test_datasets``).
FusionBench's ``method.opcm`` / ``method.dop`` modules import ``CLIPVisionTransformer``, gone in
transformers 5: the name is aliased before the import, as for OPCM.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

pytest.importorskip("fusion_bench")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))
from fusionbench_kit import World, fabric, max_diff  # noqa: E402

TOL = 1e-5
PEER = "fusionbench"
NOTE = "pool order (the peer's shuffle is unseeded); peer imports CLIPVisionTransformer (gone in transformers 5): aliased"


@pytest.fixture(scope="module")
def world():
    torch.set_num_threads(1)
    return World()


@pytest.fixture
def clip_alias(monkeypatch):
    from transformers import CLIPVisionModel
    from transformers.models.clip import modeling_clip

    if not hasattr(modeling_clip, "CLIPVisionTransformer"):
        monkeypatch.setattr(modeling_clip, "CLIPVisionTransformer", CLIPVisionModel, raising=False)


def run_peer(algorithm, world) -> dict:
    algorithm._program = types.SimpleNamespace(taskpool=types.SimpleNamespace(_test_datasets={}))
    algorithm._fabric_instance = fabric()
    return algorithm.run(world.fb_pool()).state_dict()


def run_ours(cls, world, **config) -> dict:
    from fusion_core.config import make_config

    return cls(make_config(cls.Config, {"shuffle": False, "evaluate_every_step": False, **config})).run(world.pool(with_data=False), world.ctx())


@pytest.mark.parametrize("settings", [{}, {"mgda": False}, {"lr": 1e-3, "svd_proj_space": "u"}], ids=["default", "no-mgda", "u-lr1e-3"])
def test_dop_matches_fusionbench(world, clip_alias, parity_row, settings):
    from fusion_adaptive.dop import DOP
    from fusion_bench.method.dop.dop import ContinualDOPForCLIP

    fb = {"lr": 1e-4, "num_steps": 200, "mgda": True, "alpha": 0.8, "ema": True, "ema_beta": 0.999, "svd_epsilon": 0.99999,
          "svd_proj_space": "uv", **settings}
    algorithm = ContinualDOPForCLIP(seed=0, shuffle_order=False, save_on_every_step=False, evaluate_on_every_step=False, **fb)
    expected = run_peer(algorithm, world)
    got = run_ours(DOP, world, **settings)
    diff = max_diff(expected, got)
    label = ", ".join(f"{k}={v}" for k, v in settings.items()) or "defaults"
    parity_row("dop", PEER, f"fusionbench ({label}; non-leaf params at the base)", diff, NOTE)
    assert diff <= TOL


def test_continual_task_arithmetic_matches_fusionbench(world, clip_alias, parity_row):
    from fusion_adaptive.continual import ContinualTaskArithmetic
    from fusion_bench.method.opcm.task_arithmetic import ContinualTaskArithmeticForCLIP

    algorithm = ContinualTaskArithmeticForCLIP(scaling_factor=0.3, shuffle_order=False, seed=None, save_on_every_step=False,
                                               evaluate_on_every_step=False)
    diff = max_diff(run_peer(algorithm, world), run_ours(ContinualTaskArithmetic, world))
    parity_row("continual_task_arithmetic", PEER, "fusionbench (scaling_factor 0.3)", diff, NOTE)
    assert diff <= TOL


def test_continual_weight_average_matches_fusionbench(world, clip_alias, parity_row):
    from fusion_adaptive.continual import ContinualWeightAverage
    from fusion_bench.method.opcm.weight_average import ContinualWeightAverageForCLIP

    algorithm = ContinualWeightAverageForCLIP(shuffle_order=False, seed=None, save_on_every_step=False, evaluate_on_every_step=False)
    diff = max_diff(run_peer(algorithm, world), run_ours(ContinualWeightAverage, world))
    parity_row("continual_weight_average", PEER, "fusionbench", diff, NOTE)
    assert diff <= TOL


@pytest.mark.parametrize("merge_func", ["sum", "mean", "max"])
def test_continual_ties_matches_fusionbench(world, clip_alias, parity_row, merge_func):
    from fusion_adaptive.continual import ContinualTies
    from fusion_bench.method.opcm.ties_merging import ContinualTiesMergingForCLIP

    algorithm = ContinualTiesMergingForCLIP(scaling_factor=0.5, threshold=20, merge_func=merge_func, shuffle_order=False, seed=None,
                                            save_on_every_step=False, evaluate_on_every_step=False)
    diff = max_diff(run_peer(algorithm, world), run_ours(ContinualTies, world, merge_func=merge_func))
    parity_row("continual_ties", PEER, f"fusionbench (scaling_factor 0.5, threshold 20, merge_func {merge_func})", diff, NOTE)
    assert diff <= TOL
