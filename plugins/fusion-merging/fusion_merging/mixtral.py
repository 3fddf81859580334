"""Mixtral upcycling of a dense model and Mixtral MoE merging of fine-tuned dense models (as FusionBench 0.2.33).

- ``mixtral_upcycling`` (FusionBench ``MixtralForCausalLMUpscalingAlgorithm``,
  ``config/method/mixtral_moe_upscaling.yaml``: 4 experts, 2 per token): the pool's base, a
  Llama- or Mistral-shaped causal LM, becomes a ``MixtralForCausalLM`` whose every layer has
  ``num_experts`` copies of the dense MLP; attention, norms, embeddings and head are the
  base's.  Since Mixtral renormalises the weights of the top-k experts, identical experts make
  the MoE compute exactly the dense model's function whatever the router (a test compares the
  logits).
- ``mixtral_merging`` (FusionBench ``MixtralForCausalLMMergingAlgorithm``,
  ``mixtral_moe_merging.yaml``: 2 per token): one expert per fine-tuned model of the pool (its
  MLPs), everything else from the base.

Both assemble the model with :func:`fusion_merging.moe.moe_tensor`, the code of ``fuse moe``
(mergekit-moe configs, prompt-based gates); here the routers are ``gate_mode`` ``random``
(N(0, 1) rows) or ``uniform_random`` (U(±1/√hidden), the ``nn.Linear`` initialisation), seeded by
the run's seed.  FusionBench leaves the router weights uninitialised (``no_init_weights``) and,
in its upcycling, never copies the attention weights either: here they are the base's.  Under
transformers 5 FusionBench's module does not import (``MixtralBlockSparseTop2MLP`` is gone): no
parity run.  The output is a model (saved with ``save_pretrained``), evaluated by the task pool
as any merged model, e.g. perplexity (``causal_lm_perplexity``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

import attrs

from fusion_core import Capabilities, InputError, Method, in_range, option

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fusion_core import ModelPool, RunContext

DENSE_TYPES = ("llama", "mistral")


def _gate_mode():
    return option("uniform_random", help="router rows: random = N(0, 1), uniform_random = U(±1/√hidden) (mergekit-moe's modes "
                                         "without prompts; for prompt-based routers use fuse moe)")


def mixtral_from_dense(base: Any, experts: list[Any], *, experts_per_token: int, gate_mode: str, seed: int, where: str) -> Any:
    """A ``MixtralForCausalLM``: ``base`` outside the MLPs, expert ``i`` = the MLPs of ``experts[i]`` (dense causal LMs)."""
    import torch
    import transformers

    from .moe import gate_vectors, moe_tensor, output_config

    for model in [base, *experts]:
        kind = getattr(model.config, "model_type", None)
        if kind not in DENSE_TYPES or kind != base.config.model_type:
            raise InputError(f"{where}: Mixtral experts come from Llama- or Mistral-shaped causal LMs of one type; got {kind!r} "
                             f"(base: {base.config.model_type!r})")
    config = {"output": "mixtral", "experts": [{}] * len(experts), "experts_per_token": experts_per_token, "gate_mode": gate_mode}
    dtype = next(base.parameters()).dtype
    out_cfg = output_config(config, base.config, str(dtype).removeprefix("torch."))
    gates = gate_vectors(config, base.config, None, seed, config["experts"])
    state = base.state_dict()
    expert_states = [model.state_dict() for model in experts]

    def mlp(i: int, layer: int, part: str) -> "torch.Tensor":
        return expert_states[i][f"model.layers.{layer}.mlp.{part}.weight"]

    model = transformers.MixtralForCausalLM(out_cfg).to(dtype)
    wanted = model.state_dict()
    values = {name: moe_tensor(name, tuple(ref.shape), state, mlp, gates, len(experts), where) for name, ref in wanted.items()}
    for name, value in values.items():
        if tuple(value.shape) != tuple(wanted[name].shape):
            raise InputError(f"{where}: {name!r} would be {list(value.shape)}, the Mixtral model needs {list(wanted[name].shape)}")
    with torch.no_grad():
        model.load_state_dict({k: v.to(dtype) for k, v in values.items()}, strict=True)
    return model.eval()


class MixtralUpcycling(Method):
    """Upcycle the pool's dense base into a Mixtral MoE: every expert a copy of the dense MLP."""

    name = "mixtral_upcycling"
    summary = "Upcycles a dense Llama/Mistral causal LM into a Mixtral MoE (num_experts copies of each MLP, a router per layer)."
    reference_url = "https://arxiv.org/abs/2212.05055"
    fusionbench_config = "mixtral_moe_upscaling.yaml"
    capabilities: ClassVar[Capabilities] = Capabilities(needs_base=True)
    min_models = 0

    @attrs.frozen
    class Config:
        num_experts: int = option(4, help="experts per layer, each a copy of the dense MLP (FusionBench: 4)", validator=in_range(1, 1024))
        experts_per_token: int = option(2, help="experts each token is routed to (FusionBench: 2)", validator=in_range(1, 1024))
        gate_mode: Literal["random", "uniform_random"] = _gate_mode()

        def __attrs_post_init__(self) -> None:
            if self.experts_per_token > self.num_experts:
                raise ValueError(f"experts_per_token ({self.experts_per_token}) must not exceed num_experts ({self.num_experts})")

    def run(self, pool: "ModelPool", ctx: "RunContext") -> Any:
        base = pool.load_model(None)
        cfg = self.config
        return mixtral_from_dense(base, [base] * cfg.num_experts, experts_per_token=cfg.experts_per_token, gate_mode=cfg.gate_mode,
                                  seed=ctx.seed, where=f"method {self.name!r}")


class MixtralMerging(Method):
    """Merge fine-tuned dense models into a Mixtral MoE: one expert per model, the rest from the base."""

    name = "mixtral_merging"
    summary = "Mixtral MoE merging: each fine-tuned Llama/Mistral model's MLPs become one expert; attention, norms, embeddings from the base."
    reference_url = "https://arxiv.org/abs/2401.04088"
    fusionbench_config = "mixtral_moe_merging.yaml"
    capabilities: ClassVar[Capabilities] = Capabilities(needs_base=True)

    @attrs.frozen
    class Config:
        experts_per_token: int = option(2, help="experts each token is routed to (FusionBench: 2); at most the number of models",
                                        validator=in_range(1, 1024))
        gate_mode: Literal["random", "uniform_random"] = _gate_mode()

    def run(self, pool: "ModelPool", ctx: "RunContext") -> Any:
        names = list(pool.model_names)
        if self.config.experts_per_token > len(names):
            raise InputError(f"method {self.name!r}: experts_per_token {self.config.experts_per_token} exceeds the {len(names)} model(s) "
                             "of the pool (one expert each); lower it")
        return mixtral_from_dense(pool.load_model(None), [pool.load_model(n) for n in names], experts_per_token=self.config.experts_per_token,
                                  gate_mode=self.config.gate_mode, seed=ctx.seed, where=f"method {self.name!r}")


METHODS = [MixtralUpcycling, MixtralMerging]
