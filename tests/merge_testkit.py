"""Shared helpers of the merge-engine tests: tiny GPT-2 folders, test kernels, a `fuse` runner."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import attrs
import torch

import fusion_core
from fusion_core.components import Capabilities
from fusion_core.config import in_range, option
from fusion_core.engine.kernel import KernelContext, KernelMethod

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


# ---------------------------------------------------------------------------- models


def tiny_gpt2_config(n_layer: int = 2):
    from transformers import GPT2Config

    return GPT2Config(
        n_embd=32, n_layer=n_layer, n_head=4, vocab_size=99, n_positions=64, bos_token_id=0, eos_token_id=1, pad_token_id=2
    )


def tiny_gpt2(seed: int = 0, n_layer: int = 2):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(tiny_gpt2_config(n_layer)).eval()
    return model


def tiny_llama(seed: int = 0, **overrides):
    """A tiny Llama (2 layers, hidden 32, 4 heads / 2 KV heads, untied head) built from a config; ``overrides`` go to the config."""
    import transformers

    torch.manual_seed(seed)
    settings = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=96, tie_word_embeddings=False,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**settings, **overrides})).eval()


def word_tokenizer(words, specials=("<pad>", "<s>", "</s>", "<unk>")):
    """A tiny word-level fast tokenizer: ``specials`` then ``words`` (ids in that order)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*specials, *words])}
    unk = "<unk>" if "<unk>" in vocab else "</s>"
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    pad = {"pad_token": "<pad>"} if "<pad>" in vocab else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token=unk, **pad)


def perturbed(model, seed: int, scale: float = 0.02):
    """A 'fine-tune': the model plus seeded noise on every float parameter."""
    import copy

    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return out


def save_hf(model, path: Path, max_shard_size: str | None = None) -> str:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(path), **kwargs)
    return str(path)


def logits(model, ids=None) -> torch.Tensor:
    ids = ids if ids is not None else torch.tensor([[3, 14, 15, 92, 65, 35]])
    with torch.no_grad():
        return model(ids).logits


def load_hf(path) -> torch.nn.Module:
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(str(path)).eval()


# ---------------------------------------------------------------------------- test kernels


class MeanDelta(KernelMethod):
    """θ₀ + scale · mean(θᵢ − θ₀): closed form, elementwise."""

    name = "t_mean"
    summary = "test: base plus the mean task vector"
    elementwise = True

    @attrs.frozen
    class Config:
        scale: float = option(1.0, help="scale")

    def kernel(self, name, base, tensors, ctx):
        return base + self.config.scale * sum(t - base for t in tensors) / len(tensors)


class Average(KernelMethod):
    """Plain mean, no base."""

    name = "t_avg"
    summary = "test: mean of the models"
    elementwise = True
    capabilities = Capabilities(needs_base=False)

    def kernel(self, name, base, tensors, ctx):
        return sum(tensors) / len(tensors)


class TrimMax(KernelMethod):
    """θ₀ + Σ τᵢ·[|τᵢ| ≥ frac·max|τᵢ|] (a per-tensor statistic): whole-tensor and two-phase paths."""

    name = "t_trim"
    summary = "test: keep the entries of each task vector above a fraction of its max magnitude"

    @attrs.frozen
    class Config:
        frac: float = option(0.5, help="fraction of max |τ|", validator=in_range(0.0, 1.0))

    calls: dict = {}

    def kernel(self, name, base, tensors, ctx):
        TrimMax.calls["kernel"] = TrimMax.calls.get("kernel", 0) + 1
        stats = [self.chunk_stats(name, base, t, i, ctx) for i, t in enumerate(tensors)]
        return self.kernel_chunk(name, base, tensors, ctx, stats, 0)

    def chunk_stats(self, name, base, tensor, index, ctx):
        TrimMax.calls["stats"] = TrimMax.calls.get("stats", 0) + 1
        return float((tensor - base).abs().max()) * self.config.frac

    def kernel_chunk(self, name, base, tensors, ctx, stats, start):
        out = base.clone()
        for t, thr in zip(tensors, stats, strict=True):
            tau = t - base
            out += torch.where(tau.abs() >= thr, tau, torch.zeros_like(tau))
        return out


class RandomDrop(KernelMethod):
    """θ₀ + Σ mᵢ⊙τᵢ with Bernoulli(density) masks from the per-tensor generator."""

    name = "t_drop"
    summary = "test: random drop of task-vector entries"
    capabilities = Capabilities(needs_base=True, random=True)

    @attrs.frozen
    class Config:
        density: float = option(0.5, help="keep probability", validator=in_range(0.0, 1.0))

    def kernel(self, name, base, tensors, ctx: KernelContext):
        out = base.clone()
        for i, t in enumerate(tensors):
            keep = ctx.rand_like(t, salt=str(i)) < self.config.density
            out += torch.where(keep, t - base, torch.zeros_like(t))
        return out


class MeanWithEvent(KernelMethod):
    """θ₀ + mean τᵢ, calling ``event(name)`` first (a test of what happens mid-merge)."""

    elementwise = True

    def event(self, name: str) -> None:
        """Override: what happens on tensor ``name``."""

    def kernel(self, name, base, tensors, ctx):
        self.event(name)
        return base + sum(t - base for t in tensors) / len(tensors)


class Interrupting(MeanWithEvent):
    """Raises KeyboardInterrupt on the tensor named ``at`` (a simulated Ctrl-C mid-merge)."""

    name = "t_interrupt"
    summary = "test: Ctrl-C in the middle of a merge"

    @attrs.frozen
    class Config:
        at: str = option("transformer.h.1.attn.c_attn.weight", help="tensor name")

    def event(self, name):
        if name == self.config.at:
            raise KeyboardInterrupt


class LocalTaskArithmetic(KernelMethod):
    """A local task_arithmetic with the fields mergekit configs map to."""

    name = "task_arithmetic"
    summary = "test: θ₀ + λ Σ wᵢ τᵢ (÷ Σw with normalize)"
    elementwise = True

    @attrs.frozen
    class Config:
        convention: str = option("mergekit", help="the real method's convention field (the importer sets it)")
        scaling_factor: float = option(1.0, help="λ")
        weights: list[float] | None = option(None, help="w")
        normalize: bool = option(False, help="divide by Σw")

    def kernel(self, name, base, tensors, ctx):
        w = self.config.weights or [1.0] * len(tensors)
        merged = sum(wi * (t - base) for wi, t in zip(w, tensors, strict=True))
        if self.config.normalize:
            merged = merged / sum(w)
        return base + self.config.scaling_factor * merged


TEST_METHODS = [MeanDelta, Average, TrimMax, RandomDrop, Interrupting, LocalTaskArithmetic]


class MergeTestPlugin:
    @fusion_core.hookimpl
    def fusion_register_methods(self, register):
        for cls in TEST_METHODS:
            register(cls)


def use_test_plugins(monkeypatch, extra: Sequence[tuple[str, object]] = ()) -> None:
    """Make ``fuse`` see only the core plus the test methods (no installed plugins), and ``extra`` plugins."""
    import fusion_core.plugins as plugins

    original = plugins.get_plugin_manager

    def pm(**kwargs):
        kwargs.update(load_entrypoints=False, extra_plugins=[("test-merge", MergeTestPlugin()), *extra])
        return original(**kwargs)

    monkeypatch.setattr(plugins, "get_plugin_manager", pm)


def fuse(capsys, *args: str) -> tuple[int, str, str]:
    from fusion_core.cli.main import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def leftovers(folder: Path) -> list[str]:
    """Temporary files the writer might have left beside an output."""
    return sorted(p.name for p in Path(folder).iterdir() if ".fuse-tmp-" in p.name or ".fuse-old-" in p.name)


def state_of(reader) -> dict[str, torch.Tensor]:
    return {k: reader.get(k) for k in reader.keys()}


def merge_ref(method, base: dict | None, models: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Reference merge: the kernel applied to whole fp32 tensors, key by key."""
    out = {}
    for key in models[0]:
        b = base[key].float() if base is not None else None
        out[key] = method.kernel(key, b, [m[key].float() for m in models], KernelContext(name=key))
    return out


class Terminating(MeanWithEvent):
    """Sends SIGTERM to its own process on the tensor named ``at`` (``kill`` of a running merge)."""

    name = "t_sigterm"
    summary = "test: SIGTERM in the middle of a merge"

    @attrs.frozen
    class Config:
        at: str = option("b", help="tensor name")

    def event(self, name):
        if name == self.config.at:
            import signal

            os.kill(os.getpid(), signal.SIGTERM)


class Racing(MeanWithEvent):
    """Creates a folder at ``path`` while merging (another run finishing first at the same output)."""

    name = "t_race"
    summary = "test: an output that appears while the merge runs"

    @attrs.frozen
    class Config:
        path: str = option("", help="where the other run's output appears")

    def event(self, name):
        target = Path(self.config.path)
        if not target.exists():
            target.mkdir()
            (target / "theirs.txt").write_text("the other run's output")


TEST_METHODS += [Terminating, Racing]
