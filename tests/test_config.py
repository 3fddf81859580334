"""Configs: YAML + overrides, component selection, and every config error as one clear line."""

from __future__ import annotations

from typing import Literal

import attrs
import pytest

import fusion_core
from fusion_core.components import Method
from fusion_core.config import in_range, make_config, option, parse_override
from fusion_core.errors import ConfigError
from fusion_core.plugins import get_plugin_manager
from fusion_core.registry import build_registry
from fusion_core.runconfig import load_run_config


@attrs.frozen
class TrimConfig:
    density: float = option(0.2, help="Fraction kept.", validator=in_range(0, 1))
    scaling_factor: float = option(1.0, help="Lambda.")
    weights: list[float] | None = option(None, help="Per-model weights.")
    mode: Literal["sum", "count"] = option("sum", help="Election.")
    steps: int = option(3, help="Iterations.")


class Trim(Method):
    name = "trim_test"
    summary = "A method with typed fields."
    Config = TrimConfig

    def run(self, pool, ctx):
        return pool.load_model(None)


class Other(Trim):
    name = "other_test"
    summary = "Another method."


@pytest.fixture
def registry():
    class Plugin:
        @fusion_core.hookimpl
        def fusion_register_methods(self, register):
            register(Trim)
            register(Other)

    return build_registry(get_plugin_manager(load_entrypoints=False, extra_plugins=[("undo-config", Plugin())]))


BASE = ["modelpool=files", "taskpool=weight_stats"]


def test_method_name_gives_defaults_and_fields_override(registry):
    cfg = load_run_config([], [*BASE, "method=trim_test", "method.density=0.5", "method.weights=[1, 2]"], registry=registry)
    assert cfg.method.config == TrimConfig(density=0.5, weights=[1.0, 2.0])
    assert cfg.to_dict()["method"] == {"name": "trim_test", "density": 0.5, "scaling_factor": 1.0, "weights": [1.0, 2.0], "mode": "sum", "steps": 3}


def test_yaml_file_then_overrides_and_switching_component_resets_fields(registry, tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("method:\n  name: trim_test\n  density: 0.3\nmodelpool: files\ntaskpool: weight_stats\nseed: 7\n")
    cfg = load_run_config([path], ["method.steps=5"], registry=registry)
    assert (cfg.method.config.density, cfg.method.config.steps, cfg.settings.seed) == (0.3, 5, 7)
    cfg = load_run_config([path], ["method=other_test"], registry=registry)
    assert cfg.method.name == "other_test" and cfg.method.config.density == 0.2


def test_int_is_accepted_for_float_fields(registry):
    cfg = load_run_config([], [*BASE, "method=trim_test", "method.scaling_factor=2"], registry=registry)
    assert cfg.method.config.scaling_factor == 2.0 and isinstance(cfg.method.config.scaling_factor, float)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method=trimtest"], r"unknown method 'trimtest' \(did you mean 'trim_test'"),
        (["method=trim_test", "method.dencity=0.1"], r"unknown field method.dencity \(did you mean 'density'\?\)"),
        (["method=trim_test", "method.density=high"], r"method.density: expected float, got 'high' \(str\)"),
        (["method=trim_test", "method.steps=1.5"], r"method.steps: expected int, got 1.5"),
        (["method=trim_test", "method.mode=max"], r"method.mode: expected 'sum' \| 'count', got 'max'"),
        (["method=trim_test", "method.density=1.5"], r"method: density must be in \[0, 1\], got 1.5"),
        (["method=trim_test", "sead=1"], r"unknown key 'sead' in override 'sead=1' \(did you mean 'seed'"),
        (["method=trim_test", "seed.x=1"], r"'seed' is a plain setting"),
        (["method=trim_test", "modelpool=fils"], r"unknown model-pool 'fils' \(did you mean 'files'\?\)"),
    ],
)
def test_config_errors_are_one_clear_line(registry, overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_run_config([], [*BASE, *overrides] if "modelpool=fils" not in overrides else ["taskpool=weight_stats", *overrides], registry=registry)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "arg, message",
    [
        ("method.density", r"malformed override 'method.density': expected key=value"),
        ("=3", r"malformed override '=3': the key before '=' is empty"),
        ("a..b=1", r"malformed override 'a..b=1': empty key segment"),
        ("a.b c=1", r"invalid key segment 'b c'"),
        ("x=[1, 2", r"cannot read value '\[1, 2'"),
    ],
)
def test_malformed_overrides(arg, message):
    with pytest.raises(ConfigError, match=message):
        parse_override(arg)


def test_missing_file_and_invalid_yaml_name_the_place(registry, tmp_path):
    with pytest.raises(ConfigError, match=r"config file not found: .*nope.yaml"):
        load_run_config([tmp_path / "nope.yaml"], [], registry=registry)
    bad = tmp_path / "bad.yaml"
    bad.write_text("method:\n  name: trim_test\n  density: [0.1\nseed: 1\n")
    with pytest.raises(ConfigError, match=r"invalid YAML at .*bad.yaml:4:\d+: "):
        load_run_config([bad], [], registry=registry)
    notmap = tmp_path / "list.yaml"
    notmap.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level, got list"):
        load_run_config([notmap], [], registry=registry)


def test_unknown_top_level_key_in_yaml(registry, tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("methd: trim_test\n")
    with pytest.raises(ConfigError, match=r"exp.yaml: unknown key 'methd' \(did you mean 'method'"):
        load_run_config([path], [], registry=registry)


def test_no_dotted_path_imports(registry):
    with pytest.raises(ConfigError, match="unknown method 'os.system'"):
        load_run_config([], [*BASE, "method=os.system"], registry=registry)


def test_default_run_needs_the_mini_benchmark_or_pools(registry):
    assert "mini" not in registry.names("benchmark")  # the fixture loads no entry points
    with pytest.raises(ConfigError, match="unknown benchmark 'mini'; install the embedded benchmark"):
        load_run_config([], [], registry=registry)


def test_make_config_required_fields():
    @attrs.frozen
    class Needs:
        t: float = option(help="Interpolation factor.")

    with pytest.raises(ConfigError, match="missing required field"):
        make_config(Needs, {}, where="method")
    assert make_config(Needs, {"t": 1}, where="method").t == 1.0


def test_a_default_chosen_by_another_field_is_described_with_each_choice():
    from fusion_core import DefaultBy, DefaultCase
    from fusion_core.config import describe_fields

    chooser = DefaultBy("style", {"a": 0.2, "b": 1.0}, [DefaultCase("a", "mode", "x", 0.5)])

    @attrs.frozen
    class Chosen:
        style: Literal["a", "b"] = option("a", help="Which style fills lam.")
        mode: Literal["x", "y"] = option("y", help="A mode.")
        lam: float = option(None, help="A factor.", default_by=chooser)

    assert DefaultBy.of(attrs.fields(Chosen).lam) is chooser and DefaultBy.of(attrs.fields(Chosen).mode) is None
    assert [chooser.value_for({"style": s, "mode": m}) for s, m in (("a", "y"), ("b", "y"), ("a", "x"), ("b", "x"))] == [0.2, 1.0, 0.5, 1.0]
    rows = {row["name"]: row for row in describe_fields(Chosen)}
    assert rows["lam"] == {"name": "lam", "type": "float", "default": "0.2 (style a; b: 1.0; a with mode='x': 0.5)",
                           "help": "A factor.", "default_by_style": {"a": 0.2, "b": 1.0},
                           "default_cases": [{"choice": "a", "when": "mode", "equals": "x", "value": 0.5}]}
    assert rows["mode"] == {"name": "mode", "type": "'x' | 'y'", "default": "'y'", "help": "A mode."}
    with pytest.raises(TypeError, match="needs default=None"):
        option(0.3, help="A factor.", default_by=chooser)
