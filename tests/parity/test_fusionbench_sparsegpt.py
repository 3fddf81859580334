"""SparseGPT against FusionBench 0.2.33's ``SparseGPTPruningForLlama`` (its copy of the SparseGPT reference code).

The block loop ``prune_using_calibration_data_`` runs on the residual MLP blocks of the Wanda parity
test with the same calibration sequences on both sides (C4 is not loaded offline).  The peer
ignores its ``prune_type`` (``n:m`` applies whenever ``n > 0``): its unstructured row runs with
``n = 0``.  Its unstructured rule prunes every score ≤ the one at rank ⌊b·s⌋ of a block (one
more per block than asked): ours with ``exact_count: false``.  It calls ``torch.cuda.synchronize``
unconditionally (no CUDA here): made a no-op.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest

pytest.importorskip("fusion_bench")
torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).parent))
from fusionbench_kit import Pool  # noqa: E402
from parity_kit import max_abs_diff, state  # noqa: E402
from test_fusionbench_new_methods import _Stack  # noqa: E402

PEER = "fusionbench"
TOL = 1e-5


@pytest.mark.parametrize("prune_type", ["unstructured", "semistructured"])
def test_sparsegpt_block_by_block(parity_row, prune_type, monkeypatch):
    from fusion_adaptive.sparsegpt import SparseGPTPruning
    from fusion_bench.method.pruning.llama_sparsegpt_prune import SparseGPTPruningForLlama

    from fusion_core.run_context import RunContext

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    torch.manual_seed(0)
    model = _Stack(width=16, depth=3)
    nsamples, seq = 6, 5
    inps = torch.randn(nsamples, seq, 16) * torch.linspace(0.2, 3.0, 16)
    n = 0 if prune_type == "unstructured" else 2
    peer = SparseGPTPruningForLlama(nsamples=nsamples, seed=0, use_variant=False, prune_type=prune_type, device="cpu", dtype=None,
                                    sparsity_ratio=0.5, n=n, m=4)
    fb_model = copy.deepcopy(model)
    fb_model.hf_device_map = {}
    peer.prune_using_calibration_data_(fb_model, inps=inps.clone(), outs=torch.zeros_like(inps), attention_mask=None, position_ids=None)
    pool = Pool(model, {"calib": model}, {("calib", "train"): [(inps[j : j + 1], torch.zeros(1)) for j in range(nsamples)]})
    method = SparseGPTPruning(SparseGPTPruning.Config(prune_type=prune_type, num_batches=None, exact_count=False))
    got = method.run(pool, RunContext(show_progress=False)).shared
    diff = max_abs_diff(state(fb_model), got)
    parity_row("sparsegpt_pruning", PEER, f"fusionbench ({prune_type}, exact_count false)", diff,
               "SparseGPTPruningForLlama.prune_using_calibration_data_ on 3 residual MLP blocks (C4 loading not run offline); "
               "the peer ignores prune_type (n:m whenever n > 0): n = 0 for its unstructured row")
    assert diff <= TOL
