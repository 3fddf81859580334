"""Issue 13's methods against FusionBench 0.2.33's own code: pruning (magnitude, random, Wanda),
EMR-Merging's elect/mask/rescale, the TALL masks, and the task-vector cosine analysis."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("fusion_bench")
sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: make the shared helpers importable
from fusionbench_kit import Pool  # noqa: E402
from parity_kit import max_abs_diff, ours, state, tiny_clip_vision, toy_models  # noqa: E402

PEER = "fusionbench"
TOL = 1e-5


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=16, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
    return LlamaForCausalLM(config).eval()


class _FirstModelPool:
    """What FusionBench's pruning classes ask of a pool."""

    def __init__(self, model):
        self.model = model

    def load_pretrained_or_first_model(self):
        return self.model


@pytest.mark.parametrize("prune_type", ["unstructured", "semistructured"])
def test_magnitude_pruning_tiny_llama(parity_row, prune_type):
    from fusion_bench.method import MagnitudePruningForLlama

    model = tiny_llama()
    got = ours("magnitude_pruning", {"prune_type": prune_type}, None, [model])
    peer = MagnitudePruningForLlama(prune_type=prune_type, device="cpu", dtype=None, sparsity_ratio=0.5, n=2, m=4)
    expected = state(peer.run(_FirstModelPool(copy.deepcopy(model))))
    diff = max_abs_diff(expected, got)
    assert set(got) == set(expected)
    parity_row("magnitude_pruning", PEER, f"fusionbench ({prune_type})", diff,
               "MagnitudePruningForLlama on a tiny Llama (every nn.Linear of model.layers; defaults 0.5 / 2:4)")
    assert diff <= TOL


@pytest.mark.parametrize("prune_type", ["unstructured", "semistructured"])
def test_random_pruning_same_counts(parity_row, prune_type):
    from fusion_bench.method import RandomPruningForLlama

    model = tiny_llama(1)
    got = ours("random_pruning", {"prune_type": prune_type}, None, [model], seed=3)
    torch.manual_seed(3)
    expected = state(RandomPruningForLlama(prune_type=prune_type, sparsity_ratio=0.5, n=2, m=4).run(_FirstModelPool(copy.deepcopy(model))))
    worst = 0.0
    for key, value in expected.items():
        if value.dim() == 2 and ".layers." in key:  # per row: the same number of zeros (4-wide groups for N:M)
            width = 4 if prune_type == "semistructured" else value.shape[1]
            rows_peer, rows_ours = value.reshape(value.shape[0], -1, width) == 0, got[key].reshape(value.shape[0], -1, width) == 0
            worst = max(worst, float((rows_peer.sum(-1) - rows_ours.sum(-1)).abs().max()))
        else:
            worst = max(worst, float((value - got[key]).abs().max()))
    parity_row("random_pruning", PEER, f"fusionbench ({prune_type})", worst,
               "RandomPruningForLlama: random masks (different generators); compared: zeros per row / per group of 4, untouched tensors",
               statistics=True)
    assert worst == 0.0


class _Block(torch.nn.Module):
    """A block FusionBench's Wanda loop can call: ``layer(x, attention_mask=, position_ids=)[0]``."""

    def __init__(self, width: int):
        super().__init__()
        self.up = torch.nn.Linear(width, 2 * width)
        self.down = torch.nn.Linear(2 * width, width)

    def forward(self, x, attention_mask=None, position_ids=None):
        return (x + self.down(torch.relu(self.up(x))),)


class _Stack(torch.nn.Module):
    def __init__(self, width: int = 8, depth: int = 3):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList([_Block(width) for _ in range(depth)])

    def forward(self, x):
        for layer in self.model.layers:
            x = layer(x)[0]
        return x


@pytest.mark.parametrize("prune_type", ["unstructured", "semistructured"])
def test_wanda_block_by_block(parity_row, prune_type):
    from fusion_bench.method.pruning.llama_wanda_prune import WandaPruningForLlama

    torch.manual_seed(0)
    model = _Stack()
    nsamples, seq = 6, 5
    inps = torch.randn(nsamples, seq, 8) * torch.linspace(0.2, 3.0, 8)
    peer = WandaPruningForLlama(nsamples=nsamples, seed=0, use_variant=False, prune_type=prune_type, device="cpu", dtype=None,
                                sparsity_ratio=0.5, n=2, m=4)
    fb_model = copy.deepcopy(model)
    peer.prune_using_calibration_data_(fb_model, inps=inps.clone(), outs=torch.zeros_like(inps), attention_mask=None, position_ids=None)
    from fusion_adaptive.wanda import WandaPruning

    from fusion_core.run_context import RunContext

    pool = Pool(model, {"calib": model}, {("calib", "train"): [(inps[j : j + 1], torch.zeros(1)) for j in range(nsamples)]})
    method = WandaPruning(WandaPruning.Config(prune_type=prune_type, num_batches=None))
    got = method.run(pool, RunContext(show_progress=False)).shared
    diff = max_abs_diff(state(fb_model), got)
    parity_row("wanda_pruning", PEER, f"fusionbench ({prune_type})", diff,
               "WandaPruningForLlama.prune_using_calibration_data_ on 3 residual MLP blocks (C4 loading not run offline)")
    assert diff <= TOL


def test_emr_merging(parity_row):
    from fusion_bench.method.emr_merging.utils import emr_merge
    from fusion_merging.emr import EmrMerging

    from fusion_core.run_context import RunContext

    worst = 0.0
    for make in (toy_models, tiny_clip_vision):
        base, experts = make(3)
        got = ours("emr_merging", {}, base, experts)
        b = state(base)
        taus = [{k: v - b[k] for k, v in state(m).items() if v.is_floating_point()} for m in experts]
        unified, _, rescalers = emr_merge(taus)
        expected = {k: b[k] + v for k, v in unified.items()}
        worst = max(worst, max_abs_diff(expected, got))

        ctx = RunContext(show_progress=False)
        EmrMerging(EmrMerging.Config()).run(Pool(base, {f"m{i}": m for i, m in enumerate(experts)}, {}), ctx)
        ours_scales = list(ctx.extras["emr_merging"]["rescalers"].values())
        worst = max(worst, max(abs(a - float(e)) / max(1.0, abs(float(e))) for a, e in zip(ours_scales, rescalers, strict=True)))
    parity_row("emr_merging", PEER, "fusionbench", worst,
               "emr_merge (utils.py) on toy and tiny CLIP vision: θ₀ + τ_uni, and the rescalers (relative)")
    assert worst <= TOL


def test_tall_masks_match_generate_task_masks(parity_row):
    from fusion_bench.method.tall_mask.utils import generate_task_masks
    from fusion_merging.consensus import tall_masks

    g = torch.Generator().manual_seed(0)
    ptm = torch.randn(200, generator=g)
    fts = torch.stack([ptm + torch.randn(200, generator=g) for _ in range(4)])
    peer = generate_task_masks(fts - ptm, fts, ptm, tall_mask_lambda=0.6)
    mine = torch.stack(tall_masks(list(fts - ptm), 0.6))
    mismatches = int((peer != mine).sum())
    parity_row("consensus_ta", PEER, "fusionbench (TALL masks)", float(mismatches),
               "tall_mask/utils.generate_task_masks (λ 0.6): mismatching mask entries; FusionBench has no consensus merge")
    assert mismatches == 0


def test_task_vector_cosine(parity_row, tmp_path):
    import importlib.util

    import fusion_bench.method
    import pandas as pd

    # fusion_bench.method.analysis/__init__ also imports the violin plot, which needs seaborn (not a
    # dependency of fusion-bench 0.2.33): load the cosine module on its own
    path = Path(fusion_bench.method.__file__).parent / "analysis" / "task_vector_cos_similarity.py"
    spec = importlib.util.spec_from_file_location("fb_task_vector_cos_similarity", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    TaskVectorCosSimilarity = module.TaskVectorCosSimilarity
    from fusion_merging.analyze import analyze
    from parity_kit import fusionbench_pool

    from fusion_core.engine.readers import StateDictReader

    base, experts = tiny_clip_vision(3)
    peer = TaskVectorCosSimilarity(plot_heatmap=False, trainable_only=True, output_path=str(tmp_path))
    peer.run(fusionbench_pool(base, experts))
    expected = pd.read_csv(tmp_path / "task_vector_cos_similarity.csv", index_col=0).to_numpy()
    names = [f"model_{i}" for i in range(3)]
    report = analyze(StateDictReader(dict(base.named_parameters())), [StateDictReader(dict(m.named_parameters())) for m in experts],
                     names)
    diff = max(abs(report["whole"]["cosine"][i][j] - float(expected[i][j])) for i in range(3) for j in range(3))
    parity_row("analyze task-vectors", PEER, "fusionbench", diff,
               "TaskVectorCosSimilarity.run on tiny CLIP vision (its CSV; it subtracts in the stored fp32, fuse in fp64)")
    assert diff <= TOL


def test_tall_masks_reconstructions(parity_row):
    from fusion_bench.method.tall_mask import TallMaskTaskArithmeticAlgorithm
    from fusion_merging.consensus import TallMasks
    from parity_kit import fusionbench_pool

    from fusion_core.run_context import RunContext

    base, experts = toy_models(3)
    try:
        result = TallMaskTaskArithmeticAlgorithm(tall_mask_lambda=0.6).run(fusionbench_pool(base, experts))
    except TypeError:  # its strict state-dict type check: Parameters (keep_vars=True) mixed with Tensors
        parity_row("tall_masks", PEER, "fusionbench", None,
                   "peer crashes: TallMaskTaskArithmeticAlgorithm.run raises TypeError 'Tensor type mismatch … expected Parameter, "
                   "got Tensor' (its own state-dict type check); its masks would also "
                   "compare |θ₀ − τ_t| (the pretrained weights) where its tall_mask/utils.py and the paper use |τ_t|; with both "
                   "worked around its run matches fuse (row 'run, its type check and θ₀ worked around')")
        return
    pool = Pool(base, {f"model_{i}": m for i, m in enumerate(experts)}, {})
    got = TallMasks(TallMasks.Config(tall_mask_lambda=0.6)).run(pool, RunContext(show_progress=False))
    diff = max(max_abs_diff(state(model), got[name]) for name, model in result["models"].items())
    parity_row("tall_masks", PEER, "fusionbench", diff, "TallMaskTaskArithmeticAlgorithm on toy models (N=3)")


def test_tall_masks_run_with_the_peer_defects_worked_around(parity_row, monkeypatch):
    """TallMaskTaskArithmeticAlgorithm.run with its two defects worked around: its state-dict helpers given plain tensors
    (its type check refuses the Parameters it passes itself), and generate_task_masks given zeros where run passes θ₀
    (the masks compare |τ_t| with λ·|Σ τ − τ_t| in task-vector space, as tall_mask/utils.py and the paper)."""
    import fusion_bench.method.tall_mask.task_arithmetic as peer_module
    from fusion_merging.consensus import TallMasks
    from parity_kit import fusionbench_pool

    from fusion_core.run_context import RunContext

    def plain(value):
        return {k: v.detach() for k, v in value.items()} if isinstance(value, dict) else value

    for name in ("state_dict_add", "state_dict_sub", "state_dict_sum", "state_dict_hadamard_product", "state_dict_diff_abs",
                 "state_dict_binary_mask", "state_dict_mul"):
        helper = getattr(peer_module, name)
        monkeypatch.setattr(peer_module, name, lambda *a, helper=helper, **k: helper(
            *[[plain(x) for x in v] if isinstance(v, list) else plain(v) for v in a], **k))
    masks = peer_module.generate_task_masks
    counts = {"changed": 0, "entries": 0}

    def task_space(multi, task, pretrained, tall_mask_lambda):  # run passes θ₀; the mask is defined against 0
        defined = masks(multi, task, {k: torch.zeros_like(v) for k, v in pretrained.items()}, tall_mask_lambda=tall_mask_lambda)
        as_run = masks(multi, task, pretrained, tall_mask_lambda=tall_mask_lambda)
        counts["changed"] += sum(int((defined[k] != as_run[k]).sum()) for k in defined)
        counts["entries"] += sum(v.numel() for v in defined.values())
        return defined

    monkeypatch.setattr(peer_module, "generate_task_masks", task_space)
    worst = 0.0
    for base, experts in (toy_models(3), tiny_clip_vision(3)):
        result = peer_module.TallMaskTaskArithmeticAlgorithm(tall_mask_lambda=0.6).run(fusionbench_pool(base, experts))
        pool = Pool(base, {f"model_{i}": m for i, m in enumerate(experts)}, {})
        got = TallMasks(TallMasks.Config(tall_mask_lambda=0.6)).run(pool, RunContext(show_progress=False))
        worst = max(worst, max(max_abs_diff(state(model), got[name]) for name, model in result["models"].items()))
    share = counts["changed"] / counts["entries"]
    assert share > 0.01  # the θ₀ defect is real: run's masks are not the defined ones
    parity_row("tall_masks", PEER, "fusionbench (run, its type check and θ₀ worked around)", worst,
               "TallMaskTaskArithmeticAlgorithm.run on toy and tiny CLIP vision (N=3, λ 0.6), every task's reconstruction "
               "θ₀ + m_t ⊙ Σ τ: its state-dict helpers given plain tensors (its own type check refuses the Parameters run passes), "
               f"generate_task_masks given 0 where run passes θ₀ (with θ₀, {100 * share:.0f} % of the mask entries differ)")
    assert worst <= TOL
