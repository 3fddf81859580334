"""The bad-input corpus of configs, overrides and plugins (issue 16): one case per bad input.

Every case runs the ``fuse`` CLI in-process and checks the exit code (2 for a refused input, 0 for
an accepted one), the exact number of lines on stderr (one: the error, warning or note), that no
traceback is printed, and a time bound; the alias bombs also bound the memory they may take.
"""

from __future__ import annotations

import json
import os
import time
import tracemalloc

import pytest
import torch

from fusion_core.cli.main import main


def bomb(levels: int, fanout: int = 9) -> str:
    """A "billion laughs" YAML flow sequence: ``levels`` anchors, each aliasing the previous ``fanout`` times."""
    parts = ["&l0 [" + ",".join(["lol"] * fanout) + "]"]
    parts += [f"&l{i} [" + ",".join([f"*l{i - 1}"] * fanout) + "]" for i in range(1, levels)]
    return "[" + ",".join(parts) + "]"


def fuse(capsys, argv: list[str], *, code: int = 2, lines: int = 1, seconds: float = 10.0, max_mb: float | None = None):
    """Run ``fuse ARGV``; check exit code, stderr line count, no traceback, time (and peak Python memory)."""
    if max_mb is not None:
        tracemalloc.start()
    start = time.perf_counter()
    try:
        rc = main(argv)
    finally:
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1] / 2**20 if max_mb is not None else 0.0
        if max_mb is not None:
            tracemalloc.stop()
    out, err = capsys.readouterr()
    assert rc == code, err
    assert "Traceback" not in out + err
    assert len(err.splitlines()) == lines, err
    assert elapsed < seconds, f"{elapsed:.1f} s"
    if max_mb is not None:
        assert peak < max_mb, f"peak {peak:.0f} MB"
    return out, err.strip()


@pytest.fixture
def models(tmp_path, write_safetensors, monkeypatch):
    """base, a, b as .safetensors files in tmp_path (the working directory)."""
    monkeypatch.chdir(tmp_path)
    write_safetensors(tmp_path / "base.safetensors", {"w": torch.tensor([1.0, 2.0, 3.0, 4.0])})
    write_safetensors(tmp_path / "a.safetensors", {"w": torch.tensor([2.0, 2.0, 1.0, 4.0])})
    write_safetensors(tmp_path / "b.safetensors", {"w": torch.tensor([1.0, 5.0, 3.0, 0.0])})
    return ["--base", "base.safetensors", "--model", "a.safetensors", "--model", "b.safetensors"]


POOL = ["modelpool={name: files, base: base.safetensors, models: {a: a.safetensors, b: b.safetensors}}",
        "taskpool=weight_stats", "progress=false", "output_dir=out"]


def run_args(*extra: str) -> list[str]:
    return ["run", "method=task_arithmetic", *POOL, *extra]


# --------------------------------------------------------------------------- YAML bounds

def test_alias_bomb_as_an_override_value_is_refused_in_milliseconds(models, capsys):
    value = bomb(9)  # 9**9 = 387 million strings once expanded; a 400-byte argument
    assert len(value) < 450
    _, err = fuse(capsys, run_args(f"method.scaling_factor={value}"), seconds=2.0, max_mb=50)
    assert err.startswith("error: cannot read value '[&l0 [lol,") and "aliases expand this document to" in err
    assert len(err) < 400 and not os.path.exists("out")


def test_six_level_bomb_in_a_config_file_is_refused(models, capsys, tmp_path):
    (tmp_path / "exp.yaml").write_text(f"method:\n  name: task_arithmetic\n  scaling_factor: {bomb(6)}\n")
    _, err = fuse(capsys, ["run", "exp.yaml", *POOL], seconds=2.0, max_mb=50)
    assert err.startswith("error: config file exp.yaml: YAML aliases expand this document to 672,610 nodes")
    assert len(err) < 300


def test_small_aliased_value_gets_a_bounded_type_error(models, capsys):
    _, err = fuse(capsys, run_args(f"method.scaling_factor={bomb(4)}"))
    assert err.startswith("error: method.scaling_factor: expected float, got [[")
    assert err.endswith("(list of 4 items) (list)") and len(err) < 200


def test_merge_key_chain_stays_small(models, capsys, tmp_path):
    lines = ["a0: &a0 {" + ", ".join(f"k{i}: {i}" for i in range(10)) + "}"]
    lines += [f"a{j}: &a{j} {{<<: [{', '.join([f'*a{j - 1}'] * 10)}]}}" for j in range(1, 8)]
    (tmp_path / "exp.yaml").write_text("\n".join(lines) + "\n")
    _, err = fuse(capsys, ["run", "exp.yaml"], seconds=2.0, max_mb=100)
    assert err.startswith("error: exp.yaml: unknown key 'a0'")


def test_merge_keys_are_bounded_even_where_pyyaml_would_copy_them(monkeypatch):
    import fusion_core.safe_yaml as safe_yaml
    from fusion_core.errors import ConfigError

    monkeypatch.setattr(safe_yaml, "MAX_ALIAS_NODES", 5)  # PyYAML >= 6.0.2 dedups merged keys; older ones copy every pair
    text = "a: &a {" + ", ".join(f"k{i}: {i}" for i in range(10)) + "}\nb: {<<: *a}\n"
    with pytest.raises(ConfigError, match=r"merge keys \('<<'\) expand a mapping to more than 5 entries"):
        safe_yaml.load_text(text)


def test_the_c_loader_is_used_where_libyaml_is_installed():
    import yaml

    from fusion_core.safe_yaml import FuseLoader

    assert issubclass(FuseLoader, yaml.CSafeLoader) == bool(yaml.__with_libyaml__)


def test_recursive_alias_is_refused(models, capsys):
    _, err = fuse(capsys, run_args("method.scaling_factor=&a [*a]"))
    assert err.endswith("YAML aliases refer to themselves (a recursive structure); refusing it")


def test_fifty_megabyte_yaml_is_refused_before_reading(models, capsys, tmp_path):
    path = tmp_path / "big.yaml"
    with open(path, "w") as fh:
        fh.write("seed: 1\npad:\n")
        line = "  - " + "x" * 1020 + "\n"
        fh.write(line * (50 * 1024))
    _, err = fuse(capsys, ["run", "big.yaml"], seconds=2.0, max_mb=20)
    assert err == "error: config file big.yaml is 50.0 MB; fuse reads YAML files up to 10 MB"


def test_fifo_config_is_refused_without_blocking(models, capsys, tmp_path):
    os.mkfifo(tmp_path / "exp.yaml")
    _, err = fuse(capsys, ["run", "exp.yaml"], seconds=2.0)
    assert err == "error: config file exp.yaml is not a regular file (a FIFO or device?); give a YAML file"


# --------------------------------------------------------------------------- numbers

@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1e308"])
def test_non_finite_or_overflowing_scaling_factor_is_refused_by_fuse_merge(models, capsys, value):
    _, err = fuse(capsys, ["merge", "task_arithmetic", *models, "--set", f"scaling_factor={value}", "--dtype", "float16",
                           "-o", "out", "-q"])
    assert err.startswith("error: method task_arithmetic.scaling_factor: ")
    assert err.endswith("is not a finite number within float32's range (±3.4e38); give a finite value")
    assert not os.path.exists("out")


def test_nan_scaling_factor_is_refused_by_fuse_run(models, capsys):
    _, err = fuse(capsys, run_args("method.scaling_factor=.nan"))
    assert err == ("error: method.scaling_factor: nan is not a finite number within float32's range (±3.4e38); "
                   "give a finite value")


def test_nan_density_fails_in_range(models, capsys):
    _, err = fuse(capsys, ["merge", "ties", *models, "--set", "density=.nan", "-o", "out", "-q"])
    assert err.startswith("error: method ties.density: nan is not a finite number")


def test_nan_fails_the_in_range_and_positive_validators_themselves():
    import attrs

    from fusion_core.config import in_range, option, positive

    @attrs.frozen
    class Cfg:
        density: float = option(0.5, help="d", validator=in_range(0, 1))
        lr: float = option(1.0, help="lr", validator=positive)

    with pytest.raises(ValueError, match=r"density must be in \[0, 1\], got nan"):
        Cfg(density=float("nan"))
    with pytest.raises(ValueError, match=r"lr must be > 0, got nan"):
        Cfg(lr=float("nan"))


@pytest.mark.parametrize("override, message", [
    ("seed=99999999999999999999", "error: run: seed must be in [0, 2**63 - 1], got 99999999999999999999"),
    ("seed=-1", "error: run: seed must be in [0, 2**63 - 1], got -1"),
    ("threads=-5", "error: run: threads must be >= 1, got -5"),
    ("threads=0", "error: run: threads must be >= 1, got 0"),
    ("device=xla", "error: run: device must be one of cpu, cuda, cuda:N, mps, got 'xla'"),
    ("device=meta", "error: run: device must be one of cpu, cuda, cuda:N, mps, got 'meta'"),
])
def test_out_of_range_settings_are_refused(models, capsys, override, message):
    _, err = fuse(capsys, run_args(override))
    assert err == message


@pytest.mark.parametrize("argv, message", [
    (["--seed", "99999999999999999999"], "error: --seed must be in [0, 2**63 - 1], got 99999999999999999999"),
    (["--device", "xla"], "error: --device must be one of cpu, cuda, cuda:N, mps, got 'xla'"),
])
def test_out_of_range_merge_options_are_refused(models, capsys, argv, message):
    _, err = fuse(capsys, ["merge", "task_arithmetic", *models, *argv, "-o", "out", "-q"])
    assert err == message


@pytest.mark.parametrize("spelling", ["1e-3", "1E-3", ".1e-2", "1.0e-3"])
def test_exponent_spellings_are_numbers_in_set_and_in_files(models, capsys, tmp_path, spelling):
    fuse(capsys, ["merge", "ties", *models, "--set", f"density={spelling}", "-o", "out.safetensors", "-q"], code=0, lines=0)
    (tmp_path / "exp.yaml").write_text(f"method: {{name: ties, density: {spelling}}}\n")
    out, _ = fuse(capsys, ["run", "exp.yaml", *POOL[:2], "--print-config"], code=0, lines=0)
    assert "density: 0.001\n" in out


def test_strings_that_look_like_numbers_stay_strings():
    from fusion_core.config import parse_value

    assert parse_value("1e5") == 100000.0 and parse_value("1E5") == 1e5 and parse_value("-2.5e+3") == -2500.0
    assert [parse_value(t) for t in ("e5", "1e", "1e5x", "0x1F", "'1e5'", "1_000", "12:30")] == [
        "e5", "1e", "1e5x", 31, "1e5", 1000, 750]


@pytest.mark.parametrize("argv, message", [
    (run_args("seed=1", "seed=2"), "error: override 'seed' is given twice ('seed=1' and 'seed=2'); give it once"),
    (["merge", "ties", "--base", "base.safetensors", "--model", "a.safetensors", "--set", "density=0.1", "--set",
      "method.density=0.2", "-o", "out"],
     "error: --set 'density' is given twice ('density=0.1' and 'method.density=0.2'); give it once"),
])
def test_repeated_override_keys_are_refused(models, capsys, argv, message):
    _, err = fuse(capsys, argv)
    assert err == message


# --------------------------------------------------------------------------- pools

def test_model_pool_without_task_pool_is_refused_at_validation_and_by_dry_run(models, capsys):
    argv = ["run", "method=task_arithmetic", POOL[0], "output_dir=out", "progress=false"]
    message = ("error: modelpool 'files' is given without a taskpool, so nothing would be evaluated or kept; set "
               "taskpool=NAME to evaluate the merged model, or save_model=true to merge only and save it")
    assert fuse(capsys, argv)[1] == message
    assert fuse(capsys, [*argv, "--dry-run"])[1] == message
    assert not os.path.exists("out")


def test_model_pool_without_task_pool_merges_only_when_the_model_is_saved(models, capsys, tmp_path):
    argv = ["run", "method=task_arithmetic", POOL[0], "output_dir=out", "progress=false", "save_model=true"]
    from fusion_core.runconfig import MERGE_ONLY_NOTE

    out, lines = fuse(capsys, [*argv, "--dry-run"], code=0, lines=2)
    assert lines.splitlines()[0] == MERGE_ONLY_NOTE and "taskpool: 'none: merge only" in out
    _, note = fuse(capsys, [*argv, "--json"], code=0)
    assert note == MERGE_ONLY_NOTE
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["results"] == {} and report["config"]["taskpool"] is None
    assert (tmp_path / "out" / "model").exists()


def test_task_pool_without_model_pool_is_refused(models, capsys):
    _, err = fuse(capsys, ["run", "method=task_arithmetic", "taskpool=weight_stats"])
    assert err == ("error: taskpool 'weight_stats' is given without a modelpool; set modelpool=NAME "
                   "(or benchmark=NAME to take the benchmark's models)")


# --------------------------------------------------------------------------- plugins

EXITS = """
import sys
sys.exit(3)
"""
INTERRUPTS = """
raise KeyboardInterrupt
"""
PRINTS = """
print("hello from a noisy plugin")
from fusion_core import hookimpl

@hookimpl
def fusion_register_methods(register):
    print("registering")
"""
COMMAND_EXITS = """
import sys
from fusion_core import hookimpl

@hookimpl
def fusion_register_commands(cli):
    sys.exit(3)
"""
SLEEPS = """
import time
time.sleep(1.2)
"""


@pytest.mark.parametrize("source, argv, message", [
    (EXITS, ["--help"], "warning: plugin 'bad' (fusion-bad 1.2.3) failed to load: SystemExit(3) (set FUSE_STRICT_PLUGINS"),
    (EXITS, ["list", "methods", "--json"], "warning: plugin 'bad' (fusion-bad 1.2.3) failed to load: SystemExit(3)"),
    (INTERRUPTS, ["list", "--json"], "warning: plugin 'bad' (fusion-bad 1.2.3) failed to load: KeyboardInterrupt (set"),
    (PRINTS, ["list", "methods", "--json"], "warning: plugin 'bad' (fusion-bad 1.2.3) printed to stdout while loading "
                                            "(kept out of fuse's output): 'hello from a noisy plugin'"),
    (COMMAND_EXITS, ["--help"], "warning: plugin 'bad' (fusion-bad 1.2.3) failed to load: SystemExit(3) in "
                                "fusion_register_commands (set FUSE_STRICT_PLUGINS"),
    (SLEEPS, ["plugins", "--json"], "note: plugin 'bad' (fusion-bad 1.2.3) took 1.2 s to load (FUSE_DISABLE_PLUGINS=bad "
                                    "skips it; `fuse plugins --all` shows load times)"),
])
def test_misbehaving_plugin_is_reported_in_one_line_and_skipped(make_dist, monkeypatch, capsys, source, argv, message):
    make_dist("fusion-bad", f"fusion_bad_{abs(hash((source, *argv)))}", source, entry="bad")  # a fresh module each case
    monkeypatch.setenv("FUSE_LOAD_PLUGINS", "bad")
    out, err = fuse(capsys, argv, code=0)
    assert err.startswith(message)
    if "--json" in argv:
        data = json.loads(out)  # nothing the plugin printed is in the machine-readable output
        if argv[0] == "plugins":
            assert [r["load_seconds"] >= 1.2 for r in data if r["name"] == "bad"] == [True]
    else:
        assert "Usage: fuse" in out


def test_strict_mode_still_makes_a_plugin_exit_fatal(make_dist, monkeypatch, capsys):
    make_dist("fusion-bad", "fusion_bad_strict", EXITS, entry="bad")
    monkeypatch.setenv("FUSE_LOAD_PLUGINS", "bad")
    monkeypatch.setenv("FUSE_STRICT_PLUGINS", "1")
    _, err = fuse(capsys, ["list"])
    assert err == "error: plugin 'bad' (fusion-bad 1.2.3) failed to load: SystemExit(3)"


def test_a_real_ctrl_c_during_plugin_import_still_interrupts(make_dist, monkeypatch, capsys):
    import signal

    # Python's own SIGINT handler, as in a terminal: a process started in the background by a non-interactive
    # shell (`nohup cmd &`) inherits SIGINT ignored, and an ignored Ctrl-C interrupts nothing
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        make_dist("fusion-bad", "fusion_bad_sigint", "import signal\nsignal.raise_signal(signal.SIGINT)\n", entry="bad")
        monkeypatch.setenv("FUSE_LOAD_PLUGINS", "bad")
        _, err = fuse(capsys, ["list"], code=130)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert err == "interrupted; no partial output was kept"


def test_plugins_all_shows_load_times(capsys):
    out, _ = fuse(capsys, ["plugins", "--all", "--json"], code=0, lines=0)
    rows = json.loads(out)
    assert all(isinstance(r["load_seconds"], float) for r in rows)
    assert {r["name"] for r in rows} >= {"fusion_core.methods", "fusion_core.commands"}


# --------------------------------------------------------------------------- trust_remote_code

REMOTE_CONFIG = """
from transformers import PretrainedConfig


class FuseTinyConfig(PretrainedConfig):
    model_type = "fuse_tiny"

    def __init__(self, hidden=4, **kwargs):
        self.hidden = hidden
        super().__init__(**kwargs)
"""
REMOTE_MODEL = """
import torch
from transformers import PreTrainedModel

from .configuration_fuse_tiny import FuseTinyConfig


class FuseTinyModel(PreTrainedModel):
    config_class = FuseTinyConfig

    def __init__(self, config):
        super().__init__(config)
        self.proj = torch.nn.Linear(config.hidden, config.hidden)
        self.post_init()

    def forward(self, x):
        return self.proj(x)
"""


def remote_code_checkpoint(folder, seed: int, write_safetensors):
    """An HF folder whose model is defined by code shipped in it (``auto_map`` + two .py files)."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "fuse_tiny", "hidden": 4, "architectures": ["FuseTinyModel"],
        "auto_map": {"AutoConfig": "configuration_fuse_tiny.FuseTinyConfig", "AutoModel": "modeling_fuse_tiny.FuseTinyModel"}}))
    (folder / "configuration_fuse_tiny.py").write_text(REMOTE_CONFIG)
    (folder / "modeling_fuse_tiny.py").write_text(REMOTE_MODEL)
    gen = torch.Generator().manual_seed(seed)
    write_safetensors(folder / "model.safetensors", {"proj.weight": torch.randn(4, 4, generator=gen), "proj.bias": torch.randn(4, generator=gen)})
    return str(folder)


@pytest.fixture
def remote_pool(tmp_path, write_safetensors, monkeypatch):
    pytest.importorskip("fusion_hf")
    import builtins

    import transformers.dynamic_module_utils as dynamic

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # keep the copied code in tmp

    def prompt(*args, **kwargs):
        raise AssertionError(f"transformers asked on stdin: {args[0][:80] if args else ''}")

    monkeypatch.setattr(builtins, "input", prompt)
    base = remote_code_checkpoint(tmp_path / "base", 0, write_safetensors)
    a = remote_code_checkpoint(tmp_path / "a", 1, write_safetensors)
    return f"modelpool={{name: hf, base: {base}, models: {{a: {a}}}, trust_remote_code: {{trust}}}}"


def test_trust_remote_code_names_the_code_and_reaches_every_load_path(remote_pool, capsys, tmp_path):
    argv = ["run", "method=simple_average", remote_pool.replace("{trust}", "true"), "taskpool=weight_stats",
            "output_dir=out", "progress=false", "evaluate_inputs=false"]
    _, err = fuse(capsys, [*argv, "--dry-run"], code=0, lines=2)
    warning = err.splitlines()[0]
    assert warning.startswith("warning: trust_remote_code is on for model pool 'hf': this code from the checkpoints will run: base: ")
    assert "AutoModel=modeling_fuse_tiny.FuseTinyModel, configuration_fuse_tiny.py, modeling_fuse_tiny.py; model 'a': " in warning
    _, err = fuse(capsys, [*argv, "--json"], code=0, seconds=60)  # streams through the meta model, evaluates the merge
    assert err.startswith("warning: trust_remote_code is on")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["results"]["merged"]["weights"]["parameters"] == 20.0


def test_checkpoint_code_is_refused_in_one_line_without_trust_remote_code(remote_pool, capsys):
    argv = ["run", "method=simple_average", remote_pool.replace("{trust}", "false"), "taskpool=weight_stats",
            "output_dir=out", "progress=false"]
    _, err = fuse(capsys, argv, seconds=60)
    assert err.startswith("error: base: cannot read the config of ")
    assert err.endswith(": it ships its own model code (auto_map in config.json, *.py files), which runs only with "
                        "modelpool.trust_remote_code: true; set it only if you trust that code")


def test_strings_that_read_as_numbers_are_quoted_when_written_back():
    from fusion_lab.sweep import override_value_text

    from fusion_core.config import parse_value
    from fusion_core.safe_yaml import dump

    value = {"name": "1e5", "paths": ["2E3", ".5e-2"], "density": 1e-3}
    assert parse_value(dump(value)) == value
    assert override_value_text("1e5") == "'1e5'" and parse_value(override_value_text(1e-05)) == 1e-05


@pytest.mark.parametrize("seed", ["-1", "99999999999999999999"])
def test_out_of_range_benchmark_seed_is_refused(capsys, seed):
    pytest.importorskip("fusion_minibench")
    _, err = fuse(capsys, ["run", f"modelpool.seed={seed}", "--dry-run"])
    assert err == f"error: modelpool: seed must be in [0, 9007199254740992], got {seed}"
