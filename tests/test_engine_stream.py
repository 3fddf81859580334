"""The streaming executor: closed-form merges, chunking, two-phase kernels, validation, dtypes, determinism."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: make the shared test helpers importable
from merge_testkit import Average, Interrupting, MeanDelta, RandomDrop, TrimMax, leftovers
from safetensors.torch import load_file, save_file

from fusion_core.engine.readers import open_reader
from fusion_core.engine.stream import MergeOptions, _plan_units, merge_readers, merge_to_path
from fusion_core.engine.validate import TensorPlan
from fusion_core.errors import InputError, PluginError

torch.set_num_threads(1)


def models(n=3, seed=0, shape=(40, 6)):
    g = torch.Generator().manual_seed(seed)
    return [
        {"w": torch.randn(*shape, generator=g), "b": torch.randn(shape[1], generator=g), "pos": torch.arange(5)} for _ in range(n)
    ]


def files(tmp_path, states, prefix="m"):
    paths = []
    for i, state in enumerate(states):
        path = tmp_path / f"{prefix}{i}.safetensors"
        save_file(state, str(path))
        paths.append(open_reader(path))
    return paths


def quiet(**kw):
    return MergeOptions(notify=lambda msg: None, **kw)


def test_mean_closed_form_in_memory_and_streamed(tmp_path):
    base, a, b = models()
    expected = base["w"] + 0.5 * ((a["w"] - base["w"]) + (b["w"] - base["w"])) / 2
    merged = merge_readers(MeanDelta(MeanDelta.Config(scale=0.5)), base, [a, b], quiet())
    assert torch.allclose(merged["w"], expected, atol=1e-6) and torch.equal(merged["pos"], torch.arange(5))
    readers = files(tmp_path, [base, a, b])
    out = merge_to_path(MeanDelta(MeanDelta.Config(scale=0.5)), readers[0], readers[1:], tmp_path / "out.safetensors", quiet())
    streamed = load_file(str(out))
    assert set(streamed) == {"w", "b", "pos"} and all(torch.equal(streamed[k], merged[k]) for k in merged)


def test_no_base_average_and_needs_base_error():
    a, b, c = models()
    merged = merge_readers(Average(), None, [a, b, c], quiet())
    assert torch.allclose(merged["b"], (a["b"] + b["b"] + c["b"]) / 3, atol=1e-6)
    with pytest.raises(InputError, match="method 't_mean' needs a base model; give one with --base"):
        merge_readers(MeanDelta(), None, [a, b], quiet())


@pytest.mark.parametrize("prefetch", [True, False])
def test_chunked_elementwise_equals_whole_tensor(tmp_path, prefetch):
    states = models(3, shape=(300, 8))
    readers = files(tmp_path, states)
    whole = merge_to_path(MeanDelta(), readers[0], readers[1:], tmp_path / "whole.safetensors", quiet(prefetch=prefetch))
    chunked = merge_to_path(
        MeanDelta(), readers[0], readers[1:], tmp_path / "chunked.safetensors", quiet(chunk_bytes=1000, prefetch=prefetch)
    )
    assert whole.read_bytes() == chunked.read_bytes()


def test_units_respect_the_chunk_budget():
    plan = TensorPlan("w", (1000, 16), torch.float32)
    units = _plan_units(MeanDelta(), [plan], n_inputs=5, n_models=4, itemsize=4, chunk_bytes=10_000)
    rows = [(u.start, u.stop) for u in units]
    assert all(u.step == "rows" for u in units) and rows[0] == (0, 31) and rows[-1][1] == 1000
    assert all((stop - start) * 16 * 4 * 5 <= 10_000 for start, stop in rows)  # every unit, all inputs together, fits
    assert [u.last for u in units].count(True) == 1 and units[-1].last
    two_phase = _plan_units(TrimMax(), [plan], n_inputs=5, n_models=4, itemsize=4, chunk_bytes=10_000)
    assert [u.step for u in two_phase[:5]] == ["stats"] * 4 + ["rows"] and [u.index for u in two_phase[:4]] == [0, 1, 2, 3]
    whole = _plan_units(RandomDrop(), [plan], n_inputs=5, n_models=4, itemsize=4, chunk_bytes=10_000)
    assert [u.step for u in whole] == ["whole"]  # neither elementwise nor two-phase: whole tensors


def test_two_phase_kernel_matches_whole_tensor_kernel(tmp_path):
    states = models(4, shape=(500, 4))
    base, *rest = states
    tau = [m["w"] - base["w"] for m in rest]
    expected = base["w"] + sum(torch.where(t.abs() >= 0.5 * t.abs().max(), t, torch.zeros_like(t)) for t in tau)
    readers = files(tmp_path, states)
    TrimMax.calls.clear()
    whole = merge_to_path(TrimMax(), readers[0], readers[1:], tmp_path / "whole.safetensors", quiet())
    assert TrimMax.calls["kernel"] == 2  # w and b (pos is copied)
    TrimMax.calls.clear()
    chunked = merge_to_path(TrimMax(), readers[0], readers[1:], tmp_path / "chunked.safetensors", quiet(chunk_bytes=2000))
    # w (large): one engine stats pass per model, no kernel call; b (small): the whole-tensor kernel
    assert TrimMax.calls == {"stats": 3 + 3, "kernel": 1}
    assert torch.allclose(load_file(str(whole))["w"], expected, atol=1e-6)
    assert whole.read_bytes() == chunked.read_bytes()


def test_tied_weights_merge_once_and_stay_tied():
    def module(seed):
        torch.manual_seed(seed)
        emb = torch.nn.Embedding(7, 3)
        head = torch.nn.Linear(3, 7, bias=False)
        head.weight = emb.weight
        return torch.nn.ModuleDict({"emb": emb, "head": head})

    merged = merge_readers(RandomDrop(), module(0), [module(1), module(2)], quiet(seed=5))
    assert merged["head.weight"] is merged["emb.weight"]


def test_key_mismatch_names_the_tensors_and_common_keys_only(tmp_path):
    base, a, b = models()
    a = dict(a, extra=torch.ones(2))
    del b["b"]
    with pytest.raises(InputError, match=r"model 1 \(a\) has 1 extra: 'extra' \(pass --common-keys-only"):
        merge_readers(MeanDelta(), base, [StateDict(a, "a"), StateDict(b, "b")], quiet())
    notes = []
    merged = merge_readers(MeanDelta(), base, [a, b], MergeOptions(common_keys_only=True, notify=notes.append))
    assert sorted(merged) == ["pos", "w"] and notes == [
        "note: merging the 2 tensors every model has; skipping 2 that some models lack"
    ]
    with pytest.raises(InputError, match=r"model 2 \(model 2\) lacks 1 tensor\(s\) of base \(base\): 'b'"):
        merge_readers(MeanDelta(), base, [models()[1], b], quiet())


def StateDict(state, label):
    from fusion_core.engine.readers import StateDictReader

    return StateDictReader(state, label=label)


def test_shape_mismatch_names_the_tensor():
    base, a, b = models()
    b["w"] = torch.zeros(40, 7)
    with pytest.raises(
        InputError, match=r"tensor shapes differ between models: 'w' is \[40, 6\] in base \(base\) but \[40, 7\] in model 2"
    ):
        merge_readers(MeanDelta(), base, [a, b], quiet())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_names_the_tensor_and_the_input(tmp_path, bad):
    base, a, b = models()
    b["b"][2] = bad
    readers = files(tmp_path, [base, a, b])
    what = "NaN" if bad != bad else "Inf"
    with pytest.raises(InputError, match=rf"tensor 'b' of .*m2\.safetensors contains {what} values \(1 non-finite\)"):
        merge_to_path(MeanDelta(), readers[0], readers[1:], tmp_path / "out", quiet())
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_finite_check_is_not_fooled_by_overflowing_sums():
    base, a, b = models()
    for m in (base, a, b):
        m["w"][:, 0] = 3e38  # finite values whose fp32 sum overflows
    merged = merge_readers(MeanDelta(), base, [a, b], quiet())
    assert torch.isfinite(merged["w"]).all()


def test_mixed_float_dtypes_promote_and_say_so():
    base, a, b = models()
    a = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in a.items()}
    b = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in b.items()}
    notes = []
    merged = merge_readers(MeanDelta(), base, [a, b], MergeOptions(notify=notes.append))
    assert notes == [
        "note: inputs mix bfloat16 and float16 and float32 (e.g. tensor 'w'): promoting to the compute dtype and writing the base's dtype"
    ]
    expected = base["w"] + ((a["w"].float() - base["w"]) + (b["w"].float() - base["w"])) / 2
    assert merged["w"].dtype == torch.float32 and torch.allclose(merged["w"], expected, atol=1e-6)
    no_base = merge_readers(Average(), None, [a, b], quiet())
    assert no_base["w"].dtype == torch.float32  # fp16 + bf16 promote to fp32 without a base


def test_output_dtype_is_the_base_s_unless_told():
    base, a, b = (dict(m, w=m["w"].to(torch.bfloat16)) for m in models())
    assert merge_readers(MeanDelta(), base, [a, b], quiet())["w"].dtype == torch.bfloat16
    merged = merge_readers(MeanDelta(), base, [a, b], quiet(out_dtype="float16"))
    assert merged["w"].dtype == torch.float16 and merged["b"].dtype == torch.float16 and merged["pos"].dtype == torch.int64
    with pytest.raises(InputError, match="unknown output dtype 'int8'"):
        merge_readers(MeanDelta(), base, [a, b], quiet(out_dtype="int8"))


def test_non_float_tensors_copied_when_equal_else_error():
    base, a, b = models()
    b["pos"] = torch.tensor([0, 1, 2, 3, 9])
    with pytest.raises(InputError, match=r"non-float tensor 'pos' \(int64\) differs between base and model 2"):
        merge_readers(MeanDelta(), base, [a, b], quiet())
    b["pos"] = torch.arange(5, dtype=torch.int32)
    with pytest.raises(InputError, match=r"non-float tensor 'pos' has different dtypes \(int64 in base"):
        merge_readers(MeanDelta(), base, [a, b], quiet())


def test_kernel_returning_a_wrong_shape_is_a_plugin_error():
    class Bad(MeanDelta):
        name = "t_bad"

        def kernel(self, name, base, tensors, ctx):
            return base.flatten()

    with pytest.raises(PluginError, match=r"method 't_bad' returned shape \[240\] for tensor 'w' of shape \[40, 6\]"):
        base, *rest = models()
        merge_readers(Bad(), base, rest, quiet())


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    readers = files(tmp_path, models(3, shape=(64, 8)))

    def run(name, seed, **kw):
        return sha(merge_to_path(RandomDrop(), readers[0], readers[1:], tmp_path / name, quiet(seed=seed, **kw)))

    first = run("a.safetensors", 7)
    assert run("b.safetensors", 7, prefetch=False) == first
    assert run("c.safetensors", 8) != first
    in_memory = merge_readers(RandomDrop(), models(3, shape=(64, 8))[0], models(3, shape=(64, 8))[1:], quiet(seed=7))
    assert torch.equal(load_file(str(tmp_path / "a.safetensors"))["w"], in_memory["w"])


def test_interrupt_mid_merge_leaves_no_output(tmp_path):
    states = [{"transformer.h.0.attn.c_attn.weight": s["w"], "transformer.h.1.attn.c_attn.weight": s["w"] * 2} for s in models()]
    readers = files(tmp_path, states)
    with pytest.raises(KeyboardInterrupt):
        merge_to_path(Interrupting(), readers[0], readers[1:], tmp_path / "out", quiet(shard_size=100))
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
