"""RankOne-MoE's routed layer against FusionBench 0.2.33's ``fusion_bench.models.rankone_moe.RankOneMoE``.

The MLP of the first block of the tiny CLIP world's towers, the same router weights on both sides
(FusionBench's linear ``Depth_1_Gate`` copied into ours), the same hidden states: the layer outputs
are compared (batch-reduced and per-sample routing, all experts and a soft top-k).  FusionBench's
algorithm class (``CLIPRankOneMoEAlgorithm``) only builds a CUDA Fabric; its adaptation loop is
WEMoE's, compared in ``test_fusionbench_adaptive.py``.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest

pytest.importorskip("fusion_bench")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))
from fusionbench_kit import World  # noqa: E402

TOL = 1e-5
PEER = "fusionbench"


@pytest.fixture(scope="module")
def world():
    torch.set_num_threads(1)
    return World()


def first_mlp(model):
    return next(m for n, m in model.named_modules() if n.endswith("layers.0.mlp"))


@pytest.mark.parametrize("batch_reduce,select_k", [(True, -1), (False, -1), (True, 5)], ids=["batch", "per-sample", "select5"])
def test_rankone_layer_matches_fusionbench(world, parity_row, batch_reduce, select_k):
    from fusion_adaptive.layers import Router
    from fusion_adaptive.rankone_moe import RankOneMoEMethod
    from fusion_bench.models.rankone_moe import RankOneMoE as PeerRankOneMoE

    rank, lam = 4, 0.3
    base = first_mlp(world.base)
    experts = [first_mlp(m) for m in world.models.values()]
    peer = PeerRankOneMoE(hidden_size=32, base_model=copy.deepcopy(base), expert_models=[copy.deepcopy(e) for e in experts], init_lambda=lam,
                          batch_first=True, router_hidden_layers=1, batch_reduce=batch_reduce, svd_accelerator=None, rank_k=rank,
                          select_k=select_k)
    with torch.no_grad():
        peer.gate.fc.weight.add_(torch.randn(peer.gate.fc.weight.shape, generator=torch.Generator().manual_seed(0)) * 0.3)
    method = RankOneMoEMethod(RankOneMoEMethod.Config(rank_k=rank, select_k=select_k, batch_reduce=batch_reduce, init_lambda=lam))
    stacked = {p: torch.stack([dict(e.named_parameters())[p].detach() - v.detach() for e in experts]) for p, v in base.named_parameters()}
    router = Router(32, len(experts) * rank, 0, lam)
    with torch.no_grad():
        router.net[-1].weight.copy_(peer.gate.fc.weight)
        router.net[-1].bias.copy_(peer.gate.fc.bias)
    ours = method.make_layer(copy.deepcopy(base), stacked, router)
    x = torch.randn(4, 6, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = peer(x), ours(x)
    diff = float((expected - got).abs().max())
    mode = ("batch_reduce" if batch_reduce else "per-sample routing") + (f", select_k {select_k}" if select_k > 0 else "")
    parity_row("rankone_moe", PEER, f"fusionbench (layer: rank_k {rank}, {mode})", diff,
               "models.rankone_moe.RankOneMoE on a tiny CLIP MLP, router weights copied; the adaptation loop is WEMoE's")
    assert diff <= TOL
