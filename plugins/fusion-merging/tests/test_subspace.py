"""Golden tests for the SVD-based kernels: expected values are closed forms written out here
(orthonormal bases from QR, inverse square roots from 2×2 formulas or eigh), not the kernels' SVD path."""

from __future__ import annotations

import math

import attrs
import pytest
import torch
from fusion_merging.subspace import METHODS, IsoC, IsoCTS, TSVMerge

from fusion_core.config import make_config
from fusion_core.engine.kernel import KernelContext
from fusion_core.errors import ConfigError, InputError

torch.set_num_threads(1)

D = torch.float64


def run(cls, base, tensors, **cfg):
    method = cls(cls.Config(**cfg))
    return method.kernel("w", base, list(tensors), KernelContext(name="w", seed=0))


def orthonormal(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=D))
    return q


def outer(u, v):
    return u[:, None] * v[None, :]


def assert_close(actual, expected, tol=1e-10):
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=tol, atol=tol)


def inv_sqrt_gram2(c):
    """(G)^{-1/2} for G = [[1, c], [c, 1]]: eigenvalues 1±c with eigenvectors (1,±1)/√2."""
    p, m = (1 + c) ** -0.5, (1 - c) ** -0.5
    return torch.tensor([[p + m, p - m], [p - m, p + m]], dtype=D) / 2


def polar_by_eigh(m):
    """M (MᵀM)^{-1/2} on M's row space, via a symmetric eigendecomposition (independent of SVD)."""
    evals, evecs = torch.linalg.eigh(m.T @ m)
    keep = evals > 1e-12 * evals.max()
    inv_sqrt = (evecs[:, keep] * evals[keep].rsqrt()) @ evecs[:, keep].T
    return m @ inv_sqrt


@pytest.fixture
def base():
    g = torch.Generator().manual_seed(11)
    return torch.randn(5, 4, generator=g, dtype=D)


# --------------------------------------------------------------------------- metadata


@pytest.mark.parametrize("cls", METHODS)
def test_methods_describe_themselves(cls):
    assert cls.name and cls.summary and "\n" not in cls.summary
    assert cls.reference_url.startswith("https://arxiv.org/")
    assert cls.capabilities.needs_base and not cls.elementwise
    for field in attrs.fields(cls.Config):
        assert field.metadata["help"]
    with pytest.raises(InputError, match="needs a base"):
        cls(cls.Config()).check_inputs(2, False)


def test_method_names():
    assert [c.name for c in METHODS] == ["tsv_m", "iso_c", "iso_cts"]


@pytest.mark.parametrize(
    "cls,field,value",
    [
        (TSVMerge, "fraction", 0.0),
        (TSVMerge, "fraction", 1.5),
        (TSVMerge, "scaling_factor", -1.0),
        (IsoCTS, "common_space_fraction", 1.2),
        (IsoC, "scaling_factor", -0.5),
    ],
)
def test_config_validation(cls, field, value):
    with pytest.raises(ConfigError, match=field):
        make_config(cls.Config, {field: value})


# --------------------------------------------------------------------------- TSV-M


def test_tsvm_orthogonal_rank_one_tasks_sum(base):
    u, v = orthonormal(5, 2, 1), orthonormal(4, 2, 2)
    tau1, tau2 = 3.0 * outer(u[:, 0], v[:, 0]), 2.0 * outer(u[:, 1], v[:, 1])
    out = run(TSVMerge, base, [base + tau1, base + tau2], scaling_factor=0.7)
    assert_close(out, base + 0.7 * (tau1 + tau2))


def test_tsvm_non_orthogonal_tasks_are_decorrelated(base):
    c, d = 0.6, -0.3
    u1 = torch.tensor([1.0, 0, 0, 0, 0], dtype=D)
    u2 = torch.tensor([c, math.sqrt(1 - c * c), 0, 0, 0], dtype=D)
    v1 = torch.tensor([1.0, 0, 0, 0], dtype=D)
    v2 = torch.tensor([d, math.sqrt(1 - d * d), 0, 0], dtype=D)
    tau1, tau2 = 3.0 * outer(u1, v1), 2.0 * outer(u2, v2)
    u_perp = torch.stack([u1, u2], 1) @ inv_sqrt_gram2(c)
    v_perp = torch.stack([v1, v2], 1) @ inv_sqrt_gram2(d)
    expected = u_perp @ torch.diag(torch.tensor([3.0, 2.0], dtype=D)) @ v_perp.T
    out = run(TSVMerge, base, [base + tau1, base + tau2])
    assert_close(out, base + expected)
    assert not torch.allclose(out, base + tau1 + tau2)


def test_tsvm_keeps_top_fraction_per_task(base):
    a, b = orthonormal(5, 3, 3), orthonormal(4, 3, 4)
    tau = 5.0 * outer(a[:, 0], b[:, 0]) + 2.0 * outer(a[:, 1], b[:, 1]) + 0.5 * outer(a[:, 2], b[:, 2])
    # one task, default fraction 1/N = 1: nothing dropped
    assert_close(run(TSVMerge, base, [base + tau]), base + tau)
    # fraction 0.5 of rank 4 → 2 components: the best rank-2 approximation
    assert_close(
        run(TSVMerge, base, [base + tau], fraction=0.5), base + 5.0 * outer(a[:, 0], b[:, 0]) + 2.0 * outer(a[:, 1], b[:, 1])
    )
    # fraction 0.1 → ⌊0.4⌋ = 0: no component, the base (FusionBench); below_n=one raises it to 1 component
    assert torch.equal(run(TSVMerge, base, [base + tau], fraction=0.1), base)
    assert_close(run(TSVMerge, base, [base + tau], fraction=0.1, below_n="one"), base + 5.0 * outer(a[:, 0], b[:, 0]))
    method = TSVMerge(TSVMerge.Config())
    assert [method.rank_per_task(768, n) for n in (1, 8, 20)] == [768, 96, 38]
    assert TSVMerge(TSVMerge.Config(fraction=1 / 49)).rank_per_task(49, 1) == 1


def test_tsvm_default_rank_split_truncates_each_task(base):
    # rank 4, N = 2 → each task keeps its top 2 of 3 components; tasks live in orthogonal blocks
    u, v = orthonormal(5, 4, 5), orthonormal(4, 4, 6)
    tau1 = 4.0 * outer(u[:, 0], v[:, 0]) + 3.0 * outer(u[:, 1], v[:, 1])
    tau2 = 2.0 * outer(u[:, 2], v[:, 2]) + 1.0 * outer(u[:, 3], v[:, 3])
    extra = 0.25 * outer(u[:, 3], v[:, 3])  # third component of task 1, dropped by truncation
    out = run(TSVMerge, base, [base + tau1 + extra, base + tau2])
    assert_close(out, base + tau1 + tau2)


def test_tsvm_non_matrix_tensors_are_averaged():
    base = torch.tensor([1.0, 2.0, 3.0], dtype=D)
    xs = [base + torch.tensor([3.0, 0.0, -3.0], dtype=D), base + torch.tensor([1.0, 2.0, 1.0], dtype=D)]
    assert_close(run(TSVMerge, base, xs, scaling_factor=0.5), base + 0.5 * torch.tensor([2.0, 1.0, -1.0], dtype=D))
    conv = torch.zeros(2, 2, 1, 1, dtype=D)
    assert_close(run(TSVMerge, conv, [conv + 1.0, conv + 3.0]), conv + 2.0)


def test_tsvm_zero_task_vectors_give_base(base):
    assert torch.equal(run(TSVMerge, base, [base.clone(), base.clone()]), base)


# --------------------------------------------------------------------------- Iso-C


def test_iso_c_single_rank_two_matrix(base):
    a, b = orthonormal(5, 2, 7), orthonormal(4, 2, 8)
    tau = 4.0 * outer(a[:, 0], b[:, 0]) + 1.0 * outer(a[:, 1], b[:, 1])
    out = run(IsoC, base, [base + tau], scaling_factor=2.0)
    assert_close(out, base + 2.0 * 2.5 * (outer(a[:, 0], b[:, 0]) + outer(a[:, 1], b[:, 1])))


def test_iso_c_flattens_the_spectrum_of_the_sum():
    g = torch.Generator().manual_seed(9)
    base = torch.randn(6, 4, generator=g, dtype=D)
    taus = [torch.randn(6, 4, generator=g, dtype=D) for _ in range(3)]
    out = run(IsoC, base, [base + t for t in taus], scaling_factor=1.3)
    total = sum(taus)
    sigma_mean = torch.linalg.matrix_norm(total, ord="nuc") / 4  # Σσ / rank
    w = (out - base) / 1.3
    assert_close(torch.linalg.svdvals(w), torch.full((4,), float(sigma_mean), dtype=D), tol=1e-9)
    assert_close(w, sigma_mean * polar_by_eigh(total), tol=1e-9)


def test_iso_c_float32_invariant():
    g = torch.Generator().manual_seed(10)
    base = torch.randn(16, 8, generator=g)
    xs = [base + 0.01 * torch.randn(16, 8, generator=g) for _ in range(2)]
    out = run(IsoC, base, xs)
    assert out.dtype == torch.float32
    s = torch.linalg.svdvals((out - base).double())
    assert float(s.max() - s.min()) < 1e-5 * float(s.mean())


def test_iso_c_non_matrix_and_zero():
    base = torch.tensor([1.0, -1.0], dtype=D)
    out = run(
        IsoC, base, [base + torch.tensor([2.0, 0.0], dtype=D), base + torch.tensor([0.0, 4.0], dtype=D)], scaling_factor=2.0
    )
    assert_close(out, base + torch.tensor([2.0, 4.0], dtype=D))
    m = torch.ones(3, 3, dtype=D)
    assert torch.equal(run(IsoC, m, [m.clone(), m.clone()]), m)


def test_iso_c_is_deterministic():
    g = torch.Generator().manual_seed(12)
    base = torch.randn(8, 8, generator=g)
    xs = [base + torch.randn(8, 8, generator=g) for _ in range(3)]
    assert torch.equal(run(IsoC, base, xs), run(IsoC, base, xs))
    assert torch.equal(run(IsoCTS, base, xs), run(IsoCTS, base, xs))


# --------------------------------------------------------------------------- Iso-CTS


@pytest.mark.parametrize(
    "rank,fraction,n,expected",
    [
        (768, 0.8, 8, (616, 19)),  # k0 = 614, (768-614)/8 = 19.25 → 19
        (768, 0.8, 20, (608, 8)),  # 154/20 = 7.7 → 8
        (6, 0.5, 2, (2, 2)),  # k0 = 3, 1.5 rounds to 2 (ties to even)
        (4, 0.5, 2, (2, 1)),
        (4, 1.0, 3, (4, 0)),
        (2, 0.0, 3, (2, 0)),  # round(2/3) = 1 would overflow the rank: capped at ⌊2/3⌋ = 0
        (5, 0.0, 2, (1, 2)),  # round(2.5) = 2
    ],
)
def test_iso_cts_subspace_sizes(rank, fraction, n, expected):
    assert IsoCTS(IsoCTS.Config(common_space_fraction=fraction)).subspace_sizes(rank, n) == expected


def test_iso_cts_recovers_cancelled_task_direction():
    # τ1 = 3 e1 + 1 e3, τ2 = 2 e2 − 1 e3 + 1.5 e4 in rotated bases (eᵢ = qᵢ rᵢᵀ).
    # The sum cancels e3: Iso-C flattens (3, 2, 1.5) on e1, e2, e4 and loses e3.
    # Iso-CTS (r = 4, N = 2, fraction 0.5 → common 2, 1 per task): common = e1, e2; task 1's
    # residual is e3 (σ 1), task 2's top residual is e4 (σ 1.5) → mean(3, 2, 1, 1.5) on all four.
    q, r = orthonormal(4, 4, 13), orthonormal(4, 4, 14)
    e = [outer(q[:, i], r[:, i]) for i in range(4)]
    base = torch.zeros(4, 4, dtype=D)
    tau1 = 3.0 * e[0] + 1.0 * e[2]
    tau2 = 2.0 * e[1] - 1.0 * e[2] + 1.5 * e[3]
    cts = run(IsoCTS, base, [tau1, tau2], common_space_fraction=0.5, scaling_factor=0.8)
    assert_close(cts, 0.8 * 1.875 * q @ r.T)
    isoc = run(IsoC, base, [tau1, tau2], scaling_factor=0.8)
    assert_close(isoc, 0.8 * (6.5 / 3) * (e[0] + e[1] + e[3]))


def test_iso_cts_full_common_space_equals_iso_c():
    g = torch.Generator().manual_seed(15)
    base = torch.randn(7, 5, generator=g, dtype=D)
    xs = [base + torch.randn(7, 5, generator=g, dtype=D) for _ in range(3)]
    assert_close(run(IsoCTS, base, xs, common_space_fraction=1.0), run(IsoC, base, xs), tol=1e-12)


def test_iso_cts_random_output_is_isotropic_and_spans_tasks():
    g = torch.Generator().manual_seed(16)
    base = torch.randn(8, 6, generator=g, dtype=D)
    taus = [torch.randn(8, 6, generator=g, dtype=D) for _ in range(2)]
    out = run(IsoCTS, base, [base + t for t in taus], common_space_fraction=0.5)
    s = torch.linalg.svdvals(out - base)
    assert float(s.max() - s.min()) < 1e-9 * float(s.mean())
    assert s.numel() == 6 and float(s.min()) > 0  # k + N·p = 2 + 2·2 directions, full rank
    # the isotropic value is the mean of the 2 common σ of Στ and each task's top-2 residual σ
    total = sum(taus)
    ut, st, _ = torch.linalg.svd(total)
    common = ut[:, :2]
    residual_s = [torch.linalg.svdvals(t - common @ common.T @ t)[:2] for t in taus]
    expected = torch.cat([st[:2], *residual_s]).mean()
    assert math.isclose(float(s.mean()), float(expected), rel_tol=1e-10)


def test_iso_cts_non_matrix_tensors_are_averaged():
    base = torch.zeros(3, dtype=D)
    xs = [torch.tensor([1.0, 2.0, 3.0], dtype=D), torch.tensor([3.0, 2.0, 1.0], dtype=D)]
    assert_close(run(IsoCTS, base, xs, scaling_factor=1.5), torch.full((3,), 3.0, dtype=D))
