"""Shared inputs and runners of the parity suite: toy models, tiny CLIP/GPT-2, our merge, diffs."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

FROZEN = "frozen"
"""Toy models have a sub-module no expert changed (its task vectors are exactly zero)."""


class Toy(torch.nn.Module):
    """A few tensors of every common kind: embedding, matrices, biases, LayerNorm, and a frozen block."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(40, 16)
        self.fc1 = torch.nn.Linear(16, 24)
        self.norm = torch.nn.LayerNorm(24)
        self.fc2 = torch.nn.Linear(24, 12)
        self.frozen = torch.nn.Linear(12, 6)


def toy_models(n: int = 3, seed: int = 0, scale: float = 0.05, unequal: bool = True) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    """A base and ``n`` fine-tunes: base + Gaussian updates (model ``i``'s update scaled by 1 + i/2
    when ``unequal``), the ``frozen`` block left exactly at the base."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base = Toy()
    models = []
    for i in range(n):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.startswith(FROZEN):
                    continue
                factor = scale * ((1 + i / 2) if unequal else 1.0)
                p.add_(torch.randn(p.shape, generator=gen) * factor)
        models.append(m)
    return base, models


def tiny_clip_vision(n: int = 3, seed: int = 0, scale: float = 0.02):
    """A tiny CLIP vision tower (built from a config) and ``n`` perturbed copies."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=8, patch_size=4, projection_dim=8
    )
    base = CLIPVisionModel(config).eval()
    return base, _perturbed(base, n, seed, scale)


def tiny_gpt2(n: int = 3, seed: int = 0, scale: float = 0.02):
    """A tiny GPT-2 (``GPT2Model``, built from a config) and ``n`` perturbed copies."""
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=16)
    base = GPT2Model(config).eval()
    return base, _perturbed(base, n, seed, scale)


def _perturbed(base: torch.nn.Module, n: int, seed: int, scale: float) -> list[torch.nn.Module]:
    gen = torch.Generator().manual_seed(seed + 1)
    out = []
    for i in range(n):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * scale * (1 + i / 2))
        out.append(m)
    return out


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the module's state dict."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def ours(method: str, config: Mapping | None, base: torch.nn.Module | None, models: Sequence[torch.nn.Module], *, seed: int = 0, chunk_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """Our merge through the streaming engine, the way ``fuse merge`` runs it."""
    from fusion_core.config import make_config
    from fusion_core.engine.stream import MergeOptions, merge_readers
    from fusion_core.plugins import get_plugin_manager
    from fusion_core.registry import build_registry

    registry = build_registry(get_plugin_manager())
    cls = registry.get("method", method).cls
    instance = cls(make_config(cls.Config, dict(config or {}), where=f"method {method}"))
    options = MergeOptions(seed=seed, prefetch=False, notify=lambda message: None)
    if chunk_bytes is not None:
        options.chunk_bytes = chunk_bytes
    return merge_readers(instance, None if base is None else state(base), [state(m) for m in models], options)


def fusionbench_pool(base: torch.nn.Module | None, models: Sequence[torch.nn.Module]):
    """A FusionBench model pool over deep copies (its methods modify models in place)."""
    from fusion_bench.modelpool import BaseModelPool

    pool = {f"model_{i}": copy.deepcopy(m) for i, m in enumerate(models)}
    if base is not None:
        pool = {"_pretrained_": copy.deepcopy(base), **pool}
    return BaseModelPool(pool)


def max_abs_diff(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], keys: Sequence[str] | None = None) -> float:
    """The largest |a − b| over the float tensors they share (``keys``: only those)."""
    names = keys if keys is not None else [k for k in a if k in b and a[k].is_floating_point()]
    assert names, "no tensors to compare"
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in names)
