"""Mixtral upcycling (identical experts compute the dense model's logits) and Mixtral MoE merging of dense fine-tunes."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import attrs
import pytest
import torch
from fusion_merging.mixtral import MixtralMerging, MixtralUpcycling

from fusion_core import InputError, ModelPool
from fusion_core.run_context import RunContext

sys.path.insert(0, str(Path(__file__).parents[3] / "tests"))  # the core's shared test helpers
from merge_testkit import tiny_llama  # noqa: E402

torch.set_num_threads(1)


@attrs.frozen
class _NoConfig:
    pass


class Pool(ModelPool):
    name = "test_lm_pool"
    summary = "in-memory causal LMs"
    Config = _NoConfig

    def __init__(self, base, models):
        super().__init__()
        self._base, self._models = base, dict(models)

    @property
    def model_names(self):
        return list(self._models)

    @property
    def has_base(self):
        return True

    def load_model(self, name=None):
        return copy.deepcopy(self._base if name is None else self._models[name])


def finetuned(base, seed):
    model = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


TOKENS = torch.tensor([[1, 5, 9, 3, 7, 2], [4, 4, 8, 0, 1, 6]])


@pytest.mark.parametrize("gate_mode", ["uniform_random", "random"])
def test_upcycled_identical_experts_give_the_dense_logits_and_reload(tmp_path, gate_mode):
    import transformers

    dense = tiny_llama(0)
    moe = MixtralUpcycling(MixtralUpcycling.Config(num_experts=4, experts_per_token=2, gate_mode=gate_mode)).run(Pool(dense, {}), RunContext())
    assert isinstance(moe, transformers.MixtralForCausalLM)
    assert moe.config.num_local_experts == 4 and moe.config.num_experts_per_tok == 2
    with torch.no_grad():
        expected = dense(TOKENS).logits
        torch.testing.assert_close(moe(TOKENS).logits, expected, rtol=1e-5, atol=1e-5)
    state = moe.state_dict()
    mlp = dense.model.layers[1].mlp
    fused = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach()
    assert all(state["model.layers.1.mlp.experts.gate_up_proj"][e].equal(fused) for e in range(4))
    assert state["model.layers.0.self_attn.q_proj.weight"].equal(dense.state_dict()["model.layers.0.self_attn.q_proj.weight"])
    moe.save_pretrained(tmp_path / "moe")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    assert type(loaded).__name__ == "MixtralForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(loaded(TOKENS).logits, expected, rtol=1e-5, atol=1e-5)


def test_upcycling_routers_are_seeded():
    dense = tiny_llama(0)
    a, b, c = (MixtralUpcycling().run(Pool(dense, {}), RunContext(seed=s)).state_dict()["model.layers.0.mlp.gate.weight"] for s in (0, 0, 1))
    assert a.equal(b) and not a.equal(c) and float(a.abs().max()) <= 32 ** -0.5  # U(±1/√hidden)


def test_merging_puts_one_finetune_per_expert_and_the_base_elsewhere():
    base = tiny_llama(0)
    models = {"x": finetuned(base, 1), "y": finetuned(base, 2), "z": finetuned(base, 3)}
    moe = MixtralMerging().run(Pool(base, models), RunContext())
    state = moe.state_dict()
    assert moe.config.num_local_experts == 3
    for e, model in enumerate(models.values()):
        mlp = model.model.layers[0].mlp
        assert state["model.layers.0.mlp.experts.gate_up_proj"][e].equal(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach())
        assert state["model.layers.0.mlp.experts.down_proj"][e].equal(mlp.down_proj.weight.detach())
    for key, value in base.state_dict().items():
        if ".mlp." not in key:
            assert state[key].equal(value), key
    # every fine-tune identical: the MoE is the dense model with the base's attention and that fine-tune's MLPs
    same = {n: models["x"] for n in ("p", "q")}
    hybrid = copy.deepcopy(base)
    for layer, source in zip(hybrid.model.layers, models["x"].model.layers, strict=True):
        layer.mlp.load_state_dict(source.mlp.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(MixtralMerging().run(Pool(base, same), RunContext())(TOKENS).logits, hybrid(TOKENS).logits,
                                   rtol=1e-5, atol=1e-5)


def test_non_llama_models_and_too_many_experts_per_token_are_one_line_errors():
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32))
    with pytest.raises(InputError, match="Llama- or Mistral-shaped"):
        MixtralUpcycling().run(Pool(gpt2, {}), RunContext())
    base = tiny_llama(0)
    with pytest.raises(InputError, match="experts_per_token 2 exceeds the 1 model"):
        MixtralMerging().run(Pool(base, {"x": base}), RunContext())
    with pytest.raises(ValueError, match="must not exceed num_experts"):
        MixtralUpcycling.Config(num_experts=2, experts_per_token=3)
