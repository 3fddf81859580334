"""Entry-point discovery with real (throwaway) distributions, isolation of broken plugins, env switches."""

from __future__ import annotations

import pytest

from fusion_core.errors import PluginError
from fusion_core.plugins import get_plugin_manager
from fusion_core.registry import build_registry

GOOD = '''
import attrs
import fusion_core
from fusion_core.components import Method

class Echo(Method):
    name = "echo"
    summary = "Return the base."
    def run(self, pool, ctx):
        return pool.load_model(None)

@fusion_core.hookimpl
def fusion_register_methods(register):
    register(Echo)
'''

BROKEN = '''
raise RuntimeError("boom at import")
'''

MISSPELLED = '''
import fusion_core

@fusion_core.hookimpl
def fusion_register_method(register):
    pass
'''


def test_entry_point_plugin_is_loaded_with_its_distribution(make_dist, monkeypatch):
    make_dist("fusion-demo", "fusion_demo", GOOD, entry="demo", version="2.0.1")
    monkeypatch.setenv("FUSE_LOAD_PLUGINS", "demo")
    pm = get_plugin_manager()
    record = pm.records["demo"]
    assert (record.status, record.dist, record.version) == ("ok", "fusion-demo", "2.0.1")
    entry = build_registry(pm).get("method", "echo")
    assert (entry.plugin, entry.dist) == ("demo", "fusion-demo")


def test_broken_plugin_is_recorded_and_the_rest_keeps_working(make_dist, monkeypatch):
    make_dist("fusion-demo", "fusion_demo", GOOD, entry="demo")
    make_dist("fusion-broken", "fusion_broken", BROKEN, entry="broken")
    monkeypatch.setenv("FUSE_LOAD_PLUGINS", "demo,broken")
    pm = get_plugin_manager()
    assert pm.records["broken"].status == "failed"
    assert "RuntimeError: boom at import" in pm.records["broken"].error
    assert [r.name for r in pm.failures] == ["broken"]
    assert "echo" in build_registry(pm).names("method")


def test_strict_mode_makes_a_broken_plugin_fatal(make_dist, monkeypatch):
    make_dist("fusion-broken", "fusion_broken", BROKEN, entry="broken")
    monkeypatch.setenv("FUSE_LOAD_PLUGINS", "broken")
    monkeypatch.setenv("FUSE_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match=r"plugin 'broken' \(fusion-broken 1.2.3\) failed to load: RuntimeError: boom"):
        get_plugin_manager()


def test_allowlist_empty_loads_no_entry_points(make_dist, monkeypatch):
    make_dist("fusion-demo", "fusion_demo", GOOD, entry="demo")
    monkeypatch.setenv("FUSE_LOAD_PLUGINS", "")
    pm = get_plugin_manager()
    assert pm.records["demo"].status == "skipped"
    assert "echo" not in build_registry(pm).names("method")
    assert "dummy" in build_registry(pm).names("method")  # built-ins always load


def test_allowlist_accepts_distribution_names_and_denylist_wins(make_dist, monkeypatch):
    make_dist("fusion-demo", "fusion_demo", GOOD, entry="demo")
    monkeypatch.setenv("FUSE_LOAD_PLUGINS", "fusion-demo")
    assert get_plugin_manager().records["demo"].status == "ok"
    monkeypatch.setenv("FUSE_DISABLE_PLUGINS", "demo")
    assert get_plugin_manager().records["demo"].status == "skipped"


def test_misspelled_hookimpl_names_the_plugin_and_the_hook(make_dist, monkeypatch):
    make_dist("fusion-typo", "fusion_typo", MISSPELLED, entry="typo")
    monkeypatch.setenv("FUSE_LOAD_PLUGINS", "typo")
    pm = get_plugin_manager()
    assert pm.records["typo"].status == "failed"
    assert "unknown hook 'fusion_register_method'" in pm.records["typo"].error
    assert "fusion_register_methods" in pm.records["typo"].error
    monkeypatch.setenv("FUSE_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="plugin 'typo'.*unknown hook 'fusion_register_method'"):
        get_plugin_manager()


def test_duplicate_component_names_name_both_providers(make_dist, monkeypatch):
    make_dist("fusion-demo", "fusion_demo", GOOD, entry="demo")
    make_dist("fusion-demo2", "fusion_demo2", GOOD, entry="demo2")
    monkeypatch.setenv("FUSE_LOAD_PLUGINS", "demo,demo2")
    with pytest.raises(PluginError, match=r"duplicate method name 'echo': registered by plugin 'demo' \(fusion-demo\) and by plugin 'demo2' \(fusion-demo2\)"):
        build_registry(get_plugin_manager())


def test_plugin_whose_registration_raises_is_skipped(monkeypatch):
    import fusion_core

    class Raiser:
        @fusion_core.hookimpl
        def fusion_register_methods(self, register):
            raise ValueError("cannot register")

    pm = get_plugin_manager(load_entrypoints=False, extra_plugins=[("raiser", Raiser())])
    registry = build_registry(pm)
    assert pm.records["raiser"].status == "failed" and "ValueError: cannot register" in pm.records["raiser"].error
    assert "dummy" in registry.names("method")


def test_registering_a_non_component_is_refused_naming_the_plugin():
    import fusion_core

    class Bad:
        @fusion_core.hookimpl
        def fusion_register_methods(self, register):
            register(dict)

    pm = get_plugin_manager(load_entrypoints=False, extra_plugins=[("bad", Bad())])
    with pytest.raises(PluginError, match="plugin 'bad' registered <class 'dict'> as a method, but it is not a subclass"):
        build_registry(pm)


def test_trace_switch_prints_hook_calls(monkeypatch, capsys):
    monkeypatch.setenv("FUSE_TRACE_PLUGINS", "1")
    build_registry(get_plugin_manager(load_entrypoints=False))
    assert "[fuse trace] fusion_register_methods" in capsys.readouterr().err


def test_manager_is_fresh_each_time():
    assert get_plugin_manager(load_entrypoints=False) is not get_plugin_manager(load_entrypoints=False)
