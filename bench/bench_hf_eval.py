"""Evaluation throughput of the ``clip_zero_shot`` task pool against a bare torch loop, side by side.

Builds (offline, from configs) a small CLIP: a 224-px ViT vision tower (hidden 256, 4 layers,
patch 32) and a small text tower, a word-level tokenizer and CLIP's image processor, plus a
dataset of random images with 10 classes saved with ``save_to_disk``.  Then it times, in one
process and alternating, the task pool's ``evaluate`` and a hand-written loop doing the same
work (preprocess with the processor, vision tower, projection, normalized text head, argmax)
on the same model and data, and prints both throughputs and their ratio:

    python bench/bench_hf_eval.py                  # 256 images, batch 64, 1 thread, best of 3
    python bench/bench_hf_eval.py --images 1024 --threads 2

Target (issue 4): task pool throughput >= 0.9x the bare loop.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TARGET = 0.9
CLASSES = ["cat", "dog", "car", "tree", "bird", "boat", "house", "road", "lake", "hill"]
TEMPLATE = "a photo of a {}."


def build_assets(root: Path, n_images: int, seed: int = 0) -> tuple[Path, Path]:
    import datasets
    import numpy as np
    import torch
    from PIL import Image
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    model_dir, data_dir = root / "clip", root / "data"
    words = ["a", "photo", "of", "."] + CLASSES
    vocab = {"<bos>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>", special_tokens=[("<bos>", 0), ("<eos>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<eos>", unk_token="<unk>")
    config = CLIPConfig(
        text_config=dict(hidden_size=128, intermediate_size=512, num_attention_heads=4, num_hidden_layers=2, vocab_size=64,
                         max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_hidden_layers=4, image_size=224, patch_size=32),
        projection_dim=128,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    CLIPImageProcessor().save_pretrained(model_dir)
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (n_images, 1, 1, 3))  # a colour per image plus noise: embeddings differ
    pixels = np.clip(colours + rng.normal(0, 40, (n_images, 64, 64, 3)), 0, 255).astype(np.uint8)
    images = [Image.fromarray(p) for p in pixels]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    ds = datasets.Dataset.from_dict({"image": images, "label": [i % len(CLASSES) for i in range(n_images)]}, features=features)
    datasets.DatasetDict({"test": ds}).save_to_disk(str(data_dir))
    return model_dir, data_dir


def bare_loop(model_dir: Path, data_dir: Path, batch_size: int):
    """The hand-written evaluation: returns a function(model) → accuracy, with the text head built once."""
    import datasets
    import torch
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    clip = CLIPModel.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    processor = AutoImageProcessor.from_pretrained(model_dir)
    ds = datasets.load_from_disk(str(data_dir))["test"]
    with torch.inference_mode():
        text = clip.get_text_features(**tokenizer([TEMPLATE.format(c) for c in CLASSES], padding=True, return_tensors="pt")).pooler_output
        head = text / text.norm(dim=-1, keepdim=True)

    def evaluate(vision) -> float:
        correct = 0
        with torch.inference_mode():
            for start in range(0, len(ds), batch_size):
                batch = ds[start : start + batch_size]
                pixels = processor(images=[im.convert("RGB") for im in batch["image"]], return_tensors="pt")["pixel_values"]
                feats = clip.visual_projection(vision(pixel_values=pixels).pooler_output)
                logits = (feats / feats.norm(dim=-1, keepdim=True)) @ head.T
                correct += int((logits.argmax(-1) == torch.as_tensor(batch["label"])).sum())
        return correct / len(ds)

    return evaluate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from fusion_hf.loading import quiet_transformers
    from fusion_hf.task_pools.clip_zero_shot import ClipZeroShot, ClipZeroShotConfig
    from transformers import CLIPVisionModel

    quiet_transformers()
    import datasets

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory(prefix="bench-hf-eval-") as tmp:
        start = time.perf_counter()
        model_dir, data_dir = build_assets(Path(tmp), args.images)
        print(f"assets: {args.images} images, CLIP ViT hidden 256 x 4 layers @224px, built in {time.perf_counter() - start:.1f}s")
        vision = CLIPVisionModel.from_pretrained(model_dir).eval()
        pool = ClipZeroShot(ClipZeroShotConfig(clip_model=str(model_dir), templates=[TEMPLATE], batch_size=args.batch_size,
                                               cache_dir=str(Path(tmp) / "cache"), tasks={"bench": {"dataset": str(data_dir)}}))
        bare = bare_loop(model_dir, data_dir, args.batch_size)
        start = time.perf_counter()
        first = pool.evaluate(vision)["bench"]["accuracy"]  # loads the dataset and builds the text head
        cold = time.perf_counter() - start
        times = {"task pool": [], "bare loop": []}
        accuracy = {}
        for _ in range(args.repeats):  # alternate, best of N: both sides see the same machine load
            start = time.perf_counter()
            accuracy["task pool"] = pool.evaluate(vision)["bench"]["accuracy"]
            times["task pool"].append(time.perf_counter() - start)
            start = time.perf_counter()
            accuracy["bare loop"] = bare(vision)
            times["bare loop"].append(time.perf_counter() - start)
    # an untrained model's logits nearly tie, so summation order may flip a few argmaxes
    if abs(accuracy["task pool"] - accuracy["bare loop"]) > 0.01 or accuracy["task pool"] != first:
        print(f"MISMATCH: accuracies differ {accuracy} (first call {first})", file=sys.stderr)
        return 1
    print(f"{'':>10} {'best s':>8} {'images/s':>9}   (threads {args.threads}, batch {args.batch_size}, best of {args.repeats})")
    best = {k: min(v) for k, v in times.items()}
    for key in ("bare loop", "task pool"):
        print(f"{key:>10} {best[key]:8.2f} {args.images / best[key]:9.1f}")
    ratio = best["bare loop"] / best["task pool"]
    print(f"task pool first call (dataset load + text head): {cold:.2f}s; "
          f"accuracy task pool {accuracy['task pool']:.4f}, bare loop {accuracy['bare loop']:.4f}")
    print(f"throughput ratio task pool / bare loop = {ratio:.3f} (target >= {TARGET}) {'OK' if ratio >= TARGET else 'BELOW TARGET'}")
    return 0 if ratio >= TARGET else 2


if __name__ == "__main__":
    sys.exit(main())
