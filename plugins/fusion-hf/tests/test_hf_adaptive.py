"""Data-driven methods (fusion-adaptive) on Hugging Face pools, through the adapter protocol, against direct computations.

The references are written with plain transformers code (CLIP text features, visual
projection, per-example autograd, forward hooks), independently of the pools: the
pools' data, forward, heads and evaluation must reproduce them.
"""

from __future__ import annotations

import pytest
from hf_testkit import CLIP_TASKS, TEMPLATE, add_noise, clip_run_config

torch = pytest.importorskip("torch")
pytest.importorskip("fusion_adaptive")

BOTH = ("animals", "digits")
TA_LAMBDA = 0.3


# --------------------------------------------------------------------------- direct (reference) computations


def _features(out):
    """``get_*_features`` return tensors in transformers 4 and model outputs in 5."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.fixture(scope="module")
def clip_ref(clip_assets):
    """The base CLIP and, per task, (pixel values, labels, text head × logit scale), built with transformers alone."""
    import datasets
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    torch.set_num_threads(1)
    clip = CLIPModel.from_pretrained(clip_assets["base"]).eval().requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(clip_assets["base"])
    proc = AutoImageProcessor.from_pretrained(clip_assets["base"])
    tasks = {}
    with torch.no_grad():
        for task, names in CLIP_TASKS.items():
            ds = datasets.load_from_disk(str(clip_assets["data"][task]))["test"]
            pixels = proc(images=[im.convert("RGB") for im in ds["image"]], return_tensors="pt")["pixel_values"]
            text = _features(clip.get_text_features(**tok([TEMPLATE.format(c) for c in names], padding=True, return_tensors="pt")))
            text = text / text.norm(dim=-1, keepdim=True) * clip.logit_scale.exp()
            tasks[task] = (pixels, torch.tensor(ds["label"]), text)
    return clip, tasks


def vision(clip_assets, name):
    from transformers import CLIPVisionModel

    return CLIPVisionModel.from_pretrained(clip_assets["ft"][name]).eval()


def clip_logits(clip, model, pixels, text):
    feats = clip.visual_projection(model(pixel_values=pixels).pooler_output)
    return (feats / feats.norm(dim=-1, keepdim=True)) @ text.T


def scores(logits, labels) -> tuple[float, float]:
    return int((logits.argmax(-1) == labels).sum()) / len(labels), float(torch.nn.functional.cross_entropy(logits.float(), labels))


def task_arithmetic_state(clip_assets, names, lam):
    from transformers import CLIPVisionModel

    base = CLIPVisionModel.from_pretrained(clip_assets["base"]).state_dict()
    fts = [vision(clip_assets, n).state_dict() for n in names]
    return {k: v + lam * sum(ft[k] - v for ft in fts) if v.is_floating_point() else v for k, v in base.items()}


def assert_scores(result, accuracy, loss, rel=1e-5):
    assert result["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert result["loss"] == pytest.approx(loss, rel=rel)


# --------------------------------------------------------------------------- runs


def clip_config(clip_assets, method, names=BOTH, data=True, **settings):
    config = clip_run_config(clip_assets, clip_assets["root"] / "unused", **{"evaluate_inputs": False, **settings})
    config["method"] = method
    config["modelpool"]["models"] = {n: str(clip_assets["ft"][n]) for n in names}
    config["taskpool"]["tasks"] = {n: config["taskpool"]["tasks"][n] for n in names}
    if data:  # the fixtures' datasets have only a 'test' split: the pool reads it as its 'train' data
        config["modelpool"]["datasets"] = {n: {"dataset": str(clip_assets["data"][n]), "splits": {"train": "test"}} for n in names}
        config["modelpool"]["batch_size"] = 8
    return config


def run(config):
    import fusion_core

    torch.set_num_threads(1)
    return fusion_core.run(config, write=False)


def pools(config):
    """(model pool, task pool) instances of a run config."""
    from fusion_hf.model_pools import CLIPVisionPool, DataPoolFields
    from fusion_hf.task_pools.clip_zero_shot import ClipZeroShot, ClipZeroShotConfig

    from fusion_core.config import make_config

    strip = lambda d: {k: v for k, v in d.items() if k != "name"}  # noqa: E731
    return (CLIPVisionPool(make_config(DataPoolFields, strip(config["modelpool"]))),
            ClipZeroShot(make_config(ClipZeroShotConfig, strip(config["taskpool"]))))


@pytest.fixture(scope="module")
def task_arithmetic_report(clip_assets):
    return run(clip_config(clip_assets, {"name": "task_arithmetic", "scaling_factor": TA_LAMBDA}, data=False))


# --------------------------------------------------------------------------- CLIP vision pool + clip_zero_shot


@pytest.mark.parametrize("method", ["regmean", "fisher_merging", "smile"])
def test_merging_one_model_reproduces_its_scores(clip_assets, clip_ref, method):
    fields = {"name": method, **({"rank": None, "others": "average"} if method == "smile" else {})}  # smile: one full-rank expert
    report = run(clip_config(clip_assets, fields, names=["animals"], evaluate_inputs=True))
    merged, own = report["results"]["merged"]["animals"], report["results"]["individual"]["animals"]
    clip, tasks = clip_ref
    pixels, labels, text = tasks["animals"]
    with torch.no_grad():
        accuracy, loss = scores(clip_logits(clip, vision(clip_assets, "animals"), pixels, text), labels)
    assert_scores(own, accuracy, loss)
    assert_scores(merged, accuracy, loss, rel=1e-4)
    extras = report["method_extras"][method]
    if method == "regmean":  # q, k, v, out, fc1, fc2 of 2 layers, each with inputs from the pool's data
        assert (extras["layers_solved"], extras["layers_without_inputs"]) == (12, [])
    if method == "fisher_merging":  # every example of the 'train' (= dataset 'test') split: 3 batches of 8
        assert extras["examples"] == {"animals": 24}


def test_fisher_merging_equals_the_fisher_of_the_zero_shot_head(clip_assets, clip_ref):
    """Σᵢ(Fᵢ+ε)θᵢ / Σᵢ(Fᵢ+ε) with Fᵢ from per-example gradients of −log p(y|x) through projection, normalisation and text head."""
    from fusion_adaptive.fisher import FisherMerging

    from fusion_core.run_context import RunContext

    eps = 1e-8
    pool, taskpool = pools(clip_config(clip_assets, {"name": "fisher_merging"}))
    method = FisherMerging(FisherMerging.Config(estimator="empirical", normalize="none", min_fisher=eps, num_examples=None))
    merged = method.run(pool, RunContext(show_progress=False, taskpool=taskpool))
    clip, tasks = clip_ref
    num, den = {}, {}
    for name in BOTH:
        model = vision(clip_assets, name)
        params = dict(model.named_parameters())
        pixels, labels, text = tasks[name]
        fisher = {k: torch.zeros_like(p) for k, p in params.items()}
        for j in range(len(labels)):
            loss = torch.nn.functional.cross_entropy(clip_logits(clip, model, pixels[j : j + 1], text), labels[j : j + 1])
            for (k, _), g in zip(params.items(), torch.autograd.grad(loss, list(params.values())), strict=True):
                fisher[k] += g.pow(2)
        for k, p in params.items():
            w = fisher[k] / len(labels) + eps
            num[k] = num.get(k, 0) + w * p.detach()
            den[k] = den.get(k, 0) + w
    for k in num:
        torch.testing.assert_close(merged[k], num[k] / den[k], rtol=1e-4, atol=1e-6)
    key = "encoder.layers.1.mlp.fc2.weight"
    average = (vision(clip_assets, "animals").state_dict()[key] + vision(clip_assets, "digits").state_dict()[key]) / 2
    assert (merged[key] - average).abs().max() > 1e-3  # the Fisher weighting is not the plain average


def test_regmean_solves_each_layer_on_the_pools_data(clip_assets):
    """W* = (G₁+G₂)⁻¹(G₁W₁ᵀ+G₂W₂ᵀ) with Gᵢ = XᵢᵀXᵢ/nᵢ of the layer's inputs on model i's images (α = 1)."""
    import datasets
    from fusion_adaptive.regmean import RegMean
    from transformers import AutoImageProcessor

    from fusion_core.run_context import RunContext

    pool, taskpool = pools(clip_config(clip_assets, {"name": "regmean"}))
    merged = RegMean(RegMean.Config(reduce_non_diagonal_ratio=1.0)).run(pool, RunContext(show_progress=False, taskpool=taskpool))
    proc = AutoImageProcessor.from_pretrained(clip_assets["base"])
    layer = "encoder.layers.1.mlp.fc1"
    gram_sum, gram_weight = 0, 0
    for name in BOTH:
        model = vision(clip_assets, name)
        ds = datasets.load_from_disk(str(clip_assets["data"][name]))["test"]
        rows = []
        handle = model.get_submodule(layer).register_forward_pre_hook(lambda m, args, rows=rows: rows.append(args[0].reshape(-1, args[0].shape[-1])))
        with torch.no_grad():
            model(pixel_values=proc(images=[im.convert("RGB") for im in ds["image"]], return_tensors="pt")["pixel_values"])
        handle.remove()
        x = torch.cat(rows).double()
        gram = x.T @ x / x.shape[0]
        gram_sum = gram_sum + gram
        gram_weight = gram_weight + gram @ model.get_submodule(layer).weight.detach().double().T
    expected = torch.linalg.solve(gram_sum, gram_weight).T.float()
    torch.testing.assert_close(merged[f"{layer}.weight"], expected, rtol=1e-4, atol=1e-5)
    average = (vision(clip_assets, "animals").state_dict()[f"{layer}.weight"] + vision(clip_assets, "digits").state_dict()[f"{layer}.weight"]) / 2
    assert (expected - average).abs().max() > 1e-3  # the least-squares merge differs from the average
    for key in ("post_layernorm.weight", f"{layer}.bias"):  # other tensors and biases: the average
        torch.testing.assert_close(merged[key], (vision(clip_assets, "animals").state_dict()[key] + vision(clip_assets, "digits").state_dict()[key]) / 2)


def entropy_of_task_arithmetic(clip_assets, clip_ref, batch: int) -> float:
    """Σ over tasks of the mean prediction entropy of task arithmetic (λ = 0.3) on the first `batch` test images of the task."""
    from transformers import CLIPVisionModel

    clip, tasks = clip_ref
    model = CLIPVisionModel.from_pretrained(clip_assets["base"]).eval()
    model.load_state_dict(task_arithmetic_state(clip_assets, BOTH, TA_LAMBDA))
    total = 0.0
    with torch.no_grad():
        for name in BOTH:
            pixels, _, text = tasks[name]
            log_p = clip_logits(clip, model, pixels[:batch], text).log_softmax(-1)
            total += float(-(log_p.exp() * log_p).sum(-1).mean())
    return total


@pytest.mark.parametrize("method", ["adamerging", "wemoe", "e_wemoe"])
def test_test_time_adaptation_starts_at_task_arithmetic(clip_assets, clip_ref, task_arithmetic_report, method):
    """At 0 steps AdaMerging (λ = init) and WEMoE / E-WEMoE with dense experts (routers = init; E-WEMoE's one router shared by
    every block) are task arithmetic; step 1's loss is its test entropy."""
    start = {"name": "adamerging", "granularity": "task", "init": TA_LAMBDA} if method == "adamerging" else \
        {"name": method, "init_lambda": TA_LAMBDA, "router_init": "zero_last", **({"sparsity": 0.0} if method == "e_wemoe" else {})}
    zero = run(clip_config(clip_assets, {**start, "steps": 0}, data=False))
    for task in BOTH:
        expected = task_arithmetic_report["results"]["merged"][task]
        assert_scores(zero["results"]["merged"][task], expected["accuracy"], expected["loss"])
    one = run(clip_config(clip_assets, {**start, "steps": 1, "lr": 1e-3}, data=False))
    extras = one["method_extras"]
    assert extras[method]["loss_first"] == pytest.approx(entropy_of_task_arithmetic(clip_assets, clip_ref, batch=10), rel=1e-5)
    assert extras["transductive"]["tasks"] == list(BOTH) and one["transductive"] is True
    if method == "adamerging":  # Adam's first step moves each coefficient by lr (times the sign of its gradient)
        for value in extras[method]["coefficients"].values():
            assert abs(value - TA_LAMBDA) == pytest.approx(1e-3, rel=1e-3)


def test_simple_ensemble_scores_the_head_on_the_mean_pooled_output_as_fusionbench(clip_assets, clip_ref):
    report = run(clip_config(clip_assets, {"name": "simple_ensemble"}, data=False))
    clip, tasks = clip_ref
    members = [vision(clip_assets, n) for n in BOTH]
    for task in BOTH:
        pixels, labels, text = tasks[task]
        with torch.no_grad():
            pooled = sum(m(pixel_values=pixels).pooler_output for m in members) / len(members)
            feats = clip.visual_projection(pooled)
            logits = (feats / feats.norm(dim=-1, keepdim=True)) @ text.T
        assert_scores(report["results"]["merged"][task], *scores(logits, labels))


def test_simple_ensemble_with_combine_logits_scores_the_mean_of_the_members_logits(clip_assets, clip_ref):
    report = run(clip_config(clip_assets, {"name": "simple_ensemble", "combine": "logits"}, data=False))
    clip, tasks = clip_ref
    members = [vision(clip_assets, n) for n in BOTH]
    for task in BOTH:
        pixels, labels, text = tasks[task]
        with torch.no_grad():
            mean = sum(clip_logits(clip, m, pixels, text) for m in members) / len(members)
        assert_scores(report["results"]["merged"][task], *scores(mean, labels))
    assert report["method_extras"]["simple_ensemble"]["weights"] == [0.5, 0.5]


def test_upscaled_model_is_scored_through_its_own_forward(clip_assets, clip_ref):
    """SMILE's output (a CLIPVisionModel with routed layers) scores exactly as the module's own outputs through the head."""
    from fusion_adaptive.smile import Smile

    from fusion_core.run_context import RunContext

    pool, taskpool = pools(clip_config(clip_assets, {"name": "smile"}, data=False))
    model = Smile(Smile.Config(rank=4, gate_k=2)).run(pool, RunContext(show_progress=False, taskpool=taskpool))
    assert type(model.get_submodule("encoder.layers.0.mlp.fc1")).__name__ == "SmileLinear"
    results = taskpool.evaluate(model)
    clip, tasks = clip_ref
    for task in BOTH:
        pixels, labels, text = tasks[task]
        with torch.no_grad():
            assert_scores(results[task], *scores(clip_logits(clip, model, pixels, text), labels))


# --------------------------------------------------------------------------- the protocol's pieces and bad inputs


def test_pool_data_and_task_pool_batches_follow_the_protocol(clip_assets, clip_ref):
    from fusion_core import adapters

    pool, taskpool = pools(clip_config(clip_assets, {"name": "regmean"}))
    _, tasks = clip_ref
    pixels, labels, _ = tasks["animals"]
    data = pool.data("animals", "train")
    for _ in range(2):  # re-iterable
        batches = list(data)
        assert [len(y) for _, y in batches] == [8, 8, 8]
        torch.testing.assert_close(torch.cat([x["pixel_values"] for x, _ in batches]), pixels)
        assert torch.equal(torch.cat([y for _, y in batches]), labels)
    assert pool.data("animals", "val") is None  # not mapped
    assert pool.data("digits", "test") is None
    unlabelled = list(taskpool.unlabelled_batches("digits"))
    assert [x["pixel_values"].shape[0] for x in unlabelled] == [10, 10, 4] and all(set(x) == {"pixel_values"} for x in unlabelled)
    head = adapters.get_classifier(taskpool, "animals")
    model = vision(clip_assets, "animals")
    clip, _ = clip_ref
    with torch.no_grad():
        got = adapters.logits(model, {"pixel_values": pixels}, head, pool)
        torch.testing.assert_close(got, clip_logits(clip, model, pixels, tasks["animals"][2]))


def fuse(capsys, config, tmp_path) -> tuple[int, str]:
    import yaml

    from fusion_core.cli.main import main

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    code = main(["run", str(path)])
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("datasets", ["absent", "split missing"])
def test_a_missing_split_is_one_line_naming_it(clip_assets, tmp_path, capsys, datasets):
    config = clip_config(clip_assets, {"name": "regmean"}, data=datasets != "absent")
    config["output_dir"] = str(tmp_path / "out")
    if datasets == "split missing":
        del config["modelpool"]["datasets"]["animals"]["splits"]  # default: train → the dataset's 'train' split
        needles = ["model 'animals' (train data)", "split 'train' not found", "available splits: test"]
    else:
        needles = ["method 'regmean' needs the 'train' split of model 'animals'", "gives no 'train' data"]
    code, err = fuse(capsys, config, tmp_path)
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert code != 0 and len(lines) == 1, err
    assert all(n in lines[0] for n in needles), lines[0]
    assert not (tmp_path / "out").exists()


def test_datasets_config_is_checked(clip_assets, text_assets):
    from fusion_hf.model_pools import CLIPVisionPool, DataPoolFields, HFModelPool, HFPoolConfig

    from fusion_core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"modelpool.datasets: 'animal' is not a model of the pool \(did you mean 'animals'\?\)"):
        CLIPVisionPool(DataPoolFields(base=str(clip_assets["base"]), models={"animals": str(clip_assets["ft"]["animals"])},
                                      datasets={"animal": {"dataset": "x"}}))
    s2s = HFModelPool(HFPoolConfig(auto_class="AutoModelForSeq2SeqLM", base=str(text_assets["t5_base"]),
                                   models={"a": str(text_assets["t5_ft"])}, datasets={"a": {"dataset": "csv", "data_files": "x.csv"}}))
    with pytest.raises(ConfigError, match="datasets are read for image models .* causal LMs .* not for AutoModelForSeq2SeqLM"):
        s2s.validate()


# --------------------------------------------------------------------------- text classifiers + text_classification

TRAIN = ["this movie is great", "a very good movie", "bad and awful", "not good", "the dog is fine", "this cat was bad", "great and good",
         "awful movie"]
TEST = ["this movie was awful", "a good dog", "very bad", "fine", "the bird is great", "not bad", "one two three"]


@pytest.fixture(scope="module")
def text_pool(text_assets, tmp_path_factory):
    """Two BERT and two GPT-2 sequence classifiers (2 labels, fine-tuned = base + noise) and csv train/test data per task."""
    import pandas as pd
    from transformers import BertForSequenceClassification, GPT2ForSequenceClassification

    root = tmp_path_factory.mktemp("adaptive_text")
    out = {}
    for arch, cls, source in (("bert", BertForSequenceClassification, "bert_base"), ("gpt2", GPT2ForSequenceClassification, "gpt2_cls0")):
        for i, task in enumerate(("sentiment", "topic")):
            model = cls.from_pretrained(text_assets[source]).eval()
            add_noise(model, 40 + i, 0.05)
            model.save_pretrained(root / f"{arch}_{task}")
            out[f"{arch}_{task}"] = root / f"{arch}_{task}"
    for i, task in enumerate(("sentiment", "topic")):
        for split, texts in (("train", TRAIN), ("test", TEST)):
            pd.DataFrame({"text": texts, "label": [(j + i) % 2 for j in range(len(texts))]}).to_csv(root / f"{task}_{split}.csv", index=False)
        out[task] = {"dataset": "csv", "data_files": {s: str(root / f"{task}_{s}.csv") for s in ("train", "test")}}
    out["cache"] = str(root / "cache")
    return out


def text_config(text_assets, text_pool, method, arch="bert", names=("sentiment", "topic"), **settings):
    base = text_assets["bert_base" if arch == "bert" else "gpt2_base"]
    return {
        "method": method,
        "modelpool": {"name": "hf_seq_classification", "base": str(base), "models": {n: str(text_pool[f"{arch}_{n}"]) for n in names},
                      "datasets": {n: text_pool[n] for n in names}, "batch_size": 3},
        "taskpool": {"name": "text_classification", "tokenizer": str(base), "batch_size": 4, "cache_dir": text_pool["cache"],
                     "tasks": {n: {**text_pool[n], "split": "test"} for n in names}},
        "progress": False, "seed": 0, "evaluate_inputs": False, **settings,
    }


def text_logits(model, tokenizer, texts):
    with torch.no_grad():
        return model(**tokenizer(texts, padding=True, return_tensors="pt")).logits


def text_labels(text_pool):
    import pandas as pd

    return {n: torch.tensor(pd.read_csv(text_pool[n]["data_files"]["test"])["label"].tolist()) for n in ("sentiment", "topic")}


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_regmean_on_one_text_classifier_reproduces_it(text_assets, text_pool, arch):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    report = run(text_config(text_assets, text_pool, {"name": "regmean"}, arch=arch, names=["sentiment"]))
    model = AutoModelForSequenceClassification.from_pretrained(text_pool[f"{arch}_sentiment"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(text_assets["bert_base" if arch == "bert" else "gpt2_base"])
    expected = scores(text_logits(model, tokenizer, TEST), text_labels(text_pool)["sentiment"])
    assert_scores(report["results"]["merged"]["sentiment"], *expected, rel=1e-4)
    linear = 14 if arch == "bert" else 9  # BERT: 6 per layer + pooler + classifier; GPT-2: c_attn, c_proj, c_fc, c_proj per layer + score
    assert report["method_extras"]["regmean"] == {"layers_solved": linear, "layers_without_inputs": []}


def test_regmean_on_text_solves_a_layer_from_the_tokenized_train_split(text_assets, text_pool):
    from fusion_adaptive.regmean import RegMean
    from fusion_hf.model_pools import SeqClassificationPool, SeqClassificationPoolConfig
    from transformers import AutoTokenizer, BertForSequenceClassification

    from fusion_core.config import make_config
    from fusion_core.run_context import RunContext

    fields = {k: v for k, v in text_config(text_assets, text_pool, {})["modelpool"].items() if k != "name"}
    pool = SeqClassificationPool(make_config(SeqClassificationPoolConfig, fields))
    alpha = 0.9  # α < 1 keeps the 32×32 Grams of 46 token rows well conditioned (float32 Grams in the method)
    merged = RegMean(RegMean.Config(reduce_non_diagonal_ratio=alpha)).run(pool, RunContext(show_progress=False))
    tokenizer = AutoTokenizer.from_pretrained(text_assets["bert_base"])
    layer = "bert.encoder.layer.0.intermediate.dense"
    gram_sum, gram_weight = 0, 0
    for name in ("sentiment", "topic"):
        model = BertForSequenceClassification.from_pretrained(text_pool[f"bert_{name}"]).eval()
        rows = []
        handle = model.get_submodule(layer).register_forward_pre_hook(lambda m, args, rows=rows: rows.append(args[0].reshape(-1, args[0].shape[-1])))
        with torch.no_grad():
            for start in range(0, len(TRAIN), 3):  # the pool's batches: padded per batch of 3
                model(**tokenizer(TRAIN[start : start + 3], padding=True, return_tensors="pt"))
        handle.remove()
        x = torch.cat(rows).double()
        gram = x.T @ x / x.shape[0]
        gram = alpha * gram + (1 - alpha) * torch.diag(torch.diagonal(gram))
        gram_sum = gram_sum + gram
        gram_weight = gram_weight + gram @ model.get_submodule(layer).weight.detach().double().T
    expected = torch.linalg.solve(gram_sum, gram_weight).T.float()
    torch.testing.assert_close(merged[f"{layer}.weight"], expected, rtol=1e-4, atol=1e-5)


def test_text_ensemble_scores_the_mean_of_the_members_logits(text_assets, text_pool):
    from transformers import AutoTokenizer, BertForSequenceClassification

    report = run(text_config(text_assets, text_pool, {"name": "simple_ensemble"}))
    tokenizer = AutoTokenizer.from_pretrained(text_assets["bert_base"])
    members = [BertForSequenceClassification.from_pretrained(text_pool[f"bert_{n}"]).eval() for n in ("sentiment", "topic")]
    mean = sum(text_logits(m, tokenizer, TEST) for m in members) / 2
    for task, labels in text_labels(text_pool).items():
        assert_scores(report["results"]["merged"][task], *scores(mean, labels))


def test_regmean_plusplus_merges_clip_block_by_block_keeping_post_layernorm_at_the_base(clip_assets):
    """FusionBench's RegMean++: blocks in order, embeddings and pre-norm averaged, modules after the blocks at the base."""
    from fusion_adaptive.regmean import RegMeanPlusPlus
    from transformers import CLIPVisionModel

    from fusion_core.run_context import RunContext

    pool, taskpool = pools(clip_config(clip_assets, {"name": "regmean_plusplus"}))
    ctx = RunContext(show_progress=False, taskpool=taskpool)
    merged = RegMeanPlusPlus(RegMeanPlusPlus.Config()).run(pool, ctx)
    extras = ctx.extras["regmean_plusplus"]
    assert extras["granularity"] == "block" and extras["blocks"] == ["encoder.layers.0", "encoder.layers.1"]
    base = CLIPVisionModel.from_pretrained(clip_assets["base"]).state_dict()
    models = [vision(clip_assets, n).state_dict() for n in BOTH]
    for key in ("post_layernorm.weight", "post_layernorm.bias"):
        torch.testing.assert_close(merged[key], base[key])
        assert sorted(extras["kept_at_base"]) == ["post_layernorm.bias", "post_layernorm.weight"]
    for key in ("embeddings.class_embedding", "pre_layrnorm.weight", "encoder.layers.1.layer_norm1.weight"):
        torch.testing.assert_close(merged[key], sum(m[key] for m in models) / 2)
    key = "encoder.layers.1.mlp.fc1.weight"
    assert (merged[key] - sum(m[key] for m in models) / 2).abs().max() > 1e-3  # solved, not averaged
