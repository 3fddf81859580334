"""Property-based fuzzing of the config readers: any input gives a result or one ``FuseError`` line.

Covers ``key=value`` overrides, YAML values, whole run-config YAML documents (validated against
the built-in registry) and the mergekit recipe reader.  The budget is fixed (``derandomize``, 200
examples each, a per-example deadline) so the run is the same in CI every time and takes seconds.
"""

from __future__ import annotations

import pytest

hypothesis = pytest.importorskip("hypothesis")

import yaml  # noqa: E402
from fusion_merging.mergekit.recipe import load as read_mergekit_yaml  # noqa: E402  (the one import of the mergekit reader)
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fusion_core.config import parse_override, parse_value  # noqa: E402
from fusion_core.errors import FuseError  # noqa: E402
from fusion_core.plugins import get_plugin_manager  # noqa: E402
from fusion_core.registry import build_registry  # noqa: E402
from fusion_core.runconfig import load_run_config  # noqa: E402

FUZZ = settings(max_examples=200, derandomize=True, deadline=2000, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

#: pieces of YAML that reach the reader's corners: structure, anchors and aliases, tags, merge keys, numbers
TOKENS = st.sampled_from([
    "[", "]", "{", "}", ", ", ": ", "- ", "\n", "  ", "? ", "'", '"', "#", "---\n", "...\n", "|\n  ", ">\n  ",
    "&a ", "*a", "&b ", "*b", "<<: ", "[*a, *a, *a, *a, *a, *a, *a, *a, *a]", "!!set ", "!!binary ", "!!timestamp ",
    "!!python/object/apply:os.system ", "!!float ", "!!int ", "!!str ", "!!map ", "!!seq ", "%YAML 1.1\n", "%TAG ! tag:x,\n",
    "1e-3", "1E5", ".5e-2", "-.inf", ".nan", "1e308", "99999999999999999999", "0x1F", "0o17", "12:30", "2001-12-14",
    "null", "~", "true", "no", "method", "name", "ties", "density", "scaling_factor", "modelpool", "taskpool",
    "seed", "threads", "device", "xla", "cuda:1", "files", "weight_stats", "models", "base", "merge_method",
    "base_model", "parameters", "weight", "slices", "sources", "layer_range", "dtype", "bfloat16", "=", ".",
])
YAML_TEXT = st.lists(st.one_of(TOKENS, st.text(max_size=4)), max_size=40).map("".join)

#: well-formed YAML documents built from plain data
PLAIN = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | TOKENS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6) | TOKENS, inner, max_size=4),
    max_leaves=12,
)
RUN_KEYS = st.sampled_from(["method", "modelpool", "taskpool", "seed", "threads", "device", "benchmark", "output_dir",
                            "save_model", "compute_dtype", "progress", "evaluate_inputs", "density"])
RUN_DOCS = st.dictionaries(RUN_KEYS, PLAIN, max_size=5).map(lambda d: yaml.safe_dump(d, allow_unicode=True))
MERGEKIT_KEYS = st.sampled_from(["merge_method", "base_model", "models", "parameters", "dtype", "slices", "tokenizer_source"])
MERGEKIT_DOCS = st.dictionaries(MERGEKIT_KEYS, PLAIN, max_size=5).map(lambda d: yaml.safe_dump(d, allow_unicode=True))


def one_line(exc: FuseError) -> None:
    text = str(exc)
    assert "\n" not in text and 0 < len(text) < 2000, text


@pytest.fixture(scope="module")
def registry():
    return build_registry(get_plugin_manager(load_entrypoints=False))


@FUZZ
@given(st.one_of(YAML_TEXT, st.text(max_size=60)).map(lambda t: t if "=" in t[:20] else f"method.density={t}"))
def test_overrides_give_a_value_or_one_line(arg):
    try:
        parse_override(arg)
    except FuseError as exc:
        one_line(exc)


@FUZZ
@given(YAML_TEXT)
def test_values_give_a_value_or_one_line(text):
    try:
        parse_value(text)
    except FuseError as exc:
        one_line(exc)


@FUZZ
@given(st.lists(st.tuples(RUN_KEYS, st.sampled_from(["", ".name", ".density", ".x"]), YAML_TEXT), max_size=4))
def test_override_lists_validate_or_fail_in_one_line(registry, items):
    overrides = [f"{key}{sub}={text}" for key, sub, text in items]
    try:
        load_run_config([], overrides, registry=registry)
    except FuseError as exc:
        one_line(exc)


@FUZZ
@given(st.one_of(YAML_TEXT, RUN_DOCS))
def test_run_config_documents_validate_or_fail_in_one_line(registry, tmp_path_factory, text):
    path = tmp_path_factory.mktemp("doc") / "exp.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_run_config([path], [], registry=registry)
    except FuseError as exc:
        one_line(exc)


@FUZZ
@given(st.one_of(YAML_TEXT, MERGEKIT_DOCS))
def test_mergekit_recipes_translate_or_fail_in_one_line(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("recipe") / "recipe.yml"
    path.write_text(text, encoding="utf-8")
    try:
        read_mergekit_yaml(path)
    except FuseError as exc:
        one_line(exc)


ROUND_TRIP = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8) | TOKENS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6) | TOKENS, inner, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(ROUND_TRIP)
def test_written_values_read_back_identically(value):
    from fusion_core.safe_yaml import dump, load_text

    assert load_text(dump(value)) == value
