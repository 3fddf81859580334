"""Issue 13's data-free and trust-region methods against FusionBench 0.2.33's own code: WUDI-Merging,
singular value calibration (SVC) around a base method, trust-region task arithmetic (TATR)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("fusion_bench")
sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: make the shared helpers importable
from parity_kit import FROZEN, max_abs_diff, ours, state, tiny_clip_vision, toy_models  # noqa: E402

PEER = "fusionbench"
TOL = 1e-5


def _task_vectors(base, experts) -> list[dict[str, torch.Tensor]]:
    b = state(base)
    return [{k: v - b[k] for k, v in state(m).items() if v.is_floating_point()} for m in experts]


def test_wudi_merging(parity_row):
    from fusion_bench.method.wudi.wudi import wudi_merging

    base, experts = tiny_clip_vision(3)
    got = ours("wudi", {}, base, experts)  # FusionBench's defaults: 400 Adam steps, lr 1e-5
    merged = wudi_merging(_task_vectors(base, experts), accelerator="cpu", iter_num=400)
    b = state(base)
    diff = max_abs_diff({k: b[k] + v.detach() for k, v in merged.items()}, got)
    parity_row("wudi", PEER, "fusionbench", diff,
               "wudi/wudi.py wudi_merging on a tiny CLIP vision tower (400 Adam steps, lr 1e-5; every 2-D tensor optimised)")
    assert diff <= TOL


def test_wudi_zero_task_vector_is_a_peer_defect(parity_row):
    from fusion_bench.method.wudi.wudi import wudi_merging

    base, experts = toy_models(3)
    got = ours("wudi", {"iter_num": 20}, base, experts)
    merged = wudi_merging(_task_vectors(base, experts), accelerator="cpu", iter_num=20)
    key = f"{FROZEN}.weight"
    assert torch.isnan(merged[key]).all()  # FusionBench divides ‖(τ − τ_i)τ_iᵀ‖² = 0 by ‖τ_i‖² = 0
    assert torch.equal(got[key], state(base)[key])  # here: no term, τ = Σ τ_i = 0
    b = state(base)
    rest = [k for k in merged if not k.startswith(FROZEN)]
    diff = max_abs_diff({k: b[k] + merged[k].detach() for k in rest}, got, keys=rest)
    assert diff <= TOL
    parity_row("wudi", PEER, "fusionbench (a frozen layer)", None,
               f"peer defect: a tensor every expert left unchanged (τ_i = 0) becomes NaN in wudi_merging (0/0 in the loss); "
               f"fusion keeps it at θ₀; the other tensors agree to {diff:.1e}")


def _fb_pool(base, experts):
    from parity_kit import fusionbench_pool

    return fusionbench_pool(base, experts)


def _our_pool(base, experts):
    from fusionbench_kit import Pool

    return Pool(base, {f"model_{i}": m for i, m in enumerate(experts)}, {})


@pytest.mark.parametrize("base_method", ["task_arithmetic", "simple_average"])
def test_svc(parity_row, base_method):
    from fusion_bench.method.singular_value_calibration.generic import SingularValueCalibrationWithBaseMethod
    from fusion_bench.method.singular_value_calibration.task_arithmetic import SingularValueCalibrationArithmeticTask
    from fusion_merging.svc import SingularValueCalibration

    from fusion_core.run_context import RunContext

    base, experts = tiny_clip_vision(3)
    if base_method == "task_arithmetic":  # FusionBench's svc task_arithmetic.yaml: λ 0.3, α 0.1
        peer = SingularValueCalibrationArithmeticTask(scaling_factor=0.3, alpha=0.1, accelerator="cpu")
    else:  # svc simple_average.yaml: the generic wrapper, α 0.1 (inplace off: this pool holds instances, not paths)
        peer = SingularValueCalibrationWithBaseMethod(
            base_method={"_target_": "fusion_bench.method.SimpleAverageAlgorithm", "inplace": False}, alpha=0.1, accelerator="cpu")
    expected = state(peer.run(_fb_pool(base, experts)))
    method = SingularValueCalibration(SingularValueCalibration.Config(base=base_method, alpha=0.1))
    got = method.run(_our_pool(base, experts), RunContext(show_progress=False))
    diff = max_abs_diff(expected, got)
    parity_row("svc", PEER, f"fusionbench (base {base_method})", diff,
               f"singular_value_calibration ({'SingularValueCalibrationArithmeticTask' if base_method == 'task_arithmetic' else 'generic wrapper'}, "
               "accelerated float64 path) on a tiny CLIP vision tower, α 0.1")
    assert diff <= TOL


def _fb_trust_region(zero_shot: bool, q: float = 0.9, scaling_factor=0.3):
    from fusion_bench.method.trust_region.clip_task_arithmetic import TaskArithmeticWithTrustRegionForCLIP

    return TaskArithmeticWithTrustRegionForCLIP(scaling_factor=scaling_factor, threshold_quantile=q, max_samples=128, batch_size=8,
                                                zero_shot=zero_shot)


def test_trust_region_lambda_list_is_a_peer_defect(parity_row):
    """FusionBench's list of λ deep-copies the pretrained model, then adds λ·masked Σ τ to the *pretrained model* instead of
    the copy: its model for λ_k is θ₀ + (λ_1 + … + λ_{k−1})·masked Σ τ.  That exact form is asserted against ours."""
    from fusion_adaptive.trust_region import TrustRegionTaskArithmetic
    from fusionbench_kit import World, max_diff

    world = World()
    lambdas = [0.3, 0.5, 0.7]
    peer = _fb_trust_region(True, scaling_factor=lambdas).run(world.fb_pool())
    assert list(peer) == lambdas
    shifted = [0.0, 0.3, 0.8]  # what the peer's model for each λ holds: the sum of the λ before it
    ours = TrustRegionTaskArithmetic(TrustRegionTaskArithmetic.Config(zero_shot=True, threshold_quantile=0.9,
                                                                      scaling_factor=shifted)).run(world.pool(with_data=False), world.ctx())
    defect = max(max_diff(state(peer[lam]), ours[f"{s:g}"]) for lam, s in zip(lambdas, shifted, strict=True))
    assert defect <= TOL
    right = TrustRegionTaskArithmetic(TrustRegionTaskArithmetic.Config(zero_shot=True, threshold_quantile=0.9,
                                                                     scaling_factor=lambdas)).run(world.pool(with_data=False), world.ctx())
    assert all(max_diff(state(peer[lam]), right[f"{lam:g}"]) > 1e-3 for lam in lambdas)
    single = max_diff(state(_fb_trust_region(True, scaling_factor=0.5).run(world.fb_pool())), right["0.5"])
    assert single <= TOL
    parity_row("trust_region_ta", PEER, "fusionbench (zero_shot, scaling_factor list)", None,
               "peer defect: for a list of λ it deep-copies the pretrained model and then adds λ·mask ⊙ Σ τ to the pretrained model, "
               f"not the copy, so its model for λ_k is θ₀ + (λ_1 + … + λ_(k−1))·mask ⊙ Σ τ (ours with those sums: {defect:.1e}); "
               f"fuse returns θ₀ + λ_k·mask ⊙ Σ τ, as FusionBench's single λ (λ 0.5: {single:.1e})")


def test_trust_region_zero_shot(parity_row):
    from fusion_adaptive.trust_region import TrustRegionTaskArithmetic
    from fusionbench_kit import World, max_diff

    world = World()
    expected = state(_fb_trust_region(True).run(world.fb_pool()))
    method = TrustRegionTaskArithmetic(TrustRegionTaskArithmetic.Config(zero_shot=True, threshold_quantile=0.9))
    got = method.run(world.pool(with_data=False), world.ctx())
    diff = max_diff(expected, got)
    parity_row("trust_region_ta", PEER, "fusionbench (zero_shot)", diff,
               "TaskArithmeticWithTrustRegionForCLIP(zero_shot=True), tiny CLIP world, λ 0.3, q 0.9 (global quantile over the tower)")
    assert diff <= TOL


def test_trust_region_gradients_are_a_peer_defect(parity_row):
    """FusionBench keys every task's mean |gradient| by the last parameter's name: Ω = 0, its merge is the pretrained model.
    Its estimator is still compared: the one entry it keeps is the last task's mean |gradient|."""
    from fusion_adaptive.trust_region import TrustRegionTaskArithmetic, mean_abs_gradients
    from fusionbench_kit import World, fabric, max_diff

    world = World()
    peer = _fb_trust_region(False)
    world.fb_heads(peer)
    peer._fabric_instance = fabric()
    pool = world.fb_pool()
    pool._train_datasets = {n: None for n in world.tasks}  # names only: load_train_dataset is replaced
    merged = state(peer.run(pool))
    assert max_diff(merged, state(world.base)) == 0.0  # the defect: nothing merged

    pool = world.fb_pool()
    pool._train_datasets = {n: None for n in world.tasks}  # names only: load_train_dataset is replaced
    peer.modelpool = pool
    estimates = peer.compute_avg_abs_grads(None)
    (only,) = estimates.values()
    last = world.tasks[-1]
    mine, count = mean_abs_gradients(world.pool().load_model(None), world.pool().data(last, "train"), world.head(last),
                                     pool=world.pool(), max_samples=128, device="cpu")
    assert count == world.batch * world.n_batches
    diff = max_diff({k: v for k, v in only.items()}, mine)
    assert diff <= TOL

    ours_merged = TrustRegionTaskArithmetic(TrustRegionTaskArithmetic.Config(threshold_quantile=0.9)).run(world.pool(), world.ctx())
    assert max_diff(ours_merged, state(world.base)) > 0
    parity_row("trust_region_ta", PEER, "fusionbench (gradients)", None,
               "peer defect: compute_avg_abs_grads stores every task's mean |gradient| under the last parameter's name, so Ω = 0 "
               f"and the merge returns the pretrained model; the mean |gradient| of the task it keeps agrees to {diff:.1e}")

    # the defect worked around: its own estimator run once per task (a pool naming that task alone), keyed by the task
    estimate = peer.compute_avg_abs_grads

    def per_task(pretrained_model):
        out = {}
        for task in world.tasks:
            peer.modelpool._train_datasets = {task: None}
            (out[task],) = estimate(pretrained_model).values()
        return out

    peer.compute_avg_abs_grads = per_task
    fixed = max_diff(state(peer.run(world.fb_pool())), ours_merged)
    parity_row("trust_region_ta", PEER, "fusionbench (gradients, peer's keying worked around)", fixed,
               "TaskArithmeticWithTrustRegionForCLIP(zero_shot=False), its compute_avg_abs_grads called once per task and keyed by "
               "the task; tiny CLIP world, λ 0.3, q 0.9, every training example (24 per task, one backward each)")
    assert fixed <= TOL


def test_emr_per_task_models(parity_row):
    """Each task's modulated model against FusionBench's EMRModulatedModel with that task's modulator applied."""
    from fusion_bench.method.emr_merging.emr_merging import EMRMerging
    from fusion_merging.emr import EmrMerging

    from fusion_core.run_context import RunContext

    base, experts = tiny_clip_vision(3)
    peer = EMRMerging().run(_fb_pool(base, experts))
    output = EmrMerging(EmrMerging.Config()).run(_our_pool(base, experts), RunContext(show_progress=False))
    worst = 0.0
    for i in range(len(experts)):
        task = f"model_{i}"
        peer.set_task(task)
        expected = {k: v.detach().clone() for k, v in peer.backbone.state_dict().items()}
        worst = max(worst, max_abs_diff(expected, output.model_for(task)))
    parity_row("emr_merging", PEER, "fusionbench (per-task modulated models)", worst,
               "EMRMerging → EMRModulatedModel.set_task(t) backbone vs fusion's model_for(t) = θ₀ + λ_t·M_t ⊙ τ_uni, tiny CLIP vision, 3 tasks")
    assert worst <= TOL


def _state_dict_task_arithmetic(pretrained_model, finetuned_models, scaling_factor, inplace=True):
    """θ + λ Σ (θ_c − θ) for modules or state dicts: what fw_hard's task_arithmetic_merge computes (its strict
    type check fails on a Parameter state dict against a plain one)."""
    from collections.abc import Mapping

    current = pretrained_model.state_dict()
    models = [m if isinstance(m, Mapping) else m.state_dict() for m in finetuned_models]
    with torch.no_grad():
        merged = {k: v + scaling_factor * sum(m[k] - v for m in models) if v.is_floating_point() and k in models[0] else v
                  for k, v in current.items()}
    pretrained_model.load_state_dict(merged)
    return pretrained_model


def _steady_key_bias(gradients: dict) -> dict:
    """``gradients`` with every attention key bias's gradient (0 but for rounding) set to the same constant."""
    return {k: torch.full_like(g, 1e-3) if k.endswith("k_proj.bias") else g for k, g in gradients.items()}


def _fb_frank_wolfe(peer, world, monkeypatch) -> dict:
    """FusionBench's Frank-Wolfe classes on the CPU with the world's heads; per task, the training examples one at a time."""
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    world.fb_heads(peer)
    peer.log_hyperparams = lambda *a, **k: None
    peer.on_frank_wolfe_iteration_start = lambda: None
    type(peer).is_debug_mode = property(lambda self: False)

    def singles(task):
        while True:
            for xs, ys in zip(world.images[task], world.labels[task], strict=True):
                for j in range(len(ys)):
                    yield xs[j : j + 1], ys[j : j + 1]

    return {t: singles(t) for t in world.tasks}


@pytest.mark.parametrize("merge_fn", ["task_arithmetic", "ties"])
@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_frank_wolfe_hard(parity_row, monkeypatch, granularity, merge_fn):
    """FrankWolfeHardAlgorithm with its CUDA moves made no-ops and its shuffled loader replaced by the same
    examples one at a time: with dataset_size = the split's size, each gradient sees every example once.
    merge_fn ties: its own ties_merge (whole-model TIES, threshold 20) for the start and every step."""
    from fusion_adaptive.frank_wolfe import FrankWolfeMerging
    from fusion_bench.method.fw_merging.fw_hard import FrankWolfeHardAlgorithm
    from fusionbench_kit import World, max_diff

    world = World()
    size = world.batch * world.n_batches
    peer = FrankWolfeHardAlgorithm(merge_fn=merge_fn, step_size=0.1, max_iters=3, dataset_size=size, granularity=granularity,
                                   scaling_factor=0.3, threshold=20)
    iterators = _fb_frank_wolfe(peer, world, monkeypatch)
    if merge_fn == "task_arithmetic":
        peer.merge_fn = _state_dict_task_arithmetic  # its own task_arithmetic_merge rejects its own call (as WEMoE's)
    peer.get_shuffled_loader_iter = lambda task: iterators[task]
    if merge_fn == "ties":
        # k_proj.bias's gradient is 0 but for rounding (see below); its cosine with any candidate is then noise that can flip
        # a whole-model pick, and a whole-model TIES trim spreads a flip to every tensor: both sides see the same stand-in
        import fusion_adaptive.frank_wolfe as fw

        gradient, iteration = fw._Setup.gradient, peer.frank_wolfe_iteration
        monkeypatch.setattr(fw._Setup, "gradient", lambda self, *a, **k: _steady_key_bias(gradient(self, *a, **k)))
        peer.frank_wolfe_iteration = lambda model: _steady_key_bias(iteration(model))
    with torch.enable_grad():  # run() ends with torch.set_grad_enabled(False), for the whole process: restored on exit
        expected = state(peer.run(world.fb_pool()))
    ctx = world.ctx()
    method = FrankWolfeMerging(FrankWolfeMerging.Config(max_iters=3, dataset_size=size, granularity=granularity, merge_fn=merge_fn))
    got = method.run(world.pool(), ctx)
    # k_proj's bias shifts every key by the same q·b: softmax ignores it, its gradient is 0 up to rounding, and the
    # layer-wise pick there follows the rounding noise (per-example sums in FusionBench, batched sums here)
    noise = [k for k in got if k.endswith("k_proj.bias")]
    diff = max_diff({k: v for k, v in expected.items() if k.removeprefix("vision_model.") not in noise},
                    {k: v for k, v in got.items() if k not in noise})
    noisy = max_diff(expected, got)
    how = ("its task_arithmetic_merge patched: it rejects its own call" if merge_fn == "task_arithmetic" else
           "merge_fn ties: its own ties_merge, threshold 20")
    note = (f"FrankWolfeHardAlgorithm ({how}), tiny CLIP world, 3 iterations, "
            f"dataset_size = the split ({size}); chosen: {ctx.extras['fw_merging']['chosen']}")
    if merge_fn == "ties":
        note += "; k_proj.bias's gradient (0 up to rounding) replaced by the same constant on both sides"
    elif granularity == "layer":
        note += (f"; k_proj.bias left out (its gradient is 0 but for rounding: softmax ignores a shift of every key, so its "
                 f"per-layer pick is noise; with it: {noisy:.1e})")
    label = f"granularity {granularity}" + ("" if merge_fn == "task_arithmetic" else f", merge_fn {merge_fn}")
    parity_row("fw_merging", PEER, f"fusionbench (hard, {label})", diff, note)
    assert diff <= TOL


def test_surgery(parity_row, monkeypatch, tmp_path):
    """FusionBench's AdaMerging+surgery with fixed layer-wise weights 0.3 (its `weights` file: no adaptation, θ₀ + 0.3 Σ τ)
    against `surgery` around task arithmetic λ 0.3, on the representation FusionBench uses (CLIP's normalised projected
    embedding: our pool's forward returns it).  Both draw D_t from the same generator (torch's kaiming init patched)."""
    import math

    import fusion_adaptive.surgery as ours_surgery
    import transformers.models.clip.modeling_clip as modeling_clip
    from fusion_adaptive.surgery import RepresentationSurgery

    # FusionBench 0.2.33's surgery wrapper imports CLIPVisionTransformer (a type hint), gone in transformers 5
    monkeypatch.setattr(modeling_clip, "CLIPVisionTransformer", modeling_clip.CLIPVisionModel, raising=False)
    import fusionbench_kit
    from fusion_bench.method.surgery.clip_layer_wise_adamerging_surgery import CLIPLayerWiseAdaMergingSurgeryAlgorithm
    from fusionbench_kit import Pool, World, _adaptation_config, fabric, max_diff

    world = World()
    steps = 12
    for model in [world.base, *world.models.values()]:
        model.config.projection_dim = world.clip.config.projection_dim  # FusionBench sizes D_t, U_t from it
    monkeypatch.setattr(fusionbench_kit.V4Layout, "config", property(lambda self: self.vision_model.config), raising=False)
    weights = tmp_path / "weights.pt"
    torch.save(torch.full((len(world.tasks), len(list(world.base.parameters()))), 0.3), weights)

    def draws():
        g = torch.Generator().manual_seed(7)
        while True:
            yield g

    source = draws()

    def kaiming(tensor, a=0.0, **kwargs):  # both sides: U(−1/√fan_in, 1/√fan_in) from one shared generator
        bound = 1 / math.sqrt(tensor.shape[1])
        with torch.no_grad():
            return tensor.uniform_(-bound, bound, generator=next(source))

    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", kaiming)
    fields = {"weights": str(weights), "lr": 1e-3, "init_values": 0.3, "clamp_weights": False, "tie_weights": True, "strict": False,
              "save_merging_weights": False, "surgery_steps": steps, "eval_iterations": 10**9}
    peer = CLIPLayerWiseAdaMergingSurgeryAlgorithm(_adaptation_config("clip_layer_wise_adamerging_surgery", 0, world.batch, **fields))
    peer._fabric_instance = fabric()
    peer.log_hyperparams = lambda *a, **k: None
    world.fb_heads(peer)
    peer.get_shuffled_test_loader_iter = world.fb_test_iterators()
    result = peer.run(world.fb_pool())
    alpha = result["surgery"]

    source = draws()  # the same draws again, for ours
    monkeypatch.setattr(ours_surgery, "surgery_module", lambda width, rank, generator: _fb_like_module(width, rank, kaiming))
    projection = world.clip.visual_projection.weight.detach()

    class Projected(Pool):  # the representation FusionBench's surgery sees
        def forward(self, model, inputs):
            feats = torch.nn.functional.linear(model(inputs)["pooler_output"], projection)
            return feats / feats.norm(p=2, dim=-1, keepdim=True)

    pool = Projected(world.base, world.models, {})
    method = RepresentationSurgery(RepresentationSurgery.Config(base="task_arithmetic", base_config={"scaling_factor": 0.3},
                                                                surgery_steps=steps))
    output = method.run(pool, world.ctx())
    diff = max_diff(state(result["adamerging"]), output.shared)
    for task in world.tasks:
        correction = output.model_for(task).correction
        down = getattr(alpha, f"feature_mapping_to_head_down_proj_{task}").weight.detach()
        up = getattr(alpha, f"feature_mapping_to_head_up_proj_{task}").weight.detach()
        diff = max(diff, float((correction[0].weight - down).abs().max()), float((correction[2].weight - up).abs().max()))
    parity_row("surgery", PEER, "fusionbench (after fixed layer-wise weights 0.3)", diff,
               f"CLIPLayerWiseAdaMergingSurgeryAlgorithm (weights file: no adaptation), {steps} surgery steps, tiny CLIP world: merged "
               "model and every task's D_t, U_t; fusion's pool returns the normalised projected embedding (FusionBench's feature); "
               "unpatched peer fails to import: CLIPVisionTransformer is gone from transformers 5")
    assert diff <= TOL


def _fb_like_module(width, rank, init):
    module = torch.nn.Sequential(torch.nn.Linear(width, rank, bias=False), torch.nn.ReLU(), torch.nn.Linear(rank, width, bias=False))
    init(module[0].weight)
    with torch.no_grad():
        module[2].weight.zero_()
    return module


@pytest.mark.parametrize("merge_fn", ["adamerging", "task_arithmetic"])
@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_frank_wolfe_soft(parity_row, monkeypatch, granularity, merge_fn):
    """FrankWolfeSoftAlgorithm with CUDA moves made no-ops and its loaders replaced by the same examples: training
    examples one at a time (dataset_size = the split), test batches in order.  merge_fn task_arithmetic: its own
    task_arithmetic_merge of the picks (λ 0.3 · γ_t), 3 iterations."""
    from fusion_adaptive.frank_wolfe import FrankWolfeSoftMerging
    from fusion_bench.method.fw_merging.fw_soft import FrankWolfeSoftAlgorithm
    from fusionbench_kit import World, fabric, max_diff

    world = World()
    size = world.batch * world.n_batches
    iters = 2 if merge_fn == "adamerging" else 3
    peer = FrankWolfeSoftAlgorithm(max_iters=iters, dataset_size=size, ada_iters=3, ada_coeff=1e-8, merge_fn=merge_fn,
                                   granularity=granularity, step_size=0.1)
    train = _fb_frank_wolfe(peer, world, monkeypatch)
    peer._fabric_instance = fabric()
    peer.get_shuffled_train_loader_iter = lambda task, batch_size=1: train[task]
    peer.get_shuffled_test_loader_iter = world.fb_test_iterators()
    if merge_fn == "task_arithmetic":  # no AdaMerging to absorb it: k_proj.bias's noise would pick (see test_frank_wolfe_hard)
        import fusion_adaptive.frank_wolfe as fw

        gradient, iteration = fw._Setup.gradient, peer.frank_wolfe_iteration
        monkeypatch.setattr(fw._Setup, "gradient", lambda self, *a, **k: _steady_key_bias(gradient(self, *a, **k)))
        peer.frank_wolfe_iteration = lambda model, task: _steady_key_bias(iteration(model, task))
        # its task_arithmetic_merge rejects its own call (a Parameter state dict against plain ones), as fw_hard's
        monkeypatch.setattr("fusion_bench.method.fw_merging.fw_soft.task_arithmetic_merge", _state_dict_task_arithmetic)
    with torch.enable_grad():
        expected = state(peer.run(world.fb_pool()))
    ctx = world.ctx()
    method = FrankWolfeSoftMerging(FrankWolfeSoftMerging.Config(max_iters=iters, dataset_size=size, ada_iters=3, granularity=granularity,
                                                                merge_fn=merge_fn))
    got = method.run(world.pool(), ctx)
    if merge_fn == "task_arithmetic":
        diff = max_diff(expected, got)
        parity_row("fw_soft", PEER, f"fusionbench (soft, granularity {granularity}, merge_fn task_arithmetic)", diff,
                   f"FrankWolfeSoftAlgorithm (merge_fn task_arithmetic, 0.3·γ_t; its task_arithmetic_merge patched: it rejects its own "
                   f"call), tiny CLIP world, "
                   f"{iters} iterations, dataset_size = the split ({size}); chosen: {ctx.extras['fw_soft']['chosen']}; k_proj.bias's "
                   "gradient (0 up to rounding) replaced by the same constant on both sides")
        assert diff <= TOL
        return
    # k_proj.bias: its gradient, and its AdaMerging coefficient's, is 0 but for rounding; Adam's first step follows the sign
    noise = [k for k in got if k.endswith("k_proj.bias")]
    diff = max_diff({k: v for k, v in expected.items() if k.removeprefix("vision_model.") not in noise},
                    {k: v for k, v in got.items() if k not in noise})
    note = (f"FrankWolfeSoftAlgorithm (merge_fn adamerging), tiny CLIP world, 2 iterations × 3 AdaMerging steps, dataset_size = "
            f"the split ({size}); chosen: {ctx.extras['fw_soft']['chosen']}")
    if noise:
        note += (f"; k_proj.bias left out (its gradient and its AdaMerging coefficient's are 0 but for rounding: softmax ignores "
                 f"a shift of every key; Adam's steps follow the noise's sign; with it: {max_diff(expected, got):.1e})")
    parity_row("fw_soft", PEER, f"fusionbench (soft, granularity {granularity})", diff, note)
    assert diff <= TOL
