"""Parity of fusion-adaptive's E-WEMoE with FusionBench 0.2.33's ``SparseCLIPWeightEnsemblingMoEAlgorithm`` (shared gate).

The tiny CLIP towers and batches of ``fusionbench_kit``; FusionBench's class driven as its CLI would (its
``config/method/wemoe/sparse_weight_ensembling_moe.yaml`` settings), only the I/O hooks replaced.  Three rows:
the sparse experts, the shared router after a few Adam steps, and the pooled output.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("fusion_bench")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))
from fusionbench_kit import World, fb_sparse_wemoe, max_diff, task_arithmetic_merge  # noqa: E402


def test_e_wemoe_matches_fusionbench(parity_row, monkeypatch):
    """Within 1e-5 (float32 sums in another order): the experts, the router after 3 Adam steps, the pooled output."""
    from fusion_adaptive.ewemoe import EWEMoE
    from fusion_adaptive.layers import WeightEnsemblingMoE
    from fusion_bench.method.sparse_we_moe import sparse_clip_we_moe

    torch.set_num_threads(1)
    world, steps, prune = World(), 3, 0.9
    algorithm = fb_sparse_wemoe(world, steps, prune)
    # FusionBench 0.2.33's task_arithmetic_merge rejects its own call (see test_fusionbench_adaptive's WEMoE row)
    monkeypatch.setattr(sparse_clip_we_moe, "task_arithmetic_merge", task_arithmetic_merge)
    fb_moe = algorithm.construct_moe_model_sharedgate()
    fb_layers = [layer.mlp for layer in fb_moe.vision_model.encoder.layers]
    gate = fb_layers[0].gate
    assert all(layer.gate is gate for layer in fb_layers)
    start = EWEMoE(EWEMoE.Config(steps=0, sparsity=prune)).run(world.pool(with_data=False), world.ctx())
    ours_layers = [m for m in start.modules() if isinstance(m, WeightEnsemblingMoE)]
    assert len(ours_layers) == len(fb_layers) == 2 and ours_layers[0].router is ours_layers[1].router
    expert_diff = 0.0
    for mine, theirs in zip(ours_layers, fb_layers, strict=True):
        for i, tv in enumerate(theirs.task_vectors):
            for name, value in tv.named_parameters():
                expert_diff = max(expert_diff, float((mine.expert(name)[i] - value).abs().max()))
    router = ours_layers[0].router
    with torch.no_grad():  # the same initial router on both sides: ours (seeded) copied into FusionBench's shared gate
        gate.fc1.weight.copy_(router.net[0].weight)
        gate.fc1.bias.copy_(router.net[0].bias)
        gate.fc2.weight.copy_(router.net[2].weight)
        gate.fc2.bias.copy_(router.net[2].bias)
    fb_moe = algorithm.test_time_adaptation(fb_moe)
    trained = EWEMoE(EWEMoE.Config(steps=steps, sparsity=prune)).run(world.pool(with_data=False), world.ctx())
    shared = next(m for m in trained.modules() if isinstance(m, WeightEnsemblingMoE)).router.state_dict()
    mine = {f"{fb}.{p}": shared[f"{ours}.{p}"] for ours, fb in (("net.0", "fc1"), ("net.2", "fc2")) for p in ("weight", "bias")}
    router_diff = max_diff(gate.state_dict(), mine)
    fb_moe.eval()
    with torch.no_grad():
        x = world.images["alpha"][0]
        out_diff = float((fb_moe(x)[1] - trained(x)["pooler_output"]).abs().max())
    convention = f"fusionbench (default: tv_prune_ratio {prune}, shared gate)"
    parity_row("e_wemoe", "fusionbench", f"{convention}: sparse experts", expert_diff)
    parity_row("e_wemoe", "fusionbench", f"{convention}, {steps} steps: shared router", router_diff)
    parity_row("e_wemoe", "fusionbench", f"{convention}, {steps} steps: pooled output", out_diff)
    assert max(expert_diff, router_diff, out_diff) <= 1e-5
