"""Output tokenizers and embedding rows for ``tokenizer_source`` / ``tokenizer:``, as mergekit 0.1.5 builds them.

- The output tokenizer is the base's (``base``; the base is the recipe's ``base_model``, else
  its first model), a model's (a model path), or the **union** (``union``): the base's
  tokenizer plus, as added tokens, every other model's tokens it lacks (in model order, then
  token-id order), then every model's own added tokens.  A model's tokens at ids ≥ its
  config's ``vocab_size`` are ignored.
- Each model's vocabulary-indexed tensors (input embeddings, LM head: rows indexed by token)
  are permuted to the output vocabulary before merging.  A token a model lacks gets, in that
  model's copy: the row of the only model that has it; else the base's row (when the base is
  among the tensor's inputs and has it); else the mean of the rows of the models that have
  it; a token no model has gets zeros.  With ``pad_to_multiple_of`` the vocabulary is padded
  and the padding rows are the mean of the real rows.
- ``tokenizer.tokens`` adds tokens and chooses rows: ``source`` a model (its row of that
  token), ``{kind: zero}``, or ``{kind: model_token, model, token | token_id}`` (that model's
  row of another token); with ``force: true`` the source replaces every model's own row.
- The output's ``config.json`` gets the new ``vocab_size``; the tokenizer is saved in the output.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fusion_core import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fusion_core import TensorReader

VOCAB_TENSOR = re.compile(r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|lm_head|embed_out)\.weight$")
"""Tensors whose dim 0 is indexed by token (when it has the model's ``vocab_size`` rows)."""


def _vocab_size(folder) -> int | None:
    import json
    from pathlib import Path

    path = Path(folder) / "config.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    value = data.get("vocab_size") or (data.get("text_config") or {}).get("vocab_size")
    return int(value) if value else None


def _load(folder, where: str):
    from . import require_transformers

    require_transformers("a mergekit recipe with a tokenizer source")
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), use_fast=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - a tokenizer that does not load is the user's to fix
        raise ConfigError(f"{where}: the tokenizer of {folder} does not load ({type(exc).__name__}: {exc})") from None


class Vocabulary:
    """The output tokenizer and, for each model, output token id → its row (−1: missing)."""

    def __init__(
        self,
        source: str,
        base: str,
        models: Sequence[str],
        folders: Mapping[str, Any],
        pad_to: int | None,
        where: str,
        tokens: Mapping[str, dict] | None = None,
    ):
        self.base, self.where, self.tokens = base, where, dict(tokens or {})
        tokenizers = {base: _load(folders[base], where)}
        for model in models:
            if model not in tokenizers:
                tokenizers[model] = _load(folders[model], where)
        sizes = {m: _vocab_size(folders[m]) or len(t.get_vocab()) for m, t in tokenizers.items()}
        if any(i >= sizes[base] for i in tokenizers[base].get_vocab().values()):
            raise ConfigError(f"{where}: the base's tokenizer has tokens beyond its vocab_size; stripping them is not supported")
        if source == "base":
            out = tokenizers[base]
        elif source == "union":
            out = _union(tokenizers, sizes)
        else:
            if source not in tokenizers:
                raise ConfigError(f"{where}: tokenizer_source {source!r} is not one of the recipe's models")
            out = tokenizers[source]
        existing = set(out.get_vocab())
        for token in self.tokens:
            if token not in existing:
                out.add_tokens(token)
                existing.add(token)
        for token, cfg in self.tokens.items():
            ref = cfg["source"]
            model = ref if isinstance(ref, str) else (ref or {}).get("model")
            if model is not None and model not in tokenizers:
                raise ConfigError(f"{where}: tokenizer.tokens.{token}: {model} is not one of the recipe's models")
        self.originals = {m: t.get_vocab() for m, t in tokenizers.items()}
        self.tokenizer = out
        vocab = out.get_vocab()
        self.size = len(vocab)
        self.rows = self.size if not pad_to or self.size % pad_to == 0 else (self.size // pad_to + 1) * pad_to
        self.permutations: dict[str, dict[int, int]] = {}
        for model, tok in tokenizers.items():
            own = tok.get_vocab()
            self.permutations[model] = {i: (own[t] if t in own and own[t] < sizes[model] else -1) for t, i in vocab.items()}
        self.sizes = sizes
        self._cache: tuple[str, dict] | None = None

    def is_vocab_tensor(self, name: str, model: str, shape: Sequence[int]) -> bool:
        return bool(VOCAB_TENSOR.search(name)) and len(shape) >= 1 and shape[0] == self.sizes[model]

    def permuted(self, name: str, model: str, sources: Mapping[str, tuple["TensorReader", str]]) -> "torch.Tensor":
        """Model ``model``'s tensor ``name`` with rows in output-vocabulary order (all inputs computed once per name)."""
        if self._cache is None or self._cache[0] != name:
            self._cache = None
            self._cache = (name, self._permute_all(sources))
        return self._cache[1][model]

    def _permute_all(self, sources: Mapping[str, tuple["TensorReader", str]]) -> dict[str, "torch.Tensor"]:
        import torch

        models = list(sources)
        tensors = {m: sources[m][0].get(sources[m][1]) for m in models}
        dtype = tensors[models[0]].dtype
        for tensor in tensors.values():
            dtype = torch.promote_types(dtype, tensor.dtype)
        shape = tensors[models[0]].shape[1:]
        vocab = self.tokenizer.get_vocab()
        perms = {m: self.permutations[m] for m in models}
        defaults: dict[int, torch.Tensor] = {}
        forced: set[int] = set()
        for token, token_id in vocab.items():
            have = [m for m in models if perms[m][token_id] >= 0]
            cfg = self.tokens.get(token)
            if cfg is not None and cfg["force"]:
                forced.add(token_id)
            if len(have) == len(models) and token_id not in forced:
                continue
            if cfg is not None:
                defaults[token_id] = self._configured_row(token, token_id, cfg, tensors, perms, shape, dtype)
            elif not have:
                defaults[token_id] = torch.zeros(shape, dtype=dtype)
            elif len(have) == 1:
                defaults[token_id] = tensors[have[0]][perms[have[0]][token_id]].to(dtype)
            elif self.base in models and perms[self.base][token_id] >= 0:
                defaults[token_id] = tensors[self.base][perms[self.base][token_id]].to(dtype)
            else:
                total = torch.zeros(shape, dtype=dtype)
                for m in have:
                    total = total + tensors[m][perms[m][token_id]]
                defaults[token_id] = total / len(have)
        out = {}
        ids = torch.tensor(sorted(vocab.values()))
        for m in models:
            table = torch.zeros((self.rows, *shape), dtype=dtype)
            rows = torch.tensor([-1 if int(i) in forced else perms[m][int(i)] for i in ids])
            present = rows >= 0
            table[ids[present]] = tensors[m][rows[present]].to(dtype)
            for token_id in ids[~present].tolist():
                if token_id in defaults:
                    table[token_id] = defaults[token_id]
            if self.rows > self.size:
                table[self.size :] = table[: self.size].mean(dim=0)
            out[m] = table
        return out


    def _configured_row(self, token, token_id, cfg, tensors, perms, shape, dtype) -> "torch.Tensor":
        """The row ``tokenizer.tokens`` chooses for ``token`` (mergekit's ``compute_default_embedding``)."""
        import torch

        source = cfg["source"]
        if isinstance(source, dict) and source.get("kind") == "zero":
            return torch.zeros(shape, dtype=dtype)
        model = source if isinstance(source, str) else (source or {}).get("model")
        if model is None:
            raise ConfigError(f"{self.where}: tokenizer.tokens.{token} needs a source (some models lack the token)")
        if model not in tensors:
            raise ConfigError(f"{self.where}: tokenizer.tokens.{token} takes a row from {model}, which is not an input of this tensor")
        if isinstance(source, str):
            row = perms[model][token_id]
            if row < 0:
                raise ConfigError(f"{self.where}: tokenizer.tokens.{token}: {model} has no token {token!r}")
        else:
            row = source.get("token_id")
            if row is None:
                if source["token"] not in self.originals[model]:
                    raise ConfigError(f"{self.where}: tokenizer.tokens.{token}: {model} has no token {source['token']!r}")
                row = self.originals[model][source["token"]]
            if not 0 <= row < tensors[model].shape[0]:
                raise ConfigError(f"{self.where}: tokenizer.tokens.{token}: token id {row} is out of range for {model}")
        return tensors[model][row].to(dtype)


def check_token_configs(tokens: Any, where: str) -> dict[str, dict]:
    """Validate mergekit's ``tokenizer.tokens``: ``{token: {source: ..., force: bool}}``."""
    if not isinstance(tokens, Mapping):
        raise ConfigError(f"{where}: tokenizer.tokens must map tokens to {{source: ..., force: ...}}")
    out = {}
    for token, cfg in tokens.items():
        what = f"tokenizer.tokens.{token}"
        cfg = cfg or {}
        if not isinstance(cfg, Mapping) or set(cfg) - {"source", "force"}:
            raise ConfigError(f"{where}: {what} takes source and force")
        source = cfg.get("source")
        if isinstance(source, Mapping):
            kind = source.get("kind")
            zero = kind == "zero" and set(source) == {"kind"}
            model_token = (kind == "model_token" and isinstance(source.get("model"), str)
                           and set(source) <= {"kind", "model", "token", "token_id"})
            if model_token and (source.get("token") is None) == (source.get("token_id") is None):
                raise ConfigError(f"{where}: {what}.source: give one of token and token_id")
            if not (zero or model_token):
                raise ConfigError(f"{where}: {what}.source must be a model path, {{kind: zero}} or {{kind: model_token, model, token | token_id}}")
        elif source is not None and not isinstance(source, str):
            raise ConfigError(f"{where}: {what}.source must be a model path, {{kind: zero}} or {{kind: model_token, ...}}")
        force = cfg.get("force", False)
        if not isinstance(force, bool):
            raise ConfigError(f"{where}: {what}.force must be true or false")
        out[str(token)] = {"source": source, "force": force}
    return out


def _union(tokenizers: Mapping[str, Any], sizes: Mapping[str, int]):
    """The base's tokenizer plus the other models' missing tokens and every added token (mergekit's order)."""
    import transformers

    vocab_order: dict[str, int] = {}
    added: dict[str, Any] = {}
    for model, tok in tokenizers.items():
        own_added = tok.added_tokens_decoder
        added_contents = {info.content for info in own_added.values()}
        for token, index in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if index >= sizes[model] or token in added_contents:
                continue
            vocab_order.setdefault(token, len(vocab_order))
        for index, info in own_added.items():
            if index < sizes[model]:
                added.setdefault(info.content, info)
    base = next(iter(tokenizers.values()))
    with tempfile.TemporaryDirectory() as tmp:
        base.save_pretrained(tmp)
        out = transformers.AutoTokenizer.from_pretrained(tmp, use_fast=True, trust_remote_code=False)
    base_vocab = base.get_vocab()
    for token in vocab_order:
        if token not in added and token not in base_vocab:
            out.add_tokens(token)
    for info in added.values():
        out.add_tokens(info)
    return out


class PermutedRows:
    """One input's vocabulary tensor, rows in output-vocabulary order (an entry of a slot reader)."""

    owns_tensors = False  # the permuted tensors are cached per name: the engine copies them

    def __init__(self, vocabulary: Vocabulary, name: str, model: str, sources: Mapping[str, tuple["TensorReader", str]]) -> None:
        self.vocabulary, self.name, self.model, self.sources = vocabulary, name, model, sources

    def dtype(self) -> "torch.dtype":
        import torch

        dtypes = [reader.dtype(n) for reader, n in self.sources.values()]
        out = dtypes[0]
        for d in dtypes[1:]:
            out = torch.promote_types(out, d)
        return out

    def get(self) -> "torch.Tensor":
        return self.vocabulary.permuted(self.name, self.model, self.sources)

    def get_rows(self, start: int, stop: int) -> "torch.Tensor":
        return self.get()[start:stop]
