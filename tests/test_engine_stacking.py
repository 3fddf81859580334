"""Layer stacking (depth up-scaling) and the mergekit YAML translation."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: make the shared test helpers importable
from merge_testkit import fuse, load_hf, logits, perturbed, save_hf, tiny_gpt2, use_test_plugins  # noqa: E402

from fusion_core.config import make_config  # noqa: E402
from fusion_core.engine.executor import MergeOptions, merge_readers  # noqa: E402
from fusion_core.engine.stacking import LayerStack  # noqa: E402
from fusion_core.errors import ConfigError, InputError  # noqa: E402
from fusion_core.mergekit_yaml import translate  # noqa: E402


@pytest.fixture(autouse=True)
def _plugins(monkeypatch):
    use_test_plugins(monkeypatch)


def stack(slices, **kw):
    return LayerStack(make_config(LayerStack.Config, {"slices": slices, **kw}, where="method layer_stack"))


def test_gpt2_stacked_to_four_layers_reloads_and_maps_layers(tmp_path, capsys):
    base, other = tiny_gpt2(0), perturbed(tiny_gpt2(0), 5, scale=0.1)
    paths = [save_hf(base, tmp_path / "base"), save_hf(other, tmp_path / "other")]
    slices = "slices=[{model: base, layers: [0, 2]}, {model: 0, layers: [1, 2]}, {model: base, layers: [0, 1]}]"
    code, _, err = fuse(
        capsys, "merge", "layer_stack", "--base", paths[0], "--model", paths[1], "--set", slices, "-o", tmp_path / "deep"
    )
    assert code == 0, err
    assert json.loads((tmp_path / "deep" / "config.json").read_text())["n_layer"] == 4
    deep = load_hf(tmp_path / "deep")
    assert deep.config.n_layer == 4 and len(deep.transformer.h) == 4
    sources = [(base, 0), (base, 1), (other, 1), (base, 0)]
    for j, (model, i) in enumerate(sources):
        for (name, p), (_, q) in zip(
            deep.transformer.h[j].state_dict().items(), model.transformer.h[i].state_dict().items(), strict=True
        ):
            assert torch.equal(p, q), (j, name)
    assert (
        torch.equal(deep.transformer.wte.weight, base.transformer.wte.weight)
        and deep.lm_head.weight.data_ptr() == deep.transformer.wte.weight.data_ptr()
    )
    # the stacked model computes exactly what the same stack built by hand computes
    manual = tiny_gpt2(9, n_layer=4)
    manual.transformer.wte.load_state_dict(base.transformer.wte.state_dict())
    manual.transformer.wpe.load_state_dict(base.transformer.wpe.state_dict())
    manual.transformer.ln_f.load_state_dict(base.transformer.ln_f.state_dict())
    for j, (model, i) in enumerate(sources):
        manual.transformer.h[j].load_state_dict(model.transformer.h[i].state_dict())
    assert torch.equal(logits(deep), logits(manual))
    assert "layer_stack" in (tmp_path / "deep" / "README.md").read_text()


def test_stacking_in_memory_matches_file_path(tmp_path, capsys):
    base = tiny_gpt2(0)
    path = save_hf(base, tmp_path / "base")
    method = stack([{"model": "base", "layers": [1, 2]}, {"model": "base", "layers": [0, 2]}])
    state = merge_readers(method, base, [], MergeOptions())
    assert method.output_layers == 3 and method.source_layers == 2
    assert torch.equal(state["transformer.h.0.attn.c_attn.weight"], base.transformer.h[1].attn.c_attn.weight)
    code, _, err = fuse(
        capsys,
        "merge",
        "layer_stack",
        "--base",
        path,
        "--set",
        "slices=[{model: base, layers: [1, 2]}, {model: base, layers: [0, 2]}]",
        "-o",
        tmp_path / "s.safetensors",
    )
    assert code == 0, err
    stored = load_file(str(tmp_path / "s.safetensors"))
    assert set(stored) == set(state) - {"lm_head.weight"} and all(torch.equal(stored[k], state[k]) for k in stored)


def test_stacking_errors():
    base = tiny_gpt2(0)
    with pytest.raises(InputError, match=r"slices\[1\] wants layer 2 of base, which has layers 0..1"):
        merge_readers(stack([{"model": "base", "layers": [0, 1]}, {"model": "base", "layers": [1, 3]}]), base, [], MergeOptions())
    with pytest.raises(InputError, match=r"slices\[0\] takes layers from model 1, but only 1 model\(s\) were given"):
        merge_readers(stack([{"model": 1, "layers": [0, 1]}]), base, [base], MergeOptions())
    with pytest.raises(InputError, match="layer_pattern .*blk_.* matches no tensor name of base"):
        merge_readers(stack([{"model": "base", "layers": [0, 1]}], layer_pattern=r"blk_(\d+)"), base, [], MergeOptions())
    with pytest.raises(ConfigError, match=r"slices\[0\].layers must be \[start, end\] with 0 <= start < end"):
        stack([{"model": "base", "layers": [2, 1]}])
    with pytest.raises(ConfigError, match="layer_pattern needs a group"):
        stack([{"model": "base", "layers": [0, 1]}], layer_pattern=r"layers\.\d+")


# ---------------------------------------------------------------------------- mergekit YAML


def test_mergekit_ties_maps_conventions():
    recipe = translate(
        {
            "merge_method": "ties",
            "base_model": "base",
            "models": [
                {"model": "base"},
                {"model": "a", "parameters": {"weight": 0.7, "density": 0.5}},
                {"model": "b", "parameters": {"weight": 0.3, "density": 0.5}},
            ],
            "parameters": {"lambda": 0.9},
            "dtype": "bfloat16",
        }
    )
    assert (recipe.method, recipe.base, recipe.models, recipe.out_dtype) == ("ties", "base", ["a", "b"], "bfloat16")
    assert recipe.fields == {
        "convention": "mergekit",
        "sign_election": "weighted_sum",
        "divisor": "weights",
        "scaling_factor": 0.9,
        "weights": [0.7, 0.3],
        "density": 0.5,
    }


@pytest.mark.parametrize(
    ("method", "params", "expected"),
    [
        (
            "dare_ties",
            {},
            {
                "method": "dare",
                "convention": "mergekit",
                "variant": "ties",
                "sign_election": "weighted_sum",
                "divisor": "none",
                "rescale": "l1",
                "density": 1.0,
            },
        ),
        (
            "dare_linear",
            {"rescale": False, "normalize": True},
            {"method": "dare", "convention": "mergekit", "variant": "linear", "rescale": "none", "normalize": True, "density": 1.0},
        ),
        ("task_arithmetic", {"normalize": True}, {"method": "task_arithmetic", "convention": "mergekit", "normalize": True}),
        (
            "della_linear",
            {"epsilon": 0.1, "density": 0.4},
            {"method": "della", "variant": "linear", "epsilon": 0.1, "density": 0.4, "normalize": False, "rescale": "l1"},
        ),
        (
            "breadcrumbs_ties",
            {"gamma": 0.02},
            {
                "method": "breadcrumbs",
                "variant": "ties",
                "sign_election": "weighted_sum",
                "divisor": "none",
                "gamma": 0.02,
                "density": 1.0,
            },
        ),
    ],
)
def test_mergekit_method_table(method, params, expected):
    recipe = translate(
        {"merge_method": method, "base_model": "base", "models": [{"model": "a"}, {"model": "b"}], "parameters": params}
    )
    assert {"method": recipe.method, **recipe.fields} == expected


def test_mergekit_passthrough_slices_become_layer_stack():
    recipe = translate(
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": "m1", "layer_range": [0, 24]}]},
                {"sources": [{"model": "m2", "layer_range": [8, 32]}]},
                {"sources": [{"model": "m1", "layer_range": [30, 32]}]},
            ],
        }
    )
    assert (recipe.method, recipe.base, recipe.models) == ("layer_stack", None, ["m1", "m2"])
    assert recipe.fields["slices"] == [
        {"model": 0, "layers": [0, 24]},
        {"model": 1, "layers": [8, 32]},
        {"model": 0, "layers": [30, 32]},
    ]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"density": [0.1, 0.9]}}]},
            "parameter 'density' is a gradient",
        ),
        (
            {
                "merge_method": "ties",
                "base_model": "b",
                "models": [{"model": "a"}],
                "parameters": {"density": [{"filter": "mlp", "value": 0.5}, {"value": 0.2}]},
            },
            "parameter 'density' uses filters",
        ),
        (
            {"merge_method": "ties", "base_model": "b", "models": [{"model": "a"}], "tokenizer": {"source": "union"}},
            "unsupported key 'tokenizer'",
        ),
        (
            {"merge_method": "ties", "base_model": "b", "models": [{"model": "a"}], "chat_template": "chatml"},
            "unsupported key 'chat_template'",
        ),
        (
            {"merge_method": "ties", "base_model": "b", "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]}]},
            "slices are supported only with merge_method: passthrough",
        ),
        (
            {
                "merge_method": "passthrough",
                "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 2]}]}],
            },
            "slices[0] must have exactly one source",
        ),
        (
            {
                "merge_method": "ties",
                "base_model": "b",
                "models": [{"model": "a", "parameters": {"density": 0.2}}, {"model": "c", "parameters": {"density": 0.3}}],
            },
            "per-model density values differ (0.2, 0.3)",
        ),
        ({"merge_method": "nearswap", "base_model": "b", "models": [{"model": "a"}]}, "merge_method 'nearswap' is not supported"),
        ({"merge_method": "ties", "models": [{"model": "a"}]}, "merge_method ties needs base_model"),
        (
            {"merge_method": "linear", "base_model": "b", "models": [{"model": "a", "parameters": {"weight": 1}}]},
            "linear does not use base_model 'b'",
        ),
        (
            {"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"scale": 2}}]},
            "models[0].parameters.scale is not supported",
        ),
        (
            {"merge_method": "task_arithmetic", "base_model": "b", "models": [{"model": "a+lora"}]},
            "looks like a model+LoRA reference",
        ),
    ],
)
def test_mergekit_refusals_name_the_key(config, message):
    with pytest.raises(ConfigError) as info:
        translate(config, path="cfg.yaml")
    assert message in str(info.value) and str(info.value).startswith("mergekit config cfg.yaml: ")


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
    parameters: {{weight: 0.25}}
parameters:
  lambda: 0.5
dtype: float16
""")
    code, _, err = fuse(capsys, "merge", "--mergekit-config", config, "-o", tmp_path / "out")
    assert code == 0, err
    stored = load_file(str(tmp_path / "out" / "model.safetensors"))
    key = "transformer.h.0.mlp.c_fc.weight"
    b, a, c = (m.state_dict()[key] for m in (base, *fts))
    expected = (b + 0.5 * (0.75 * (a - b) + 0.25 * (c - b))).half()
    assert stored[key].dtype == torch.float16 and torch.equal(stored[key], expected)
    assert "merge_method: task_arithmetic" in (tmp_path / "out" / "README.md").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: task_arithmetic\nbase_model: x\nmodels: [{model: y}]\nparameters: {lambda: [0.1, 0.5]}\n")
    code, _, err = fuse(capsys, "merge", "--mergekit-config", bad, "-o", tmp_path / "o2")
    assert (
        code == 2
        and err.strip()
        == f"error: mergekit config {bad}: parameter 'lambda' is a gradient (a list of values over layers), which fuse merge does not support yet"
    )
