"""Causal-LM methods end to end: pruning with calibration text from the model pool (perplexity before and after), Mixtral upcycling."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("fusion_adaptive")

TEXTS = ["this movie is great and the dog is great", "a very good movie", "not good , bad and awful", "the cat is not bad",
         "fine", "this movie was awful and not good"]


@pytest.fixture(scope="module")
def lm_text(tmp_path_factory):
    import pandas as pd

    root = tmp_path_factory.mktemp("lmtext")
    pd.DataFrame({"text": TEXTS}).to_csv(root / "calib.csv", index=False)
    pd.DataFrame({"text": TEXTS[::-1]}).to_csv(root / "test.csv", index=False)
    return root


def lm_config(text_assets, lm_text, method: dict) -> dict:
    base = str(text_assets["gpt2_base"])
    return {
        "method": method,
        "modelpool": {"name": "hf_causal_lm", "base": base, "models": {"wiki": base}, "batch_size": 3, "max_length": 6,
                      "datasets": {"wiki": {"dataset": "csv", "data_files": {"train": str(lm_text / "calib.csv")},
                                            "splits": {"train": "train"}}}},
        "taskpool": {"name": "causal_lm_perplexity", "tokenizer": base, "batch_size": 4,
                     "tasks": {"wiki": {"dataset": "csv", "data_files": {"test": str(lm_text / "test.csv")}}}},
        "seed": 0,
    }


def test_lm_data_are_full_windows_of_the_joined_texts(text_assets, lm_text):
    from fusion_hf.model_pools import CausalLMPool
    from transformers import AutoTokenizer

    from fusion_core.config import make_config

    fields = {k: v for k, v in lm_config(text_assets, lm_text, {"name": "dummy"})["modelpool"].items() if k != "name"}
    pool = CausalLMPool(make_config(CausalLMPool.Config, fields))
    batches = list(pool.data("wiki", "train"))
    tok = AutoTokenizer.from_pretrained(text_assets["gpt2_base"])
    stream = []
    for text in TEXTS[:3]:
        stream += tok(text)["input_ids"] + [tok.eos_token_id]
    first = batches[0]
    assert first["input_ids"].shape[1] == 6 and bool(first["attention_mask"].all())
    assert first["input_ids"].flatten().tolist() == stream[: first["input_ids"].numel()]
    assert first["input_ids"].shape[0] == len(stream) // 6


@pytest.mark.parametrize("method", [{"name": "sparsegpt_pruning"}, {"name": "wanda_pruning"}, {"name": "magnitude_pruning"}, {"name": "random_pruning"},
                                    {"name": "sparsegpt_pruning", "prune_type": "semistructured"}])
def test_pruning_methods_report_perplexity_before_and_after(text_assets, lm_text, method):
    import fusion_core

    torch.set_num_threads(1)
    report = fusion_core.run(lm_config(text_assets, lm_text, method), write=False)
    before, after = report["results"]["pretrained"]["wiki"], report["results"]["merged"]["wiki"]
    assert report["primary_metric"] == "perplexity"
    assert before["tokens"] == after["tokens"] > 0
    assert after["perplexity"] != before["perplexity"] and after["perplexity"] > 1.0
    sparsity = report["method_extras"][method["name"]]["sparsity"]  # every pruning method records it the same way
    assert set(sparsity) == {f"transformer.h.{i}.{m}" for i in (0, 1) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert all(v == pytest.approx(0.5) for v in sparsity.values())


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    from hf_testkit import make_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=99, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    LlamaForCausalLM(config).eval().save_pretrained(root / "base")
    make_tokenizer(max_length=64).save_pretrained(root / "base")
    return root / "base"


def test_mixtral_upcycling_keeps_the_dense_perplexity_and_saves_a_mixtral(llama_folder, lm_text, tmp_path):
    from transformers import AutoModelForCausalLM

    import fusion_core

    torch.set_num_threads(1)
    config = {
        "method": {"name": "mixtral_upcycling", "num_experts": 4, "experts_per_token": 2},
        "modelpool": {"name": "hf_causal_lm", "base": str(llama_folder), "models": {"wiki": str(llama_folder)}},  # the pool needs a model
        "taskpool": {"name": "causal_lm_perplexity", "tokenizer": str(llama_folder), "batch_size": 4,
                     "tasks": {"wiki": {"dataset": "csv", "data_files": {"test": str(lm_text / "test.csv")}}}},
        "save_model": True, "output_dir": str(tmp_path / "run"),
    }
    report = fusion_core.run(config)
    before, after = report["results"]["pretrained"]["wiki"], report["results"]["merged"]["wiki"]
    assert after["perplexity"] == pytest.approx(before["perplexity"], rel=1e-5) and after["tokens"] == before["tokens"] > 0
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert type(saved).__name__ == "MixtralForCausalLM" and saved.config.num_local_experts == 4
