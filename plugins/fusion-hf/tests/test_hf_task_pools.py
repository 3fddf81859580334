"""Text classification (per-task heads) and causal-LM perplexity against direct computations; dataset sources."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from fusion_hf.task_pools.perplexity import CausalLMPerplexity, PerplexityConfig  # noqa: E402
from fusion_hf.task_pools.text_classification import TextClassification, TextClassificationConfig  # noqa: E402

from fusion_core.errors import InputError  # noqa: E402

TEXTS = ["this movie is great", "this movie was awful", "a very good movie", "not good", "bad and awful", "fine", "the dog is great",
         "a cat is not bad"]


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    """The same rows as csv, jsonl and parquet; labels 0..2."""
    import pandas as pd

    root = tmp_path_factory.mktemp("textdata")
    frame = pd.DataFrame({"text": TEXTS, "label": [i % 3 for i in range(len(TEXTS))]})
    frame.to_csv(root / "rows.csv", index=False)
    frame.to_json(root / "rows.jsonl", orient="records", lines=True)
    frame.to_parquet(root / "rows.parquet")
    frame.assign(label=frame.label % 2).to_csv(root / "binary.csv", index=False)
    return root


def direct_classification(model, tokenizer, texts, labels):
    with torch.no_grad():
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        logits = model(**enc).logits
    labels = torch.tensor(labels)
    return int((logits.argmax(-1) == labels).sum()) / len(labels), float(torch.nn.functional.cross_entropy(logits, labels))


def test_text_classification_uses_each_tasks_own_head(text_assets, text_files):
    from fusion_hf.model_pools import SeqClassificationPool, SeqClassificationPoolConfig
    from transformers import AutoTokenizer, GPT2ForSequenceClassification

    pool = SeqClassificationPool(SeqClassificationPoolConfig(base=str(text_assets["gpt2_base"]),
                                                             models={"binary": str(text_assets["gpt2_cls0"]), "three": str(text_assets["gpt2_cls1"])}))
    tasks = {"binary": {"dataset": "csv", "data_files": str(text_files / "binary.csv"), "split": "train"},
             "three": {"dataset": "parquet", "data_files": {"test": str(text_files / "rows.parquet")}}}
    taskpool = TextClassification(TextClassificationConfig(tokenizer=str(text_assets["gpt2_base"]), tasks=tasks, batch_size=3,
                                                           cache_dir=str(text_files / "cache")))
    taskpool.validate()
    base = pool.load_model(None)  # backbone of the base, heads of the fine-tuned models
    results = taskpool.evaluate(base)
    tokenizer = AutoTokenizer.from_pretrained(text_assets["gpt2_base"])
    for task, folder, labels in (("binary", "gpt2_cls0", [i % 3 % 2 for i in range(8)]), ("three", "gpt2_cls1", [i % 3 for i in range(8)])):
        reference = GPT2ForSequenceClassification.from_pretrained(text_assets[folder]).eval()
        reference.transformer.load_state_dict(base.transformer.state_dict())
        acc, loss = direct_classification(reference, tokenizer, TEXTS, labels)
        assert results[task]["accuracy"] == pytest.approx(acc, abs=1e-12)
        assert results[task]["loss"] == pytest.approx(loss, rel=1e-5)
    assert base.score.weight.shape[0] == 2  # the base's own head is back after evaluation
    with pytest.raises(InputError, match="task 'three': labels span 0..2 but the model's head has 2 outputs"):
        taskpool.evaluate(pool.load_model("binary"), tasks=["three"])


def test_bert_classifier_on_json_lines(text_assets, text_files):
    from transformers import AutoTokenizer, BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(text_assets["bert_base"]).eval()
    fields = {"dataset": "json", "data_files": str(text_files / "binary.csv").replace("binary.csv", "rows.jsonl"), "split": "train"}
    taskpool = TextClassification(TextClassificationConfig(tokenizer=str(text_assets["bert_base"]), tasks={"t": fields},
                                                           cache_dir=str(text_files / "cache")))
    with pytest.raises(InputError, match="labels span 0..2 but the model's head has 2 outputs"):
        taskpool.evaluate(model)
    binary = TextClassification(TextClassificationConfig(tokenizer=str(text_assets["bert_base"]), cache_dir=str(text_files / "cache"),
                                                         tasks={"t": {"dataset": "csv", "data_files": str(text_files / "binary.csv"), "split": "train"}}))
    acc, loss = direct_classification(model, AutoTokenizer.from_pretrained(text_assets["bert_base"]), TEXTS, [i % 3 % 2 for i in range(8)])
    result = binary.evaluate(model)["t"]
    assert (result["accuracy"], result["samples"]) == (pytest.approx(acc, abs=1e-12), 8.0)
    assert result["loss"] == pytest.approx(loss, rel=1e-5)


def test_perplexity_matches_a_direct_token_weighted_computation(text_assets, text_files):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(text_assets["gpt2_ft1"]).eval()
    taskpool = CausalLMPerplexity(PerplexityConfig(tokenizer=str(text_assets["gpt2_base"]), batch_size=3, cache_dir=str(text_files / "cache"),
                                                   tasks={"reviews": {"dataset": "csv", "data_files": {"test": str(text_files / "rows.csv")}}}))
    assert taskpool.primary_metric() == "perplexity"
    result = taskpool.evaluate(model)["reviews"]
    tokenizer = AutoTokenizer.from_pretrained(text_assets["gpt2_base"])
    nll, count = 0.0, 0
    with torch.no_grad():
        for text in TEXTS:  # one text at a time: no padding involved
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            out = model(input_ids=ids, labels=ids)
            n = ids.shape[1] - 1
            nll += float(out.loss) * n
            count += n
    assert result["tokens"] == count
    assert result["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_split_missing_in_local_files_lists_the_splits(text_files):
    from fusion_hf.data import DatasetFields, load_split

    with pytest.raises(InputError, match="split 'test' not found in data_files .*; available splits: train"):
        load_split(DatasetFields(dataset="csv", data_files=str(text_files / "rows.csv")), "task 'x'", cache_dir=str(text_files / "cache"))
    ds = load_split(DatasetFields(dataset="csv", data_files=str(text_files / "rows.csv"), split="train", max_samples=5), "task 'x'",
                    cache_dir=str(text_files / "cache"))
    assert ds["text"] == TEXTS[:5]


def test_dry_run_checks_csv_headers_and_saved_splits(text_files, tmp_path):
    import datasets
    from fusion_hf.data import DatasetFields, check_dataset

    with pytest.raises(InputError, match="column 'sentence' not found in .*rows.csv; columns: text, label"):
        check_dataset(DatasetFields(dataset="csv", data_files=str(text_files / "rows.csv")), "task 'x'", ["sentence"])
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": ["a"], "label": [0]})}).save_to_disk(str(tmp_path / "saved"))
    assert check_dataset(DatasetFields(dataset=str(tmp_path / "saved"), split="validation"), "task 'x'", ["text"]).startswith("local")
    with pytest.raises(InputError, match="split 'test' not found .*available splits: validation"):
        check_dataset(DatasetFields(dataset=str(tmp_path / "saved")), "task 'x'", ["text"])
    assert check_dataset(DatasetFields(dataset="glue", config="sst2", split="validation"), "t", []) == "would fetch dataset glue/sst2@main [validation]"
    line = check_dataset(DatasetFields(dataset="json", data_files=str(text_files / "rows.jsonl"), split="train"), "t", [])
    assert line == f"local json files {text_files / 'rows.jsonl'} [train]"
