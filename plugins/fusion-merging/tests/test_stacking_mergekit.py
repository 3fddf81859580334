"""Layer stacking (depth up-scaling)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fusion_core

sys.path.insert(0, str(Path(__file__).parents[3] / "tests"))  # the core's shared merge-test helpers
from fusion_merging.stacking import LayerStack  # noqa: E402
from merge_testkit import fuse, load_hf, logits, perturbed, save_hf, tiny_gpt2, use_test_plugins  # noqa: E402

from fusion_core.config import make_config  # noqa: E402
from fusion_core.engine.stream import MergeOptions, merge_readers  # noqa: E402
from fusion_core.errors import ConfigError, InputError  # noqa: E402


class _StackingPlugin:
    @fusion_core.hookimpl
    def fusion_register_methods(self, register):
        register(LayerStack)


@pytest.fixture(autouse=True)
def _plugins(monkeypatch):
    use_test_plugins(monkeypatch, extra=[("test-stacking", _StackingPlugin())])


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
