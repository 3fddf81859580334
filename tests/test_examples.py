"""Every config file the README shows is shipped under examples/ and works."""

from __future__ import annotations

import pathlib
import re

import pytest
import yaml

from fusion_core.cli.main import main

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def test_every_config_file_the_readme_commands_name_is_shipped():
    commands = [line for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines() if line.startswith("fuse ")]
    named = {n for line in commands for n in re.findall(r"[\w./-]+\.ya?ml", line)}
    named = {n for n in named if not n.startswith("plugins/")}  # plugin configs live with their plugin
    assert named, "the README names no config file"
    for name in named:
        assert (ROOT / name).is_file(), f"README names {name}, which is not in the repository"
        assert name.startswith("examples/"), f"README should point at examples/, not {name}"


def test_experiment_yaml_validates_and_resolves_as_documented(capsys):
    pytest.importorskip("fusion_minibench", reason="the example runs on the mini benchmark (plugins/fusion-minibench)")
    path = str(EXAMPLES / "experiment.yaml")
    assert main(["run", path, "--print-config"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    method = config["method"]
    assert (method["name"], method["density"], method["scaling_factor"]) == ("ties", 0.2, 0.3)
    assert config["modelpool"]["name"] == "minibench" and config["benchmark"] == "mini"
    assert main(["run", path, "seed=1", "output_dir=runs/exp1", "save_model=true", "--dry-run"]) == 0
    out = capsys.readouterr()
    assert "nothing was loaded" in out.err and yaml.safe_load(out.out)["method"]["scaling_factor"] == 0.3


def test_exp_yaml_plans_the_readme_sweep():
    pytest.importorskip("fusion_minibench", reason="the example runs on the mini benchmark (plugins/fusion-minibench)")
    from fusion_lab.sweep import plan_sweep

    from fusion_core.plugins import get_plugin_manager
    from fusion_core.registry import build_registry

    registry = build_registry(get_plugin_manager())
    plan = plan_sweep(registry, [str(EXAMPLES / "exp.yaml")], ["method.scaling_factor=0.1,0.3,0.5,1.0"])
    assert [p.label for p in plan.points] == [f"method.scaling_factor={v}" for v in ("0.1", "0.3", "0.5", "1.0")]
    assert (plan.splits.select, plan.splits.final) == ("val", "test")


def test_recipe_yml_merges_exactly_like_the_equivalent_fuse_merge(tmp_path, monkeypatch, capsys, write_safetensors):
    import torch
    from safetensors.torch import load_file

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(8, 4, generator=gen), "b": torch.randn(8, generator=gen)}
    for name in ("base", "math", "code"):
        state = base if name == "base" else {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        write_safetensors(tmp_path / "models" / f"{name}.safetensors", state)
    assert main(["merge", "--mergekit-config", str(EXAMPLES / "recipe.yml"), "--output", "merged.safetensors", "-q"]) == 0
    # mergekit's TIES: signs elected on weighted task vectors, divided by the agreeing weights (normalize: true)
    assert main(["merge", "ties", "--base", "models/base.safetensors", "--model", "models/math.safetensors",
                 "--model", "models/code.safetensors", "--set", "density=0.5", "--set", "weights=[0.6, 0.4]",
                 "--set", "sign_election=weighted_sum", "--set", "divisor=weights", "--output", "cli.safetensors", "-q"]) == 0
    recipe, cli = load_file("merged.safetensors"), load_file("cli.safetensors")
    assert set(recipe) == {"w", "b"} and all(torch.equal(recipe[k], cli[k]) for k in recipe)
    assert not torch.equal(recipe["w"], base["w"])


@pytest.mark.parametrize("name", ["experiment.yaml", "exp.yaml", "recipe.yml"])
def test_examples_are_valid_yaml_mappings(name):
    assert isinstance(yaml.safe_load((EXAMPLES / name).read_text(encoding="utf-8")), dict)
