"""Learnable input perturbations (a stand-in for an unknown backdoor trigger) for the safety-aware methods.

Safe Concrete AdaMerging and the post-merge defenses AWM and SAU (Yang et al., 2024) learn, per
task, an additive perturbation δ that flips the merged model's predictions on unlabelled test
inputs, and then ask the merging mask to keep the model's predictions on ``x + δ`` confident.
FusionBench adds δ to CLIP's pixel tensors.  One implementation for every architecture: δ lives at
one of three *sites*, chosen per run (``site``):

- ``input``: the batch itself, when it is a floating-point tensor (images, features) or a mapping
  with exactly one floating-point tensor (``pixel_values``).  ``x + δ`` (and, where FusionBench
  clamps, ``clamp(x + δ, lo, hi)``).
- ``embeddings``: the output of the model's input-embedding module, for token inputs (text): the
  module is ``model.get_input_embeddings()`` (the Hugging Face API) or else the first
  ``nn.Embedding``/``nn.EmbeddingBag`` of the model.  δ has the shape of one sample's embedding
  output; a batch with a longer or shorter sequence sees δ cut or padded with zeros.
- ``prefix``: for token batches (a mapping with ``input_ids`` and ``attention_mask``), δ is one
  learned *token embedding* (a soft trigger word): the perturbed copy of every text gets one more
  position right after its first token (``[CLS]`` for BERT-like tokenizers; where a trigger word such
  as ``mini-backdoor``'s sits), whose input-embedding output is replaced by δ; the clean copy gets
  one masked padding position at the end so that both have the same length.  An additive δ on
  every position (``embeddings``) cannot insert a word; this site can, as a text trigger does.
- ``auto``: ``input`` when the batch holds a floating-point tensor, else ``embeddings``.

Every batch is run once as ``[x; x]`` with δ added to the second half, as FusionBench concatenates
clean and perturbed images, so one forward pass gives the clean and the perturbed logits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from fusion_core import InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

Site = Literal["auto", "input", "embeddings", "prefix"]

SLOT = 1
"""The position the ``prefix`` site inserts its soft token at: right after the first token."""


def floating_key(inputs: Any) -> str | None:
    """The key of the one floating-point tensor of a mapping batch (``""`` for a tensor batch), else ``None``."""
    import torch

    if isinstance(inputs, torch.Tensor):
        return "" if inputs.is_floating_point() else None
    if isinstance(inputs, Mapping):
        keys = [k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
        return keys[0] if len(keys) == 1 else None
    return None


def doubled(inputs: Any) -> Any:
    """``inputs`` with every tensor concatenated with itself along the batch dimension."""
    import torch

    if isinstance(inputs, torch.Tensor):
        return torch.cat([inputs, inputs])
    if isinstance(inputs, Mapping):
        return {k: doubled(v) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(doubled(v) for v in inputs)
    return inputs


def with_slot(inputs: Any, *, method: str) -> dict:
    """``[x; x']``: the batch doubled, ``x'`` with one position inserted at :data:`SLOT` (attended), ``x`` with one masked at the end.

    Every tensor of the batch shaped like ``input_ids`` gets the column: the slot repeats the first
    token's value (its embedding is replaced by δ), the end repeats the last column's value.
    """
    import torch

    if not isinstance(inputs, Mapping) or "input_ids" not in inputs or "attention_mask" not in inputs:
        raise InputError(f"method {method!r}: perturb_site=prefix needs token batches with input_ids and attention_mask; "
                         "use perturb_site=embeddings (or auto)")
    shape = inputs["input_ids"].shape
    out = {}
    for key, value in inputs.items():
        if not isinstance(value, torch.Tensor) or value.shape != shape:
            out[key] = doubled(value)
            continue
        if key == "attention_mask":
            clean = torch.cat([value, torch.zeros_like(value[:, :1])], dim=1)
            slotted = torch.cat([value[:, :SLOT], torch.ones_like(value[:, :1]), value[:, SLOT:]], dim=1)
        else:
            clean = torch.cat([value, value[:, -1:]], dim=1)
            slotted = torch.cat([value[:, :SLOT], value[:, :1], value[:, SLOT:]], dim=1)
        out[key] = torch.cat([clean, slotted])
    return out


def input_embeddings(model: Any, *, method: str) -> Any:
    """The module whose output is the model's input embedding (see the module docstring)."""
    import torch

    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter):
        with contextlib.suppress(NotImplementedError, AttributeError):
            module = getter()
            if isinstance(module, torch.nn.Module):
                return module
    for module in model.modules():
        if isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
            return module
    raise InputError(
        f"method {method!r}: the batches are not floating-point tensors and the model has no input-embedding module "
        "(get_input_embeddings() or an nn.Embedding) to perturb; set perturb_site=input with float inputs"
    )


def fit(delta: "torch.Tensor", shape: Sequence[int]) -> "torch.Tensor":
    """``delta`` cut or zero-padded along its first dimension to ``shape`` (the other dimensions must agree)."""
    import torch

    if tuple(delta.shape) == tuple(shape):
        return delta
    if delta.dim() != len(shape) or tuple(delta.shape[1:]) != tuple(shape[1:]):
        raise InputError(f"a perturbation of shape {list(delta.shape)} cannot be applied to samples of shape {list(shape)}")
    if shape[0] <= delta.shape[0]:
        return delta[: shape[0]]
    return torch.cat([delta, delta.new_zeros((shape[0] - delta.shape[0], *delta.shape[1:]))])


class Perturbations:
    """One learnable additive perturbation per task, at one site; zeros at the start, as FusionBench's."""

    def __init__(self, model: Any, probes: Sequence[Any], *, site: Site, method: str, run: Any) -> None:
        """:param probes: one batch per task (shapes only); :param run: ``run(inputs)`` runs the model on a batch."""
        import torch

        key = floating_key(probes[0])
        self.site = ("input" if key is not None else "embeddings") if site == "auto" else site
        self.method = method
        if self.site == "input":
            if key is None:
                raise InputError(f"method {method!r}: perturb_site=input needs floating-point batches (images, features); "
                                 "the batches hold token ids: use perturb_site=embeddings or auto")
            self.key = key
            shapes = [tuple((p if key == "" else p[key]).shape[1:]) for p in probes]
            self.module = None
        else:
            self.key = None
            if self.site == "prefix":
                with_slot(probes[0], method=method)  # refuses batches without input_ids / attention_mask
            self.module = input_embeddings(model, method=method)
            seen: list = []
            handle = self.module.register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape[1:])))
            try:
                with torch.no_grad():
                    for probe in probes:
                        run(probe)
            finally:
                handle.remove()
            shapes = seen[: len(probes)] if self.site == "embeddings" else [shape[-1:] for shape in seen[: len(probes)]]
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.deltas = [torch.zeros(shape, dtype=dtype, device=device, requires_grad=True) for shape in shapes]

    def parameters(self) -> list["torch.Tensor"]:
        return list(self.deltas)

    @contextlib.contextmanager
    def applied(self, index: int, inputs: Any, *, clamp: tuple[float, float] | None = None, track: bool = True,
                replay: bool = False) -> Iterator[Any]:
        """Yields ``[x; x + δ]`` for task ``index`` (or ``[x; x]`` with δ added at the embedding output while open).

        ``clamp``: the perturbed half clamped to ``[lo, hi]`` (input site only).  ``prefix``: the halves are
        :func:`with_slot`'s, one position longer than ``inputs``.  ``track=False``: δ is used detached.
        ``replay=True``: ``inputs`` is a batch this method already yielded, to be run again (by another model).
        """
        delta = self.deltas[index] if track else self.deltas[index].detach()
        if self.site == "input" and replay:
            yield inputs
            return
        if self.site == "input":
            x = inputs if self.key == "" else inputs[self.key]
            perturbed = x + delta
            if clamp is not None:
                perturbed = perturbed.clamp(clamp[0], clamp[1])
            import torch

            both = torch.cat([x, perturbed])
            yield both if self.key == "" else {k: (both if k == self.key else doubled(v)) for k, v in inputs.items()}
            return

        def hook(module, args, out):
            import torch

            half = out.shape[0] // 2
            if self.site == "prefix":
                token = delta.to(out.dtype).expand(out.shape[0] - half, 1, out.shape[-1])
                return torch.cat([out[:half], torch.cat([out[half:, :SLOT], token, out[half:, SLOT + 1 :]], dim=1)])
            return torch.cat([out[:half], out[half:] + fit(delta, out.shape[1:]).to(out.dtype)])

        handle = self.module.register_forward_hook(hook)
        try:
            if replay:
                yield inputs
            else:
                yield with_slot(inputs, method=self.method) if self.site == "prefix" else doubled(inputs)
        finally:
            handle.remove()
