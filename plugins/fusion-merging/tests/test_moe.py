"""`fuse moe`: Mixtral / Qwen2-MoE models assembled from tiny dense Llama experts, loaded back with transformers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parents[3] / "tests"))  # the core's shared test helpers
from merge_testkit import tiny_llama, word_tokenizer  # noqa: E402

from fusion_core.cli.main import main  # noqa: E402

torch.set_num_threads(1)
WORDS = "apple banana cherry grape car truck bus train red green blue black".split()


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    paths = {}
    for name, seed in (("base", 0), ("a", 1), ("b", 2), ("c", 3)):
        model = tiny_llama(seed, intermediate_size=48, vocab_size=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model.save_pretrained(str(root / name))
        word_tokenizer(WORDS).save_pretrained(str(root / name))
        paths[name] = root / name
    return paths


def two_experts(path: Path, experts: dict, gate_mode: str, negative: str = "") -> Path:
    """A mergekit-moe config: experts a (fruit prompts) and b (vehicle prompts, plus ``negative``), one per token."""
    path.write_text(f"""
base_model: {experts['base']}
gate_mode: {gate_mode}
experts_per_token: 1
experts:
  - source_model: {experts['a']}
    positive_prompts: ["apple banana", "cherry"]
  - source_model: {experts['b']}
    positive_prompts: ["car truck"]{negative}
""")
    return path


def _weights(path):
    return load_file(str(path / "model.safetensors"))


def test_mixtral_cheap_embed_loads_and_routes(experts, tmp_path, capsys):
    import transformers

    config = two_experts(tmp_path / "moe.yml", experts, "cheap_embed", negative='\n    negative_prompts: ["apple"]')
    assert main(["moe", str(config), "--output", str(tmp_path / "out")]) == 0, capsys.readouterr().err
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert type(model).__name__ == "MixtralForCausalLM" and model.config.num_local_experts == 2
    stored, a, b, base = _weights(tmp_path / "out"), _weights(experts["a"]), _weights(experts["b"]), _weights(experts["base"])
    fused = stored["model.layers.1.mlp.experts.gate_up_proj"]
    assert torch.equal(fused[1], torch.cat([b["model.layers.1.mlp.gate_proj.weight"], b["model.layers.1.mlp.up_proj.weight"]]))
    assert torch.equal(stored["model.layers.0.mlp.experts.down_proj"][0], a["model.layers.0.mlp.down_proj.weight"])
    assert torch.equal(stored["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    # the router rows: normalised sums of the prompts' token embeddings (bos included), minus the negatives'
    embed = base["model.embed_tokens.weight"]
    ids = {w: i + 4 for i, w in enumerate(WORDS)}

    def unit(x):
        return x / x.norm()

    row_a = unit(embed[[1, ids["apple"], ids["banana"], 1, ids["cherry"]]].sum(0))
    row_b = unit(unit(embed[[1, ids["car"], ids["truck"]]].sum(0)) - unit(embed[[1, ids["apple"]]].sum(0)))
    gate = stored["model.layers.1.mlp.gate.weight"]
    assert torch.allclose(gate[0], row_a, atol=1e-6) and torch.allclose(gate[1], row_b, atol=1e-6)
    # tokens route: the router's choice is the expert whose row best matches the token's hidden state
    tokens = torch.tensor([[1, ids["apple"], ids["car"], ids["truck"], ids["banana"]]])
    with torch.no_grad():
        out = model(tokens, output_router_logits=True)
    assert torch.isfinite(out.logits).all()
    logits = out.router_logits[0].reshape(-1, 2)
    assert logits.shape == (5, 2) and len(set(logits.argmax(-1).tolist())) == 2  # both experts get tokens


def test_qwen2_moe_with_a_shared_expert_and_random_gates(experts, tmp_path, capsys):
    import transformers

    config = tmp_path / "qwen.yml"
    config.write_text(f"""
base_model: {experts['base']}
architecture: qwen
gate_mode: random
dtype: float32
experts:
  - source_model: {experts['a']}
  - source_model: {experts['b']}
shared_experts:
  - source_model: {experts['c']}
    residual_scale: 0.5
""")
    assert main(["moe", str(config), "--output", str(tmp_path / "q"), "--seed", "3"]) == 0, capsys.readouterr().err
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "q")).eval()
    assert type(model).__name__ == "Qwen2MoeForCausalLM" and model.config.num_experts == 2
    stored, c = _weights(tmp_path / "q"), _weights(experts["c"])
    assert torch.equal(stored["model.layers.0.mlp.shared_expert.down_proj.weight"], c["model.layers.0.mlp.down_proj.weight"] * 0.5)
    assert stored["model.layers.1.mlp.shared_expert_gate.weight"].shape == (1, 32)
    assert torch.count_nonzero(stored["model.layers.0.self_attn.q_proj.bias"]) == 0  # Llama has no attention bias
    gen = torch.Generator().manual_seed(3)
    assert torch.equal(stored["model.layers.0.mlp.gate.weight"], torch.randn((2, 3, 32), generator=gen)[0, :2])
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 6, 7]])).logits).all()


def test_hidden_gates_are_the_bases_hidden_states_at_each_layer_input(experts, tmp_path, capsys):
    import transformers

    config = two_experts(tmp_path / "hidden.yml", experts, "hidden")
    assert main(["moe", str(config), "--output", str(tmp_path / "out")]) == 0, capsys.readouterr().err
    base = transformers.AutoModelForCausalLM.from_pretrained(str(experts["base"])).eval()
    tok = word_tokenizer(WORDS)
    tok.padding_side, tok.pad_token_id = "left", tok.bos_token_id

    def state(prompts):  # last token of bos + prompt, averaged over prompts, per layer input
        batch = tok(["<s>" + p for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            hidden = base(**batch, output_hidden_states=True).hidden_states[:-1]
        rows = torch.stack([h[:, -1, :].mean(0) for h in hidden])
        return rows / rows.norm(dim=-1, keepdim=True)

    stored = _weights(tmp_path / "out")
    for layer in range(2):
        gate = stored[f"model.layers.{layer}.mlp.gate.weight"]
        assert torch.allclose(gate[0], state(["apple banana", "cherry"])[layer], atol=1e-5)
        assert torch.allclose(gate[1], state(["car truck"])[layer], atol=1e-5)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("gate_mode: cheap_embed\nexperts: [{source_model: A, positive_prompts: [x]}, {source_model: B, positive_prompts: [x]}]", "every expert has the same prompts"),
        ("gate_mode: hidden\nexperts: [{source_model: A}]", "experts[0] has no positive_prompts"),
        ("gate_mode: random\nexperts: [{source_model: A}]\nshared_experts: [{source_model: B}]\narchitecture: mixtral", "Mixtral has no shared experts"),
        ("gate_mode: random\nexperts: [{source_model: A}]\narchitecture: deepseek", "architecture 'deepseek' is not supported"),
        ("gate_mode: routerless\nexperts: [{source_model: A}]", "gate_mode 'routerless' is not one of"),
        ("experts_per_token: 3\ngate_mode: random\nexperts: [{source_model: A}]", "experts_per_token must be an integer from 1"),
    ],
)  # fmt: skip
def test_refusals(tmp_path, capsys, body, message):
    config = tmp_path / "bad.yml"
    config.write_text("base_model: B\n" + body + ("" if "experts_per_token" in body else "\nexperts_per_token: 1") + "\n")
    assert main(["moe", str(config), "-o", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err
