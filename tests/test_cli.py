"""The ``fuse`` CLI: listing, showing, plugins, errors as one line with a nonzero exit, --debug."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fusion_core.cli.main import main


def fuse(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_version(capsys):
    from fusion_core import __version__

    code, out, _ = fuse(capsys, "--version")
    assert code == 0 and out.strip() == f"fuse (fusion-core) {__version__}"


def test_list_json_shows_builtins_with_plugin_and_flags(capsys):
    code, out, _ = fuse(capsys, "list", "--json")
    data = json.loads(out)
    assert code == 0
    dummy = next(m for m in data["methods"] if m["name"] == "dummy")
    assert dummy["plugin"] == "fusion_core.methods" and dummy["summary"].startswith("Return the base model")
    assert any(p["name"] == "files" for p in data["model-pools"])
    assert any(t["name"] == "weight_stats" for t in data["task-pools"])


def test_list_one_kind_as_table(capsys):
    code, out, _ = fuse(capsys, "list", "task-pools")
    assert code == 0 and "weight_stats" in out and "files" not in out


def test_show_lists_fields_types_defaults_and_help(capsys):
    code, out, _ = fuse(capsys, "show", "files", "--json")
    info = json.loads(out)
    assert code == 0 and info["kind"] == "model-pool"
    fields = {f["name"]: f for f in info["fields"]}
    assert fields["allow_pickle"] == {"name": "allow_pickle", "type": "bool", "default": "False",
                                      "help": "Allow pickle checkpoints (.bin/.pt); only for files you trust."}
    assert fields["base"]["type"] == "str | None"


def test_show_unknown_name_suggests(capsys):
    code, _, err = fuse(capsys, "show", "dumy")
    assert code == 2 and err.strip() == "error: nothing is registered as 'dumy' (did you mean 'dummy'?)"


def test_plugins_all_json(capsys):
    code, out, _ = fuse(capsys, "plugins", "--all", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 0
    assert rows["fusion_core.methods"]["registered"] == ["method:dummy"] or "method:dummy" in rows["fusion_core.methods"]["registered"]
    assert rows["fusion_core.methods"]["hooks"] == ["fusion_register_methods"]
    assert rows["fusion_core.methods"]["distribution"] == "fusion-core" and rows["fusion_core.methods"]["status"] == "ok"


def test_plugins_without_all_hides_builtins(capsys, monkeypatch):
    monkeypatch.setenv("FUSE_LOAD_PLUGINS", "")
    code, out, _ = fuse(capsys, "plugins", "--json")
    rows = json.loads(out)
    assert code == 0 and not any(r["builtin"] for r in rows)
    assert all(r["status"] == "skipped" and r["registered"] == [] for r in rows)  # installed but not allowed


def test_broken_plugin_warns_once_on_stderr_and_cli_still_works(capsys, make_dist, monkeypatch):
    make_dist("fusion-broken", "fusion_broken", "raise ImportError('missing dependency xyz')\n", entry="broken", version="0.9")
    monkeypatch.setenv("FUSE_LOAD_PLUGINS", "broken")
    code, out, err = fuse(capsys, "plugins", "--json")
    assert code == 0
    assert err.count("warning: plugin 'broken' (fusion-broken 0.9) failed to load: ImportError: missing dependency xyz") == 1
    row = next(r for r in json.loads(out) if r["name"] == "broken")
    assert (row["status"], row["error"]) == ("failed", "ImportError: missing dependency xyz")


def test_strict_plugins_turns_the_warning_into_an_error(capsys, make_dist, monkeypatch):
    make_dist("fusion-broken", "fusion_broken", "raise ImportError('nope')\n", entry="broken")
    monkeypatch.setenv("FUSE_LOAD_PLUGINS", "broken")
    monkeypatch.setenv("FUSE_STRICT_PLUGINS", "1")
    code, _, err = fuse(capsys, "list")
    assert code == 2 and "error: plugin 'broken' (fusion-broken 1.2.3) failed to load: ImportError: nope" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "method.density"], "error: malformed override 'method.density': expected key=value"),
        (["run", "=3"], "error: malformed override '=3': the key before '=' is empty"),
        (["run", "a..b=1"], "error: malformed override 'a..b=1': empty key segment"),
        (["run", "missing.yaml"], "error: config file not found: missing.yaml"),
        (["run", "method=nope", "modelpool=files", "taskpool=weight_stats"], "error: unknown method 'nope'"),
        (["run", "method=dummy", "modelpool=files", "taskpool=weight_stats", "modelpool.bse=x"],
         "error: unknown field modelpool.bse (did you mean 'base'?)"),
        (["run", "method=dummy", "modelpool=files", "taskpool=weight_stats", "seed=abc"], "error: run.seed: expected int, got 'abc' (str)"),
    ],
)
def test_bad_inputs_give_one_line_and_exit_2(capsys, args, message):
    code, _, err = fuse(capsys, *args)
    assert code == 2
    assert err.startswith(message) and err.count("\n") == 1, err


def test_debug_shows_the_traceback(capsys):
    from fusion_core.errors import ConfigError

    with pytest.raises(ConfigError):
        main(["--debug", "run", "method.density"])


def test_real_subprocess_help_and_error(tmp_path):
    env = {**os.environ, "FUSE_LOAD_PLUGINS": ""}
    exe = [sys.executable, "-m", "fusion_core"]
    ok = subprocess.run([*exe, "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert ok.returncode == 0 and "Commands:" in ok.stdout and "run" in ok.stdout
    bad = subprocess.run([*exe, "run", "method=nope", "modelpool=files", "taskpool=weight_stats"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown method 'nope'") and "Traceback" not in bad.stderr


def test_help_list_and_plugins_do_not_import_torch():
    code = (
        "import sys\n"
        "from fusion_core.cli.main import main\n"
        "for args in (['--help'], ['list'], ['plugins', '--all'], ['show', 'files']):\n"
        "    main(args)\n"
        "heavy = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout


def test_warnings_are_one_line_without_debug(capsys):
    import warnings

    import fusion_core
    from fusion_core.plugins import get_plugin_manager

    class Warner:
        @fusion_core.hookimpl
        def fusion_register_commands(self, cli):

            @cli.command("warn")
            def warn():
                warnings.warn("cache was corrupt; rebuilt", UserWarning, stacklevel=1)

    import fusion_core.plugins as plugins

    original = plugins.get_plugin_manager
    plugins.get_plugin_manager = lambda **kw: original(load_entrypoints=False, extra_plugins=[("undo-warn", Warner())])
    try:
        code = main(["warn"])
    finally:
        plugins.get_plugin_manager = original
    assert code == 0 and capsys.readouterr().err == "warning: cache was corrupt; rebuilt\n"
    assert get_plugin_manager is original


def test_show_table_keeps_brackets_in_types(capsys):
    import attrs

    import fusion_core
    from fusion_core.components import Method
    from fusion_core.config import option

    @attrs.frozen
    class Cfg:
        weights: list[float] | None = option(None, help="per-model [w1, w2] weights")

    class Weighted(Method):
        name = "weighted_test"
        summary = "Uses [brackets] in its summary."
        Config = Cfg

        def run(self, pool, ctx):
            return None

    class Plugin:
        @fusion_core.hookimpl
        def fusion_register_methods(self, register):
            register(Weighted)

    import fusion_core.plugins as plugins

    original = plugins.get_plugin_manager
    plugins.get_plugin_manager = lambda **kw: original(load_entrypoints=False, extra_plugins=[("undo-brackets", Plugin())])
    try:
        assert main(["show", "weighted_test"]) == 0
    finally:
        plugins.get_plugin_manager = original
    out = capsys.readouterr().out
    assert "list[float] | None" in out and "[w1, w2]" in out and "Uses [brackets]" in out


def test_plugin_failing_in_registration_is_reported_once(capsys, make_dist, monkeypatch):
    source = "import fusion_core\n\n@fusion_core.hookimpl\ndef fusion_register_methods(register):\n    raise ValueError('bad registration')\n"
    make_dist("fusion-badreg", "fusion_badreg", source, entry="badreg", version="0.2")
    monkeypatch.setenv("FUSE_LOAD_PLUGINS", "badreg")
    code, out, err = fuse(capsys, "list", "methods", "--json")
    assert code == 0 and "dummy" in out
    assert err.count("warning: plugin 'badreg' (fusion-badreg 0.2) failed to load: ValueError: bad registration") == 1


def test_merge_refuses_a_field_set_twice(capsys, tmp_path):
    code = main(["merge", "ties", "--model", "a", "--model", "b", "-o", str(tmp_path / "out"),
                 "--set", "density=0.2", "--set", "method.density=0.5"])
    assert code == 2
    assert capsys.readouterr().err.strip() == "error: --set density is given twice; give each field once (e.g. --set density=0.5)"
    assert not (tmp_path / "out").exists()
