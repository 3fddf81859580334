"""mergekit YAML recipes: schema, parameter resolution, method mapping, planning, and `fuse merge --mergekit-config`.

(The comparison with mergekit's own outputs is in ``tests/parity/test_mergekit_recipes.py``.)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parents[3] / "tests"))  # the core's shared merge-test helpers
from fusion_merging.mergekit import schema  # noqa: E402
from fusion_merging.mergekit.mapping import all_mappings  # noqa: E402
from fusion_merging.mergekit.recipe import build, plan, translate  # noqa: E402
from merge_testkit import fuse, perturbed, save_hf, tiny_gpt2, tiny_llama, word_tokenizer  # noqa: E402

from fusion_core.engine.readers import StateDictReader  # noqa: E402
from fusion_core.engine.stream import MergeOptions, merge_readers  # noqa: E402
from fusion_core.errors import ConfigError, InputError  # noqa: E402

FLOAT = schema.converter(float, "x")


def toy(seed: int, layers: int = 3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {"model.embed_tokens.weight": torch.randn(10, 4, generator=gen)}
    for i in range(layers):
        state[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(4, 4, generator=gen)
        state[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(8, 4, generator=gen)
    state["model.norm.weight"] = torch.randn(4, generator=gen)
    state["lm_head.weight"] = torch.randn(10, 4, generator=gen)
    return state


def readers(**states) -> dict:
    return {name: StateDictReader(state, label=name) for name, state in states.items()}


# --------------------------------------------------------------------------- values


def test_gradients_interpolate_as_mergekit():
    # t·(n−1) between the two nearest points: t=1/3 over 5 points → 4/3 → 0.5 + (0.3 − 0.5)/3
    assert schema.evaluate([0, 0.5, 0.3, 0.7, 1], "x", 1 / 3, FLOAT) == pytest.approx((2 / 3) * 0.5 + (1 / 3) * 0.3)
    assert schema.evaluate([0, 1], "x", 0.0, FLOAT) == 0.0 and schema.evaluate([0, 1], "x", 1.0, FLOAT) == 1.0
    # non-numeric gradients pick a point: int(t·(n−1))
    assert schema.evaluate([True, False], "x", 0.99, schema.converter(bool, "b")) is True


def test_filters_first_match_then_default_and_precedence():
    setting = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "attn", "value": 7}, {"value": 0.5}]
    assert schema.evaluate(setting, "model.layers.0.self_attn.q_proj.weight", 0.25, FLOAT) == 0.25
    assert schema.evaluate(setting, "h.0.attn.c_attn.weight", 0.25, FLOAT) == 7.0
    assert schema.evaluate(setting, "model.norm.weight", 0.25, FLOAT) == 0.5
    assert schema.evaluate([{"filter": "mlp", "value": 1}], "model.norm.weight", 0, FLOAT) is None
    # source > slice > top level > default; a scope whose filters do not match falls through
    scopes = ({"w": [{"filter": "mlp", "value": 1.0}]}, {"w": 2.0}, {"w": 3.0})
    assert schema.resolve("w", scopes, "a.mlp.b", 0, FLOAT, 9.0, "cfg") == 1.0
    assert schema.resolve("w", scopes, "a.attn.b", 0, FLOAT, 9.0, "cfg") == 2.0
    assert schema.resolve("w", (None, {}), "a", 0, FLOAT, 9.0, "cfg") == 9.0
    with pytest.raises(ConfigError, match="missing required parameter 'w' for tensor 'a'"):
        schema.resolve("w", (None,), "a", 0, FLOAT, schema.REQUIRED, "cfg")


# --------------------------------------------------------------------------- mapping and planning


def test_every_shared_mergekit_method_is_declared_next_to_a_method():
    table = all_mappings()
    assert set(table) == {
        "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
        "della", "della_linear", "slerp", "nuslerp", "multislerp", "karcher", "model_stock", "sce", "passthrough",
    }  # fmt: skip
    assert table["ties"].fixed == {"convention": "mergekit", "sign_election": "weighted_sum"}
    assert table["nuslerp"].fixed == {"convention": "mergekit"} and table["nuslerp"].shared["nuslerp_row_wise"].to == "row_wise"


def _fields(planned, name):
    return next(p.fields for p in planned.tensors if p.name == name)


def test_ties_per_model_gradients_and_filters_resolve_per_tensor():
    recipe = translate(
        {
            "merge_method": "ties",
            "base_model": "base",
            "models": [
                {"model": "base"},
                {"model": "a", "parameters": {"density": [1, 0.5, 0.0], "weight": 1.0}},
                {"model": "b", "parameters": {"density": 0.3, "weight": [{"filter": "mlp", "value": 0.5}, {"value": 0}]}},
            ],
            "parameters": {"lambda": 0.9},
        }
    )
    planned = plan(recipe, readers(base=toy(0), a=toy(1), b=toy(2)))
    assert [p.name for p in planned.tensors][:2] == ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"]
    layer1 = _fields(planned, "model.layers.1.mlp.up_proj.weight")  # t = 0.5
    assert layer1 == {
        "convention": "mergekit",
        "sign_election": "weighted_sum",
        "divisor": "weights",  # mergekit's ties default normalize: true
        "scaling_factor": 0.9,
        "weights": [1.0, 0.5],
        "density": [0.5, 0.3],
    }
    assert _fields(planned, "model.layers.2.self_attn.q_proj.weight")["weights"] == [1.0, 0.0]
    assert _fields(planned, "model.embed_tokens.weight")["density"] == [1.0, 0.3]  # non-layer tensors: t = 0


def test_routed_merge_equals_per_tensor_kernels():
    """The routed method and slot readers give, tensor by tensor, what the configured method gives."""
    from fusion_merging.task_arithmetic import Ties

    from fusion_core.config import make_config
    from fusion_core.engine.kernel import KernelContext

    states = {"base": toy(0), "a": toy(1), "b": toy(2)}
    recipe = translate(
        {
            "merge_method": "ties",
            "base_model": "base",
            "models": [
                {"model": "a", "parameters": {"density": [1, 0.2], "weight": 1.0}},
                {"model": "b", "parameters": {"density": 0.5, "weight": 0.5}},
            ],
        }
    )
    planned = plan(recipe, readers(**states))
    method, base, models = build(planned, readers(**states))
    merged = merge_readers(method, base, models, MergeOptions(prefetch=False))
    for p in planned.tensors:
        ties = Ties(make_config(Ties.Config, p.fields, where="ties"))
        ref = ties.kernel(p.name, states["base"][p.name], [states["a"][p.name], states["b"][p.name]], KernelContext(p.name))
        assert torch.equal(merged[p.name], ref), p.name


def test_slices_with_several_sources_renumber_layers_and_take_ends_from_first_and_last_slice():
    states = {"a": toy(1, layers=4), "b": toy(2, layers=4)}
    recipe = translate(
        {
            "merge_method": "linear",
            "slices": [
                {"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [2, 4]}]},
                {"sources": [{"model": "b", "layer_range": [3, 4]}]},
            ],
            "parameters": {"weight": 1.0},
        }
    )
    planned = plan(recipe, readers(**states))
    assert planned.layers_out == 3
    by_name = {p.name: p for p in planned.tensors}
    assert by_name["model.layers.1.mlp.up_proj.weight"].sources == (
        ("a", "model.layers.1.mlp.up_proj.weight"),
        ("b", "model.layers.3.mlp.up_proj.weight"),
    )
    assert by_name["model.layers.2.mlp.up_proj.weight"].sources == (("b", "model.layers.3.mlp.up_proj.weight"),)
    assert by_name["model.embed_tokens.weight"].sources == (("a", "model.embed_tokens.weight"), ("b", "model.embed_tokens.weight"))
    assert by_name["model.norm.weight"].sources == (("b", "model.norm.weight"),)  # post weights: the last slice
    method, base, models = build(planned, readers(**states))
    merged = merge_readers(method, base, models, MergeOptions(prefetch=False))
    a1, b3 = states["a"]["model.layers.1.mlp.up_proj.weight"], states["b"]["model.layers.3.mlp.up_proj.weight"]
    assert torch.allclose(merged["model.layers.1.mlp.up_proj.weight"], (a1 + b3) / 2)
    assert torch.equal(merged["model.layers.2.mlp.up_proj.weight"], b3)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"merge_method": "arcee_fusion", "base_model": "a", "models": [{"model": "b"}]}, "merge_method 'arcee_fusion' is not supported"),
        ({"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"scale": 2}}]}, "models[0].parameters.scale is not a parameter of mergekit's ties"),
        ({"merge_method": "ties", "base_model": "b", "models": [{"model": "a"}], "tokenizer": {"source": "base", "tokens": {"<x>": {"source": {"kind": "one"}}}}}, "tokenizer.tokens.<x>.source must be a model path, {kind: zero}"),
        ({"merge_method": "ties", "base_model": "b", "models": [{"model": "a"}], "modules": {}}, "multi-module merges"),
        ({"merge_method": "ties", "base_model": "b", "models": [{"model": "a"}], "bogus": 1}, "unsupported key 'bogus'"),
        ({"merge_method": "task_arithmetic", "base_model": "b", "models": [{"model": "a+lora"}]}, "looks like a model+LoRA reference"),
        ({"merge_method": "ties", "slices": [{"sources": [{"model": "a", "layer_range": [2, 1]}]}]}, "layer_range must be [start, end]"),
        ({"merge_method": "ties", "models": [{"model": "a"}], "slices": [{"sources": []}]}, "give exactly one of models or slices"),
    ],
)  # fmt: skip
def test_refusals_name_the_key(config, message):
    with pytest.raises(ConfigError) as info:
        translate(config, path="cfg.yaml")
    assert message in str(info.value) and str(info.value).startswith("mergekit config cfg.yaml: ")


@pytest.mark.parametrize(
    ("config", "error", "message"),
    [
        ({"merge_method": "ties", "base_model": "base", "models": [{"model": "a"}]}, ConfigError, "missing required parameter 'weight'"),
        ({"merge_method": "ties", "models": [{"model": "a", "parameters": {"weight": 1}}]}, ConfigError, "ties needs base_model"),
        ({"merge_method": "ties", "base_model": "base", "rescale": None, "models": [{"model": "a", "parameters": {"weight": 1}}], "parameters": {"rescale": True}}, ConfigError, "rescale: true is not supported for ties"),
        ({"merge_method": "slerp", "base_model": "base", "models": [{"model": "a"}, {"model": "b"}], "parameters": {"t": 0.5}}, ConfigError, "slerp takes exactly 2 inputs; slices[0] has 3"),
        ({"merge_method": "linear", "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 3]}]}]}, ConfigError, "must span the same number of layers"),
        ({"merge_method": "linear", "slices": [{"sources": [{"model": "a", "layer_range": [0, 5]}]}]}, InputError, "wants layers 0..4 of a, which has layers 0..2"),
        ({"merge_method": "ties", "base_model": "base", "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}]}]}, ConfigError, "base_model base is not an input of slices[0]"),
    ],
)  # fmt: skip
def test_plan_refusals(config, error, message):
    config = {k: v for k, v in config.items() if v is not None}
    with pytest.raises(error, match=None) as info:
        plan(translate(config), readers(base=toy(0), a=toy(1), b=toy(2)))
    assert message in str(info.value)


# --------------------------------------------------------------------------- the command


def test_fuse_merge_with_a_mergekit_config(tmp_path, capsys):
    base = tiny_gpt2(0)
    fts = [perturbed(base, 1), perturbed(base, 2)]
    paths = [save_hf(m, tmp_path / name) for m, name in zip([base, *fts], ["base", "a", "b"], strict=True)]
    config = tmp_path / "ta.yaml"
    config.write_text(f"""
merge_method: task_arithmetic
base_model: {paths[0]}
models:
  - model: {paths[0]}
  - model: {paths[1]}
    parameters: {{weight: 0.75}}
  - model: {paths[2]}
    parameters:
      weight: [{{filter: mlp, value: [0.0, 1.0]}}, {{value: 0.25}}]
parameters:
  lambda: 0.5
dtype: float16
""")
    code, _, err = fuse(capsys, "merge", "--mergekit-config", config, "-o", tmp_path / "out")
    assert code == 0, err
    stored = load_file(str(tmp_path / "out" / "model.safetensors"))
    for key, w in (("transformer.h.0.mlp.c_fc.weight", 0.0), ("transformer.h.1.mlp.c_fc.weight", 1.0), ("transformer.h.1.attn.c_attn.weight", 0.25)):
        b, a, c = (m.state_dict()[key] for m in (base, *fts))
        expected = (b + 0.5 * (0.75 * (a - b) + w * (c - b))).half()
        assert stored[key].dtype == torch.float16 and torch.allclose(stored[key].float(), expected.float(), atol=1e-3), key
    card = (tmp_path / "out" / "README.md").read_text()
    assert "merge_method: task_arithmetic" in card and (tmp_path / "out" / "mergekit_config.yml").read_text() == config.read_text()
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (written.get("dtype") or written.get("torch_dtype")) == "float16"
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: task_arithmetic\nbase_model: x\nmodels: [{model: y}]\nparameters: {lambda: 0.5, scale: 2}\n")
    code, _, err = fuse(capsys, "merge", "--mergekit-config", bad, "-o", tmp_path / "o2")
    assert code == 2 and err.strip() == (
        f"error: mergekit config {bad}: parameters.scale is not a parameter of mergekit's task_arithmetic "
        "(it takes density, int8_mask, lambda, normalize, rescale, weight)"
    )


def test_passthrough_slices_stack_layers_and_update_the_config(tmp_path, capsys):
    a, b = tiny_gpt2(0, n_layer=3), tiny_gpt2(5, n_layer=3)
    pa, pb = save_hf(a, tmp_path / "a"), save_hf(b, tmp_path / "b")
    config = tmp_path / "stack.yml"
    config.write_text(
        f"merge_method: passthrough\nslices:\n  - sources: [{{model: {pa}, layer_range: [0, 2]}}]\n"
        f"  - sources: [{{model: {pb}, layer_range: [1, 3]}}]\n"
    )
    code, _, err = fuse(capsys, "merge", "--mergekit-config", config, "-o", tmp_path / "deep")
    assert code == 0, err
    assert json.loads((tmp_path / "deep" / "config.json").read_text())["n_layer"] == 4
    stored = load_file(str(tmp_path / "deep" / "model.safetensors"))
    assert torch.equal(stored["transformer.h.3.mlp.c_fc.weight"], b.state_dict()["transformer.h.2.mlp.c_fc.weight"])
    assert torch.equal(stored["transformer.wte.weight"], a.state_dict()["transformer.wte.weight"])  # pre: first slice
    assert torch.equal(stored["transformer.ln_f.weight"], b.state_dict()["transformer.ln_f.weight"])  # post: last slice


def test_della_mergekit_ranking_is_along_dim_1_for_tensors_above_2d():
    """mergekit ranks |τ| along dim 1 (one ranking per (i, k)); fusion's default ranks each flattened row."""
    from fusion_merging.task_arithmetic import Della

    from fusion_core.config import make_config

    tau = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    della = Della(make_config(Della.Config, {"ranking": "dim1"}, where="della"))
    probs = della.keep_probs(tau, 0.5, 0.1)
    for i in range(2):
        for k in range(4):
            ranks = tau[i, :, k].abs().argsort().argsort().float()  # 0, 1, 2 from the smallest
            assert torch.allclose(probs[i, :, k], 0.4 + 0.2 * ranks / 2)
    rows = Della(make_config(Della.Config, {}, where="della")).keep_probs(tau, 0.5, 0.1)
    flat_ranks = tau.reshape(2, -1).abs().argsort(dim=1).argsort(dim=1).float()
    assert torch.allclose(rows.reshape(2, -1), 0.4 + 0.2 * flat_ranks / 11) and not torch.allclose(rows, probs)
    assert all_mappings()["della"].fixed["ranking"] == "dim1"


def _word_model(folder: Path, words: list[str], seed: int) -> dict[str, torch.Tensor]:
    word_tokenizer(words, specials=("<s>", "</s>")).save_pretrained(str(folder))
    model = tiny_llama(seed, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, vocab_size=len(words) + 2)
    model.save_pretrained(str(folder))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def word_models(tmp_path):
    """Two tiny Llamas with different word tokenizers: a (red green blue) and b (blue plum red)."""
    return _word_model(tmp_path / "a", ["red", "green", "blue"], 1), _word_model(tmp_path / "b", ["blue", "plum", "red"], 2)


def test_tokenizer_union_permutes_rows_and_fills_missing_tokens_as_mergekit(tmp_path, capsys, word_models):
    import transformers

    a, b = word_models
    config = tmp_path / "union.yml"
    config.write_text(
        f"merge_method: linear\nmodels:\n  - model: {tmp_path / 'a'}\n    parameters: {{weight: 0.75}}\n"
        f"  - model: {tmp_path / 'b'}\n    parameters: {{weight: 0.25}}\ntokenizer:\n  source: union\n  pad_to_multiple_of: 4\n"
    )
    code, _, err = fuse(capsys, "merge", "--mergekit-config", config, "-o", tmp_path / "out")
    assert code == 0, err
    vocab = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out")).get_vocab()
    assert set(vocab) == {"<s>", "</s>", "red", "green", "blue", "plum"} and vocab["plum"] == 5  # new tokens after a's
    stored = load_file(str(tmp_path / "out" / "model.safetensors"))
    emb, ea, eb = stored["model.embed_tokens.weight"], a["model.embed_tokens.weight"], b["model.embed_tokens.weight"]
    assert emb.shape == (8, 8)  # 6 tokens padded to a multiple of 4
    ids_a, ids_b = {"red": 2, "green": 3, "blue": 4}, {"blue": 2, "plum": 3, "red": 4}
    assert torch.allclose(emb[vocab["red"]], 0.75 * ea[ids_a["red"]] + 0.25 * eb[ids_b["red"]])  # both have it
    assert torch.allclose(emb[vocab["green"]], ea[ids_a["green"]])  # only a: a's row in both copies
    assert torch.allclose(emb[vocab["plum"]], eb[ids_b["plum"]])  # only b
    assert torch.allclose(emb[6], emb[:6].mean(0)) and torch.equal(emb[6], emb[7])  # padding: the mean row
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 8


def test_tokenizer_tokens_add_tokens_and_choose_their_rows(tmp_path, capsys, word_models):
    import transformers

    a, b = word_models
    config = tmp_path / "tokens.yml"
    config.write_text(
        f"merge_method: linear\nmodels:\n  - model: {tmp_path / 'a'}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {tmp_path / 'b'}\n    parameters: {{weight: 0.5}}\ntokenizer:\n  source: base\n  tokens:\n"
        f"    plum: {{source: {tmp_path / 'b'}}}\n    '<new>': {{source: {{kind: zero}}}}\n"
        f"    red: {{source: {{kind: model_token, model: {tmp_path / 'a'}, token: green}}, force: true}}\n"
    )
    code, _, err = fuse(capsys, "merge", "--mergekit-config", config, "-o", tmp_path / "out")
    assert code == 0, err
    vocab = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out")).get_vocab()
    assert vocab["plum"] == 5 and vocab["<new>"] == 6  # added after the base's tokens
    emb = load_file(str(tmp_path / "out" / "model.safetensors"))["model.embed_tokens.weight"]
    ea, eb = a["model.embed_tokens.weight"], b["model.embed_tokens.weight"]
    assert torch.allclose(emb[vocab["plum"]], eb[3]) and torch.equal(emb[vocab["<new>"]], torch.zeros(8))
    assert torch.allclose(emb[vocab["red"]], ea[3])  # forced: a's "green" row in both copies
    assert torch.allclose(emb[vocab["blue"]], 0.5 * ea[4] + 0.5 * eb[2])


def test_chat_template_literal_auto_and_builtin_names(tmp_path, capsys, word_models):
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    for folder, value in ((a_dir, template), (b_dir, "other")):
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["chat_template"] = value
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    body = f"merge_method: linear\nmodels:\n  - model: {a_dir}\n    parameters: {{weight: 1}}\n  - model: {b_dir}\n    parameters: {{weight: 1}}\n"
    for name, value, expected in (("literal", '"{{ messages }}"', "{{ messages }}"), ("auto", "auto", template)):
        recipe = tmp_path / f"{name}.yml"
        recipe.write_text(body + f"chat_template: {value}\n")
        code, _, err = fuse(capsys, "merge", "--mergekit-config", recipe, "-o", tmp_path / name)
        assert code == 0, err
        assert json.loads((tmp_path / name / "tokenizer_config.json").read_text())["chat_template"] == expected
    recipe = tmp_path / "named.yml"
    recipe.write_text(body + "chat_template: chatml\n")
    code, _, err = fuse(capsys, "merge", "--mergekit-config", recipe, "-o", tmp_path / "named")
    assert code == 2 and "chat_template 'chatml' is a mergekit built-in template name" in " ".join(err.split())


def test_slerp_and_nuslerp_mergekit_conventions():
    import math

    from fusion_merging.geometric import NuSlerp, Slerp

    from fusion_core.config import make_config
    from fusion_core.engine.kernel import KernelContext

    ctx = KernelContext("w")
    b = torch.tensor([3.0, 4.0])
    mk = Slerp(make_config(Slerp.Config, {"t": 0.3, "convention": "mergekit"}, where="slerp"))
    fu = Slerp(make_config(Slerp.Config, {"t": 0.3}, where="slerp"))
    # a zero tensor: mergekit treats it as orthogonal (sin(tπ/2)·b), fusion lerps (t·b)
    assert torch.allclose(mk.kernel("w", torch.zeros(2), [b], ctx), math.sin(0.3 * math.pi / 2) * b)
    assert torch.allclose(fu.kernel("w", torch.zeros(2), [b], ctx), 0.3 * b)
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    y = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))

    def nuslerp(**fields):
        return NuSlerp(make_config(NuSlerp.Config, {"weights": [0.4, 0.6], "flatten": False, **fields}, where="nuslerp"))

    def slerp_vectors(a, c):  # each vector (row of a, c) on its own
        return torch.stack([Slerp(make_config(Slerp.Config, {"t": 0.6}, where="s")).kernel("w", u, [v], ctx) for u, v in zip(a, c, strict=True)])

    # mergekit's nuslerp_row_wise: true → vectors along dim 0 (columns), false → along the last dim (rows)
    assert torch.allclose(nuslerp(row_wise=True, convention="mergekit").kernel("w", None, [x, y], ctx), slerp_vectors(x.T, y.T).T, atol=1e-6)
    assert torch.allclose(nuslerp(row_wise=False, convention="mergekit").kernel("w", None, [x, y], ctx), slerp_vectors(x, y), atol=1e-6)
    assert torch.allclose(nuslerp(row_wise=True).kernel("w", None, [x, y], ctx), slerp_vectors(x, y), atol=1e-6)  # fusion: rows
    assert all_mappings()["nuslerp"].shared["nuslerp_row_wise"].to == "row_wise"


def test_two_phase_row_blocks_match_whole_tensors_with_reordered_sources():
    """TIES's two-phase path (large tensors, row blocks) gives the whole-tensor bytes when slices list models in other orders."""
    states = {"base": toy(0, layers=4), "a": toy(1, layers=4), "b": toy(2, layers=4)}
    src = lambda m, r, d, w: {"model": m, "layer_range": r, "parameters": {"density": d, "weight": w}}  # noqa: E731
    recipe = translate(
        {
            "merge_method": "ties",
            "base_model": "base",
            "slices": [
                {"sources": [{"model": "base", "layer_range": [0, 2]}, src("a", [0, 2], 0.3, 1.0), src("b", [0, 2], 0.6, 0.5)]},
                {"sources": [{"model": "base", "layer_range": [2, 4]}, src("b", [2, 4], 0.2, 0.7), src("a", [2, 4], 0.9, 0.2)]},
            ],
        }
    )
    outputs = []
    for chunk_bytes in (64 * 2**20, 64):
        planned = plan(recipe, readers(**states))
        method, base, models = build(planned, readers(**states))
        outputs.append(merge_readers(method, base, models, MergeOptions(prefetch=False, chunk_bytes=chunk_bytes)))
    whole, blocks = outputs
    assert all(torch.equal(whole[k], blocks[k]) for k in whole)
    from fusion_merging.task_arithmetic import Ties

    from fusion_core.config import make_config
    from fusion_core.engine.kernel import KernelContext

    name = "model.layers.3.mlp.up_proj.weight"  # slice 2: b then a
    fields = next(p.fields for p in planned.tensors if p.name == name)
    assert fields["density"] == [0.2, 0.9] and fields["weights"] == [0.7, 0.2]
    ties = Ties(make_config(Ties.Config, fields, where="ties"))
    ref = ties.kernel(name, states["base"][name], [states["b"][name], states["a"][name]], KernelContext(name))
    assert torch.equal(blocks[name], ref)


def test_a_buffer_only_the_donor_stores_is_copied_not_merged():
    base = {**toy(0), "model.masked_bias": torch.tensor(-1e4), "model.position_ids": torch.arange(6)}
    states = {"base": base, "a": toy(1), "b": {**toy(2), "model.position_ids": torch.arange(6)}}
    recipe = translate(
        {"merge_method": "ties", "base_model": "base", "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.5}} for m in "ab"]}
    )
    planned = plan(recipe, readers(**states))
    assert any("'model.masked_bias' (a non-persistent buffer) is missing from a, b; taken from base" in n for n in planned.notes)
    method, slot_base, models = build(planned, readers(**states))
    merged = merge_readers(method, slot_base, models, MergeOptions(prefetch=False))
    assert torch.equal(merged["model.masked_bias"], base["model.masked_bias"])
    assert torch.equal(merged["model.position_ids"], base["model.position_ids"])
