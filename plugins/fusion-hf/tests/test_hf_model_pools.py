"""Model pools: lazy loading, streaming readers under the model's own names, auto classes, heads, pickle."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from fusion_hf.model_pools import (  # noqa: E402
    CausalLMPool,
    CLIPVisionPool,
    HFModelPool,
    HFPoolConfig,
    HFPoolFields,
    Seq2SeqPool,
    SeqClassificationPool,
    SeqClassificationPoolConfig,
)

from fusion_core.errors import ConfigError, InputError  # noqa: E402


def clip_pool(assets, **kw):
    return CLIPVisionPool(HFPoolFields(base=str(assets["base"]), models={k: str(v) for k, v in assets["ft"].items()}, **kw))


@pytest.fixture
def no_loading(monkeypatch):
    """Make any model or dataset load fail loudly."""
    import datasets
    import fusion_hf.loading

    def refuse(*a, **k):
        raise AssertionError("something was loaded")

    monkeypatch.setattr(fusion_hf.loading, "load_pretrained", refuse)
    monkeypatch.setattr(datasets, "load_dataset", refuse)
    monkeypatch.setattr(datasets, "load_from_disk", refuse)


def test_construction_validate_describe_and_dry_run_load_nothing(clip_assets, no_loading, tmp_path):
    from hf_testkit import clip_run_config

    import fusion_core

    pool = clip_pool(clip_assets)
    pool.validate()
    described = pool.describe()
    assert described["auto_class"] == "CLIPVisionModel"
    assert described["base"] == str(clip_assets["base"])
    assert "would_fetch" not in described
    plan = fusion_core.run(clip_run_config(clip_assets, tmp_path / "dry"), dry_run=True)
    assert plan["dry_run"] is True
    assert set(plan["plan"]["taskpool"]["tasks"]) == {"animals", "digits"}
    assert not (tmp_path / "dry").exists()


def test_reader_streams_the_vision_tower_under_the_model_names_without_loading(clip_assets, no_loading):
    from fusion_hf.keymap import MappedReader
    from safetensors.torch import load_file

    pool = clip_pool(clip_assets)
    files = {"base": load_file(str(clip_assets["base"] / "model.safetensors")),
             "animals": load_file(str(clip_assets["ft"]["animals"] / "model.safetensors"))}
    for name, label in ((None, "base"), ("animals", "animals")):
        reader = pool.reader(name)
        assert isinstance(reader, MappedReader)
        keys = reader.keys()
        assert "embeddings.patch_embedding.weight" in keys and not any(k.startswith("text_model") for k in keys)
        assert len(keys) == 39
        for key in keys:
            assert torch.equal(reader.get(key), files[label]["vision_model." + key])
        assert torch.equal(reader.get_rows("embeddings.position_embedding.weight", 2, 5),
                           files[label]["vision_model.embeddings.position_embedding.weight"][2:5])
        reader.close()


def test_reader_keys_match_the_loaded_model_state_dict(clip_assets):
    pool = clip_pool(clip_assets)
    reader = pool.reader("digits")
    state = pool.load_model("digits").state_dict()
    assert sorted(reader.keys()) == sorted(state)
    assert all(torch.equal(reader.get(k), state[k]) for k in state)


def test_stream_false_reads_from_the_loaded_model(clip_assets):
    from fusion_core.engine.readers import StateDictReader

    reader = clip_pool(clip_assets, stream=False).reader("animals")
    assert isinstance(reader, StateDictReader) and len(reader.keys()) == 39


def test_load_model_returns_a_fresh_model_each_time(clip_assets):
    pool = clip_pool(clip_assets)
    a, b = pool.load_model(None), pool.load_model(None)
    assert a is not b
    with torch.no_grad():
        a.embeddings.patch_embedding.weight.add_(1.0)
    assert not torch.equal(a.embeddings.patch_embedding.weight, b.embeddings.patch_embedding.weight)


def test_generic_pool_picks_the_auto_class_from_task_or_auto_class(text_assets):
    from transformers import GPT2LMHeadModel, GPT2Model

    lm = HFModelPool(HFPoolConfig(base=str(text_assets["gpt2_base"]), models={"a": str(text_assets["gpt2_ft1"])}, task="causal-lm"))
    assert lm.auto_class == "AutoModelForCausalLM"
    assert isinstance(lm.load_model("a"), GPT2LMHeadModel)
    plain = HFModelPool(HFPoolConfig(base=str(text_assets["gpt2_base"]), models={"a": str(text_assets["gpt2_ft1"])}))
    model = plain.load_model(None)
    assert isinstance(model, GPT2Model)
    reader = plain.reader(None)  # LM checkpoint keys 'transformer.h.0…' → GPT2Model keys 'h.0…'
    assert sorted(reader.keys()) == sorted(model.state_dict())
    with pytest.raises(ConfigError, match="task 'seq2seq' means auto_class 'AutoModelForSeq2SeqLM'"):
        _ = HFModelPool(HFPoolConfig(base="x/y", models={}, task="seq2seq", auto_class="CLIPModel")).auto_class


def test_auto_class_is_an_allowlist_in_the_config():
    from fusion_core.config import make_config

    with pytest.raises(ConfigError, match="auto_class: expected 'AutoModel'"):
        make_config(HFPoolConfig, {"auto_class": "os.system"}, where="modelpool")


def test_causal_lm_pool_merges_tied_weights_and_rebuilds_the_model(text_assets):
    from fusion_merging.basic import METHODS

    from fusion_core.engine.stream import merge_pool
    from fusion_core.run_context import RunContext

    average = next(m for m in METHODS if m.name == "simple_average")
    pool = CausalLMPool(HFPoolFields(models={"a": str(text_assets["gpt2_ft1"]), "b": str(text_assets["gpt2_ft2"])}))
    merged = merge_pool(average(average.Config()), pool, RunContext(show_progress=False))
    model = pool.model_from_state_dict(merged)
    a, b = pool.load_model("a").state_dict(), pool.load_model("b").state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, (a[key] + b[key]) / 2, rtol=0, atol=1e-7)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # still tied


def test_seq2seq_pool_loads_t5_and_streams_all_parameters(text_assets):
    from transformers import T5ForConditionalGeneration

    pool = Seq2SeqPool(HFPoolFields(base=str(text_assets["t5_base"]), models={"ft": str(text_assets["t5_ft"])}))
    pool.validate()
    model = pool.load_model("ft")
    assert isinstance(model, T5ForConditionalGeneration)
    reader = pool.reader("ft")
    state = model.state_dict()
    assert set(reader.keys()) <= set(state)
    assert all(torch.equal(reader.get(k), state[k]) for k in reader.keys())


def test_sequence_classification_pool_keeps_per_task_heads_out_of_the_merge(text_assets):
    pool = SeqClassificationPool(SeqClassificationPoolConfig(base=str(text_assets["gpt2_base"]),
                                                             models={"two": str(text_assets["gpt2_cls0"]), "three": str(text_assets["gpt2_cls1"])}))
    pool.validate()
    keys = pool.reader("two").keys()
    assert keys and all(k.startswith("transformer.") for k in keys)
    base = pool.load_model(None)
    heads = base.fusion_task_heads
    assert {k: v.shape[0] for k, v in heads["two"].items()} == {"score.weight": 2}
    assert {k: v.shape[0] for k, v in heads["three"].items()} == {"score.weight": 3}
    assert torch.equal(heads["three"]["score.weight"], pool.load_model("three").score.weight)


def test_pickle_weights_are_refused_unless_allowed(text_assets, tmp_path):
    import shutil

    from transformers import GPT2LMHeadModel

    folder = tmp_path / "pickled"
    shutil.copytree(text_assets["gpt2_ft1"], folder)
    state = GPT2LMHeadModel.from_pretrained(folder).state_dict()
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    fields = dict(base=str(text_assets["gpt2_base"]), models={"p": str(folder)})
    with pytest.raises(InputError, match="holds only pickle weights .*allow_pickle: true"):
        CausalLMPool(HFPoolFields(**fields)).validate()
    pool = CausalLMPool(HFPoolFields(**fields, allow_pickle=True))
    pool.validate()
    loaded = pool.load_model("p").state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_trust_remote_code_is_off_unless_configured(clip_assets, monkeypatch):
    from transformers import CLIPVisionModel

    seen = []
    original = CLIPVisionModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append((kwargs.get("trust_remote_code"), kwargs.get("use_safetensors"), kwargs.get("local_files_only")))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(CLIPVisionModel, "from_pretrained", classmethod(spy))
    clip_pool(clip_assets).load_model(None)
    clip_pool(clip_assets, trust_remote_code=True).load_model(None)
    assert seen == [(False, True, True), (True, True, True)]


def test_hub_id_found_in_the_local_cache_loads_without_network(clip_assets, tmp_path):
    import shutil

    cache = tmp_path / "hub"
    repo = cache / "models--someorg--tiny-clip"
    shutil.copytree(clip_assets["ft"]["animals"], repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    pool = CLIPVisionPool(HFPoolFields(base=str(clip_assets["base"]), models={"hubbed": "someorg/tiny-clip"}, cache_dir=str(cache)))
    pool.validate()
    assert pool.describe()["models"]["hubbed"].startswith("someorg/tiny-clip@main (hub cache: ")
    expected = pool.load_model("hubbed").state_dict()
    direct = CLIPVisionPool(HFPoolFields(base=str(clip_assets["base"]), models={"a": str(clip_assets["ft"]["animals"])})).load_model("a").state_dict()
    assert all(torch.equal(expected[k], direct[k]) for k in direct)
    assert sorted(pool.reader("hubbed").keys()) == sorted(direct)
