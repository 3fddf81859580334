"""LoRA/PEFT adapters as pool entries: merged into the base on load; refused when they do not fit or peft is missing."""

from __future__ import annotations

import json
import sys

import pytest

torch = pytest.importorskip("torch")

from fusion_hf.model_pools import CLIPVisionPool, HFPoolFields  # noqa: E402

from fusion_core.errors import InputError  # noqa: E402

R, ALPHA = 2, 8


def make_adapter(base_dir, folder, seed=0):
    peft = pytest.importorskip("peft", reason="peft is an optional extra (pip install 'fusion-hf[peft]')")
    from transformers import CLIPVisionModel

    torch.manual_seed(seed)
    model = CLIPVisionModel.from_pretrained(base_dir)
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft.get_peft_model(model, config).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def adapter(clip_assets, tmp_path_factory):
    return make_adapter(clip_assets["base"], tmp_path_factory.mktemp("lora") / "adapter")


def pool_with(clip_assets, entry):
    return CLIPVisionPool(HFPoolFields(base=str(clip_assets["base"]), models={"lora": entry, "animals": str(clip_assets["ft"]["animals"])}))


def test_adapter_is_merged_into_the_base_in_closed_form(clip_assets, adapter):
    from safetensors.torch import load_file

    pool = pool_with(clip_assets, {"adapter": str(adapter)})
    pool.validate()
    merged = pool.load_model("lora").state_dict()
    base = pool.load_model(None).state_dict()
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    changed = 0
    for key, value in base.items():
        module = key.removesuffix(".weight")
        a = lora.get(f"base_model.model.{module}.lora_A.weight")
        if a is None:
            assert torch.equal(merged[key], value), key
            continue
        b = lora[f"base_model.model.{module}.lora_B.weight"]
        torch.testing.assert_close(merged[key], value + (b @ a) * (ALPHA / R), rtol=0, atol=1e-6)
        changed += 1
    assert changed == 4  # q_proj and v_proj of 2 layers
    reader = pool.reader("lora")  # adapters are read from the merged model
    assert torch.equal(reader.get("encoder.layers.0.self_attn.q_proj.weight"), merged["encoder.layers.0.self_attn.q_proj.weight"])


def test_adapter_for_another_base_is_refused(clip_assets, adapter, tmp_path):
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(adapter, moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someone/other-clip"
    (moved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="adapter was trained on base 'someone/other-clip' but the pool's base is .*check_base: false"):
        pool_with(clip_assets, {"adapter": str(moved)}).validate()
    pool_with(clip_assets, {"adapter": str(moved), "check_base": False}).validate()


def test_adapter_with_other_shapes_is_refused_before_peft_runs(clip_assets, tmp_path):
    from hf_testkit import save_clip_base

    wide = save_clip_base(tmp_path / "wide", hidden=48)
    folder = make_adapter(wide, tmp_path / "wide_adapter")
    pool = pool_with(clip_assets, {"adapter": str(folder), "check_base": False})
    pool.validate()
    with pytest.raises(InputError, match="adapter module 'encoder.layers.0.self_attn.(q|v)_proj' expects a 48→48 layer but the base has 32→32"):
        pool.load_model("lora")


def test_missing_peft_gives_a_clear_error(clip_assets, tmp_path, monkeypatch):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(clip_assets["base"]), "peft_type": "LORA"}))
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft → ImportError
    pool = pool_with(clip_assets, {"adapter": str(folder)})
    with pytest.raises(InputError, match=r"model 'lora' is a LoRA/PEFT adapter, and merging it needs the peft package: pip install peft"):
        pool.validate()
    with pytest.raises(InputError, match="needs the peft package"):
        pool.load_model("lora")
