"""Tiny Hugging Face models and datasets for the fusion-hf tests, built offline from configs (session fixtures: built once).

The CLIP pool mirrors FusionBench's layout: a full ``CLIPModel`` base (with tokenizer and
image processor) and vision-only "fine-tuned" checkpoints (base vision tower + seeded
noise).  Image datasets are labelled with the base model's own zero-shot predictions,
computed here independently of the task pool, so the pretrained accuracy is exactly 1.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

WORDS = ["a", "photo", "of", "the", "cat", "dog", "car", "tree", "bird", "zero", "one", "two", "three", "good", "bad", "movie", "is", "was",
         "great", "awful", "fine", "this", "and", "not", "very"]
CLIP_TASKS = {"animals": ["cat", "dog", "bird"], "digits": ["zero", "one", "two", "three"]}
TEMPLATE = "a photo of a {}."
NOISE = 0.05


@pytest.fixture(scope="session", autouse=True)
def _quiet_transformers():
    """No load reports or progress bars from transformers while fixtures are built."""
    from fusion_hf.loading import quiet_transformers

    quiet_transformers()


def make_tokenizer(max_length: int = 32):
    """A word-level tokenizer (ids: <bos>=0, <eos>=<pad>=1, <unk>=2, then WORDS) as a fast HF tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<bos>": 0, "<eos>": 1, "<unk>": 2}
    for word in WORDS:
        vocab[word] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>", pair="<bos> $A <eos> $B <eos>",
                                                        special_tokens=[("<bos>", 0), ("<eos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<eos>", unk_token="<unk>",
                                   model_max_length=max_length)


def clip_config(hidden: int = 32):
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=99,
                         max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=hidden, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32, patch_size=8),
        projection_dim=16,
    )


def add_noise(model, seed: int, scale: float = NOISE) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def save_clip_base(folder: Path, seed: int = 0, hidden: int = 32) -> Path:
    import torch
    from transformers import CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(clip_config(hidden)).eval()
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def save_clip_finetuned(base: Path, folder: Path, seed: int) -> Path:
    from transformers import CLIPVisionModel

    model = CLIPVisionModel.from_pretrained(base)
    add_noise(model, seed)
    model.save_pretrained(folder)
    return folder


def base_predictions(base: Path, images, class_names: list[str]):
    """Zero-shot predictions of the base CLIP written directly with transformers (the golden labels)."""
    import torch
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(base).eval()
    tok = AutoTokenizer.from_pretrained(base)
    proc = AutoImageProcessor.from_pretrained(base)
    with torch.no_grad():
        enc = tok([TEMPLATE.format(c) for c in class_names], padding=True, return_tensors="pt")
        text = model.get_text_features(**enc)
        text = text if isinstance(text, torch.Tensor) else text.pooler_output
        image = model.get_image_features(pixel_values=proc(images=images, return_tensors="pt")["pixel_values"])
        image = image if isinstance(image, torch.Tensor) else image.pooler_output
    text = text / text.norm(dim=-1, keepdim=True)
    image = image / image.norm(dim=-1, keepdim=True)
    return (image @ text.T).argmax(dim=-1).tolist()


def random_images(n: int, seed: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):  # a random colour per image plus noise, so that predictions vary
        colour = rng.integers(0, 256, (1, 1, 3))
        pixels = np.clip(colour + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(pixels))
    return images


def save_image_dataset(folder: Path, images, labels, class_names) -> Path:
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=class_names)})
    ds = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    datasets.DatasetDict({"test": ds}).save_to_disk(str(folder))
    return folder


@pytest.fixture(scope="session")
def clip_assets(tmp_path_factory):
    """Folders: base, ft/<task> (+ 'extra'), data/<task>; and the golden labels."""
    root = tmp_path_factory.mktemp("clip")
    base = save_clip_base(root / "base")
    finetuned = {name: save_clip_finetuned(base, root / "ft" / name, seed) for seed, name in enumerate(["animals", "digits", "extra"], 1)}
    data, labels = {}, {}
    for i, (task, names) in enumerate(CLIP_TASKS.items()):
        images = random_images(24, seed=10 + i)
        labels[task] = base_predictions(base, images, names)
        data[task] = save_image_dataset(root / "data" / task, images, labels[task], names)
    return {"root": root, "base": base, "ft": finetuned, "data": data, "labels": labels}


def clip_run_config(assets, output_dir: Path, **overrides) -> dict:
    config = {
        "method": {"name": "task_arithmetic", "scaling_factor": 0.5},
        "modelpool": {"name": "hf_clip_vision", "base": str(assets["base"]), "models": {k: str(v) for k, v in assets["ft"].items()}},
        "taskpool": {"name": "clip_zero_shot", "clip_model": str(assets["base"]), "templates": [TEMPLATE], "batch_size": 10,
                     "cache_dir": str(assets["root"] / "cache"),
                     "tasks": {task: {"dataset": str(path), "split": "test"} for task, path in assets["data"].items()}},
        "output_dir": str(output_dir),
        "progress": False,
        "seed": 0,
    }
    for key, value in overrides.items():
        config[key] = value
    return config


@pytest.fixture(scope="session")
def text_assets(tmp_path_factory):
    """Tiny GPT-2 (LM + sequence classification), BERT classifier, T5 and a tokenizer folder, plus a text dataset."""
    import torch
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2ForSequenceClassification,
        GPT2LMHeadModel,
        T5Config,
        T5ForConditionalGeneration,
    )

    root = tmp_path_factory.mktemp("text")
    tok = make_tokenizer(max_length=64)
    out = {"root": root}

    def save(model, name):
        model.eval().save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name

    torch.manual_seed(0)
    gpt2 = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=99, n_positions=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    lm = GPT2LMHeadModel(gpt2)
    save(lm, "gpt2_base")
    add_noise(lm, 1, 0.02)
    save(lm, "gpt2_ft1")
    add_noise(lm, 2, 0.02)
    save(lm, "gpt2_ft2")
    for i, labels in enumerate([2, 3]):
        torch.manual_seed(20 + i)
        clf = GPT2ForSequenceClassification(GPT2Config(**{**gpt2.to_dict(), "num_labels": labels}))
        clf.transformer.load_state_dict(GPT2LMHeadModel.from_pretrained(root / "gpt2_base").transformer.state_dict())
        add_noise(clf, 30 + i, 0.02)
        save(clf, f"gpt2_cls{i}")
    torch.manual_seed(3)
    bert = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=99,
                      max_position_embeddings=64, num_labels=2, pad_token_id=1)
    save(BertForSequenceClassification(bert), "bert_base")
    torch.manual_seed(4)
    t5 = T5Config(d_model=32, d_ff=37, num_layers=2, num_heads=4, d_kv=8, vocab_size=99, decoder_start_token_id=0, pad_token_id=1, eos_token_id=1)
    t5m = T5ForConditionalGeneration(t5)
    save(t5m, "t5_base")
    add_noise(t5m, 5, 0.02)
    save(t5m, "t5_ft")
    return out
