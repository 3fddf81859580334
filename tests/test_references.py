"""Every registered method names where it comes from: a paper or document URL (``fuse show``'s ``reference``),
unless it is flagged as from none; a method that reproduces FusionBench's defaults names that config on its own class."""

from __future__ import annotations

import re

from fusion_core.plugins import get_plugin_manager
from fusion_core.registry import build_registry


def _methods():
    registry = build_registry(get_plugin_manager())
    return {name: registry.get("method", name).cls for name in registry.names("method")}


def test_every_method_has_a_reference_url_unless_flagged_as_from_no_paper():
    methods = _methods()
    assert "dummy" in methods and not methods["dummy"].from_paper
    for name, cls in methods.items():
        if cls.from_paper:
            assert cls.reference_url and re.match(r"^https://\S+$", cls.reference_url), f"{name}: reference_url {cls.reference_url!r}"
        else:
            assert cls.reference_url is None, f"{name} is flagged as from no paper but has a reference_url"


def test_fusionbench_configs_are_declared_on_the_method_itself():
    # inherited, a subclass would claim its parent's FusionBench defaults (tests/parity/test_defaults.py checks the values)
    for name, cls in _methods().items():
        config = cls.fusionbench_config
        if config is not None:
            assert "fusionbench_config" in vars(cls), f"{name} inherits fusionbench_config {config!r}; declare its own (or None)"
            assert re.match(r"^[\w/.-]+\.yaml$", config) and not config.startswith("/"), f"{name}: {config!r}"


def test_fuse_show_prints_the_reference_and_the_fusionbench_config(capsys):
    import json

    from fusion_core.cli.main import main

    assert "ties" in _methods()  # fusion-merging is part of the test environment (requirements/test.txt)
    assert main(["show", "ties", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["reference"] == "https://arxiv.org/abs/2306.01708" and info["fusionbench_config"] == "ties_merging.yaml"
    assert main(["show", "ties"]) == 0
    assert "fusion_bench_config/method/ties_merging.yaml" in " ".join(capsys.readouterr().out.split())
