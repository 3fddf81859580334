"""Readers and the writer of the merge engine: headers, row reads, shards, index, atomic output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fusion_core.engine.readers import ModuleReader, PickleReader, SafetensorsReader, ShardedReader, StateDictReader, open_reader
from fusion_core.engine.writer import ModelWriter, atomic_output, parse_size, save_state_dict_folder
from fusion_core.errors import ConfigError, InputError
from fusion_core.output import MARKER

torch.set_num_threads(1)


def tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "emb": torch.randn(10, 4, generator=g),
        "half": torch.randn(3, 5, generator=g).to(torch.float16),
        "bf": torch.randn(7, generator=g).to(torch.bfloat16),
        "ids": torch.arange(6, dtype=torch.int64),
        "flag": torch.tensor([True, False]),
        "scalar": torch.tensor(2.5),
    }


def test_safetensors_reader_headers_full_and_row_reads(tmp_path):
    state = tensors()
    save_file(state, str(tmp_path / "m.safetensors"))
    reader = open_reader(tmp_path / "m.safetensors")
    assert isinstance(reader, SafetensorsReader)
    assert set(reader.keys()) == set(state)
    for key, value in state.items():
        assert reader.shape(key) == tuple(value.shape) and reader.dtype(key) == value.dtype
        assert torch.equal(reader.get(key), value)
    assert torch.equal(reader.get_rows("emb", 3, 7), state["emb"][3:7])
    assert torch.equal(reader.get_rows("bf", 5, 99), state["bf"][5:])
    assert torch.equal(reader.get_rows("scalar", 0, 1), state["scalar"])
    reader.close()


def test_sharded_folder_reader_follows_the_index(tmp_path):
    state = tensors()
    save_file({k: state[k] for k in ("emb", "ids")}, str(tmp_path / "a.safetensors"))
    save_file({k: state[k] for k in ("half", "bf", "flag", "scalar")}, str(tmp_path / "b.safetensors"))
    weight_map = {
        "emb": "a.safetensors",
        "ids": "a.safetensors",
        "half": "b.safetensors",
        "bf": "b.safetensors",
        "flag": "b.safetensors",
        "scalar": "b.safetensors",
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    reader = open_reader(tmp_path)
    assert isinstance(reader, ShardedReader) and reader.folder == tmp_path
    assert set(reader.keys()) == set(state)
    assert all(torch.equal(reader.get(k), v) for k, v in state.items())
    assert torch.equal(reader.get_rows("half", 1, 3), state["half"][1:3])


def test_index_naming_a_missing_shard_or_tensor_is_an_input_error(tmp_path):
    save_file({"x": torch.ones(2)}, str(tmp_path / "a.safetensors"))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"x": "a.safetensors", "y": "gone.safetensors"}}))
    with pytest.raises(InputError, match="names shard gone.safetensors which is missing"):
        open_reader(tmp_path)
    index.write_text(json.dumps({"weight_map": {"x": "a.safetensors", "y": "a.safetensors"}}))
    with pytest.raises(InputError, match="puts tensor 'y' in a.safetensors, which does not hold it"):
        open_reader(tmp_path)


def test_truncated_and_corrupt_files_name_the_file(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(path))
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(InputError, match=r"cut\.safetensors is truncated: tensor 'w' ends at byte"):
        open_reader(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(InputError, match=r"junk\.safetensors has a corrupt safetensors header"):
        open_reader(tmp_path / "junk.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    with pytest.raises(InputError, match=r"tiny\.safetensors is not a safetensors file"):
        open_reader(tmp_path / "tiny.safetensors")
    (tmp_path / "huge.safetensors").write_bytes((10**6).to_bytes(8, "little") + b"{}")
    with pytest.raises(InputError, match=r"huge\.safetensors is not a valid safetensors file \(header length 1000000"):
        open_reader(tmp_path / "huge.safetensors")


def test_pickle_is_refused_unless_opted_in(tmp_path):
    state = {"w": torch.randn(3, 2), "b": torch.arange(3)}
    torch.save(state, tmp_path / "m.bin")
    with pytest.raises(InputError, match=r"m\.bin is a pickle checkpoint.*--allow-pickle"):
        open_reader(tmp_path / "m.bin")
    folder = tmp_path / "hf"
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(InputError, match="pickle checkpoint"):
        open_reader(folder)
    reader = open_reader(tmp_path / "m.bin", allow_pickle=True)
    assert isinstance(reader, PickleReader) and all(torch.equal(reader.get(k), v) for k, v in state.items())
    assert torch.equal(open_reader(folder, allow_pickle=True).get("w"), state["w"])


def test_missing_path_and_unknown_format(tmp_path):
    with pytest.raises(InputError, match="model path not found"):
        open_reader(tmp_path / "nope")
    (tmp_path / "m.npz").write_bytes(b"x")
    with pytest.raises(InputError, match="unknown model format '.npz'"):
        open_reader(tmp_path / "m.npz")


def test_in_memory_readers_report_tied_weights():
    emb = torch.nn.Embedding(5, 3)
    head = torch.nn.Linear(3, 5, bias=False)
    head.weight = emb.weight
    module = torch.nn.ModuleDict({"emb": emb, "head": head})
    reader = ModuleReader(module)
    assert reader.keys() == ["emb.weight", "head.weight"]
    assert reader.aliases() == {"head.weight": "emb.weight"}
    assert StateDictReader({"a": torch.ones(2), "b": torch.ones(2)}).aliases() == {}
    with pytest.raises(InputError, match="entry 'x' is a int, not a tensor"):
        StateDictReader({"x": 3})


@pytest.mark.parametrize(
    ("text", "expected"), [("2GB", 2 * 10**9), ("500MB", 5 * 10**8), ("1GiB", 2**30), ("4096", 4096), ("1.5kb", 1500)]
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "2 parsecs", "-1GB", "0"])
def test_parse_size_rejects_nonsense(text):
    with pytest.raises(ConfigError, match="bad size"):
        parse_size(text)


def test_writer_plans_shards_and_index_and_round_trips(tmp_path):
    state = tensors()
    order = ["emb", "half", "bf", "ids", "flag", "scalar"]
    entries = [(k, tuple(state[k].shape), state[k].dtype) for k in order]
    out = tmp_path / "out"
    writer = ModelWriter(out, entries, shard_size=60)  # emb (160 B) alone, then half+bf (44 B), then ids+flag+scalar (54 B)
    writer.write("emb", state["emb"][:4], 0)
    writer.write("emb", state["emb"][4:], 4)
    for k in order[1:]:
        writer.write(k, state[k])
    writer.finish()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in state.values())
    assert index["weight_map"] == {
        "emb": files[0],
        "half": files[1],
        "bf": files[1],
        "ids": files[2],
        "flag": files[2],
        "scalar": files[2],
    }
    loaded = {}
    for name in files:
        loaded.update(load_file(str(out / name)))  # the reference safetensors reader accepts our files
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], v) for k, v in state.items())


def test_writer_refuses_incomplete_output(tmp_path):
    writer = ModelWriter(tmp_path / "o.safetensors", [("a", (4,), torch.float32), ("b", (2,), torch.float32)], single_file=True)
    writer.write("a", torch.ones(4))
    with pytest.raises(InputError, match="output tensors not written: b"):
        writer.finish()


def test_atomic_output_leaves_nothing_on_error_and_replaces_only_fuse_outputs(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.mkdir()
            (tmp / "x").write_text("partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InputError, match="does not exist; create it first"):  # parents are never made silently
        with atomic_output(tmp_path / "new" / "deeper" / "out"):
            pass
    assert list(tmp_path.iterdir()) == []
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("years of work")
    with pytest.raises(InputError, match="already exists and was not written by fuse"):
        with atomic_output(theirs, overwrite=True):
            pass
    assert (theirs / "thesis.tex").read_text() == "years of work"
    with atomic_output(target) as tmp:
        tmp.mkdir()
        (tmp / "old").write_text("old")
    assert (target / MARKER).is_file()  # the marker that makes it replaceable
    with pytest.raises(InputError, match="already exists; pass --overwrite"):
        with atomic_output(target):
            pass
    with atomic_output(target, overwrite=True) as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == [MARKER, "new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "theirs"]


def test_save_state_dict_folder_stores_tied_tensors_once(tmp_path):
    emb = torch.nn.Embedding(5, 3)
    head = torch.nn.Linear(3, 5, bias=False)
    head.weight = emb.weight
    state = torch.nn.ModuleDict({"emb": emb, "head": head}).state_dict()
    out = save_state_dict_folder(state, tmp_path / "saved", recipe={"method": "demo", "seed": 3})
    loaded = load_file(str(out / "model.safetensors"))
    assert list(loaded) == ["emb.weight"] and torch.equal(loaded["emb.weight"], emb.weight.detach())
    card = (out / "README.md").read_text()
    assert "method: demo" in card and "seed: 3" in card and "head.weight: emb.weight" in card and "fusion-core:" in card
    single = save_state_dict_folder({"w": torch.ones(2)}, tmp_path / "one.safetensors")
    assert torch.equal(load_file(str(single))["w"], torch.ones(2))


def test_output_folder_brings_the_sub_folders_modules_json_names(tmp_path, capsys):
    """A sentence-transformers base: `1_Pooling/` (named by modules.json) comes along; nothing outside the base does."""
    import json as _json
    import os

    from fusion_core.engine.writer import copy_model_files

    base = tmp_path / "st"
    (base / "1_Pooling").mkdir(parents=True)
    (base / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    (base / "2_Normalize").mkdir()
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "key.txt").write_text("x")
    os.symlink(outside, base / "3_Link")
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        {"idx": 3, "name": "3", "path": "3_Link", "type": "x"},
        {"idx": 4, "name": "4", "path": "../secret", "type": "x"},
    ]
    (base / "modules.json").write_text(_json.dumps(modules))
    out = tmp_path / "out"
    out.mkdir()
    copy_model_files(base, out)
    assert (out / "1_Pooling" / "config.json").read_text() == '{"pooling_mode_mean_tokens": true}'
    assert (out / "modules.json").exists() and (out / "2_Normalize").is_dir()
    assert sorted(p.name for p in out.iterdir()) == ["1_Pooling", "2_Normalize", "modules.json"]


def test_a_buffer_only_some_inputs_store_is_taken_from_the_base(tmp_path, capsys, monkeypatch):
    """An old checkpoint's `embeddings.position_ids` (a non-persistent buffer) does not block a merge."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from merge_testkit import use_test_plugins

    use_test_plugins(monkeypatch)
    import torch
    from safetensors.torch import load_file, save_file

    from fusion_core.cli.main import main

    gen = torch.Generator().manual_seed(0)
    w = {name: torch.randn(4, 4, generator=gen) for name in ("base", "a", "b")}
    ids = torch.arange(8).reshape(1, 8)
    save_file({"emb.weight": w["base"], "embeddings.position_ids": ids}, str(tmp_path / "base.safetensors"))
    save_file({"emb.weight": w["a"]}, str(tmp_path / "a.safetensors"))
    save_file({"emb.weight": w["b"], "embeddings.position_ids": ids}, str(tmp_path / "b.safetensors"))
    code = main(
        ["merge", "t_mean", "--base", str(tmp_path / "base.safetensors"), "--model", str(tmp_path / "a.safetensors"),
         "--model", str(tmp_path / "b.safetensors"), "-o", str(tmp_path / "out.safetensors")]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0, err
    assert "note: 'embeddings.position_ids' (a non-persistent buffer) is stored by only some inputs; taken from base" in " ".join(err.split())
    out = load_file(str(tmp_path / "out.safetensors"))
    assert torch.equal(out["embeddings.position_ids"], ids)
    assert torch.allclose(out["emb.weight"], w["base"] + ((w["a"] - w["base"]) + (w["b"] - w["base"])) / 2)
