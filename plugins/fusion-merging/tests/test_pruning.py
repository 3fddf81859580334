"""Magnitude and random pruning: exact sparsity per linear weight, N:M block by block, hand-worked masks."""

from __future__ import annotations

import pytest
import torch
from fusion_merging.pruning import MagnitudePruning, RandomPruning, semistructured_mask, unstructured_mask

from fusion_core.engine.kernel import KernelContext
from fusion_core.errors import InputError

torch.set_num_threads(1)

LINEAR = "model.layers.3.mlp.up_proj.weight"


def prune(cls, name, base, tensors=(), seed=0, **config):
    return cls(cls.Config(**config)).kernel(name, base, list(tensors), KernelContext(name=name, seed=seed))


def weight(rows=6, cols=16, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def test_unstructured_mask_hand_worked_with_ties_in_index_order():
    scores = torch.tensor([[3.0, 1.0, 2.0, 1.0, 5.0], [0.0, 0.0, 0.0, 9.0, 8.0]])
    # ⌊5 · 0.4⌋ = 2 per row: row 0 → the two 1.0s (cols 1, 3); row 1 → cols 0, 1 (equal scores: lower index first)
    expected = torch.tensor([[False, True, False, True, False], [True, True, False, False, False]])
    assert torch.equal(unstructured_mask(scores, 0.4), expected)


def test_semistructured_mask_hand_worked_with_a_narrow_last_group():
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0, 8.0, 5.0, 7.0, 6.0, 1.0, 2.0]])
    # 2:4 → group [4,3,2,1] prunes cols 2, 3; group [8,5,7,6] prunes cols 5, 7; tail [1,2] (width 2) prunes both
    expected = torch.tensor([[False, False, True, True, False, True, False, True, True, True]])
    assert torch.equal(semistructured_mask(scores, 2, 4), expected)


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.7, 1.0])
def test_magnitude_unstructured_zeroes_exactly_the_fraction_per_row_and_keeps_the_largest(ratio):
    w = weight()
    out = prune(MagnitudePruning, LINEAR, w, sparsity_ratio=ratio)
    k = int(16 * ratio)
    assert torch.equal((out == 0).sum(dim=1), torch.full((6,), k))  # exact per row, so exact per weight
    assert float((out == 0).float().mean()) == k / 16
    kept = out != 0
    assert torch.equal(out[kept], w[kept])  # survivors untouched
    for row in range(6):  # every pruned magnitude ≤ every kept one
        if 0 < k < 16:
            assert w[row][~kept[row]].abs().max() <= w[row][kept[row]].abs().min()


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4), (3, 4)])
def test_magnitude_n_m_pattern_block_by_block(n, m):
    w = weight(rows=5, cols=32, seed=1)
    out = prune(MagnitudePruning, LINEAR, w, prune_type="semistructured", n=n, m=m)
    blocks_out, blocks_w = out.reshape(5, 32 // m, m), w.reshape(5, 32 // m, m)
    zeros = (blocks_out == 0).sum(dim=-1)
    assert torch.equal(zeros, torch.full_like(zeros, n))  # n zeros in every block of m
    pruned = blocks_out == 0
    largest_pruned = torch.where(pruned, blocks_w.abs(), torch.zeros_like(blocks_w)).amax(-1)
    smallest_kept = torch.where(~pruned, blocks_w.abs(), torch.full_like(blocks_w, float("inf"))).amin(-1)
    assert bool((largest_pruned <= smallest_kept).all())
    assert float((out == 0).float().mean()) == n / m


def test_only_linear_weights_in_blocks_are_pruned_and_the_base_is_the_target():
    base, model = weight(seed=2), weight(seed=3)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.input_layernorm.weight", "model.norm.weight"):
        one_d = "norm" in name  # norms are 1-D
        t, m = (base[0], model[0]) if one_d else (base, model)
        assert torch.equal(prune(MagnitudePruning, name, t, [m]), t)
    out = prune(MagnitudePruning, LINEAR, base, [model])
    assert torch.equal(out != 0, unstructured_mask(base.abs(), 0.5).logical_not())  # pruned from the base, not the model
    gpt2 = prune(MagnitudePruning, "transformer.h.0.attn.c_attn.weight", base)
    assert int((gpt2 == 0).sum()) == 6 * 8


def test_without_a_base_the_only_model_is_pruned_and_several_models_are_refused():
    w = weight(seed=4)
    out = prune(MagnitudePruning, LINEAR, None, [w])
    assert int((out == 0).sum()) == 6 * 8
    method = MagnitudePruning(MagnitudePruning.Config())
    method.check_inputs(1, False)
    method.check_inputs(3, True)
    with pytest.raises(InputError, match="prunes one model"):
        method.check_inputs(2, False)


def test_random_pruning_exact_counts_seeded_and_differs_from_magnitude():
    w = weight(rows=8, cols=20, seed=5)
    a = prune(RandomPruning, LINEAR, w, seed=7)
    b = prune(RandomPruning, LINEAR, w, seed=7)
    c = prune(RandomPruning, LINEAR, w, seed=8)
    other = prune(RandomPruning, LINEAR.replace("3", "4"), w, seed=7)
    assert torch.equal(a, b)  # same seed and tensor: bit-identical
    assert not torch.equal(a, c) and not torch.equal(a, other)  # a different seed or tensor draws differently
    assert torch.equal((a == 0).sum(dim=1), torch.full((8,), 10))
    assert not torch.equal(a, prune(MagnitudePruning, LINEAR, w))
    nm = prune(RandomPruning, LINEAR, w, prune_type="semistructured", n=2, m=4)
    assert torch.equal((nm.reshape(8, 5, 4) == 0).sum(-1), torch.full((8, 5), 2))


def test_config_refuses_n_above_m_and_bad_regexes():
    with pytest.raises(ValueError, match="must not exceed m"):
        MagnitudePruning.Config(n=5, m=4)
    with pytest.raises(ValueError, match="not a regular expression"):
        MagnitudePruning.Config(include="(")


def test_defaults_are_fusionbench_yaml():
    cfg = MagnitudePruning.Config()
    assert (cfg.prune_type, cfg.sparsity_ratio, cfg.n, cfg.m) == ("unstructured", 0.5, 2, 4)


def test_engine_prunes_a_base_alone_and_copies_every_other_tensor():
    from fusion_core.engine.stream import MergeOptions, merge_readers

    g = torch.Generator().manual_seed(9)
    base = {"model.embed_tokens.weight": torch.randn(10, 8, generator=g), LINEAR: torch.randn(12, 8, generator=g),
            "model.layers.3.mlp.up_proj.bias": torch.randn(12, generator=g)}
    for models, source in (([], base), ([base], None)):
        out = merge_readers(RandomPruning(RandomPruning.Config()), source, models, MergeOptions(seed=3, notify=lambda _: None))
        assert torch.equal(out["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
        assert torch.equal(out["model.layers.3.mlp.up_proj.bias"], base["model.layers.3.mlp.up_proj.bias"])
        assert torch.equal((out[LINEAR] == 0).sum(dim=1), torch.full((12,), 4))
        direct = prune(RandomPruning, LINEAR, base[LINEAR], seed=3)
        assert torch.equal(out[LINEAR], direct)
