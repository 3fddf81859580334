"""Property-based fuzzing of the untrusted-input readers: the safetensors header parser, the shard
index reader and the confinement of names read from a model folder.

Any input gives a result or one :class:`FuseError` line, never another exception, within a time
bound.  Fixed budget (``derandomize``, ~200 examples each) so CI stays fast and reproducible.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fusion_core.engine.confine import member  # noqa: E402
from fusion_core.engine.readers import SafetensorsFile, parse_header, read_shard_index  # noqa: E402
from fusion_core.errors import FuseError  # noqa: E402

BUDGET = settings(max_examples=200, derandomize=True, deadline=2000, suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=8)
)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)
dtypes = st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "F33", "", "f32"])
offsets = st.one_of(st.lists(st.integers(-16, 64), min_size=0, max_size=3), st.lists(st.floats(0, 64), min_size=2, max_size=2), json_values)
shapes = st.one_of(st.lists(st.integers(-2, 6), max_size=3), st.lists(st.floats(-2, 6), max_size=2), json_values)
entries = st.fixed_dictionaries({"dtype": dtypes, "shape": shapes, "data_offsets": offsets}) | json_values
headers = st.dictionaries(st.text(min_size=1, max_size=6), entries, max_size=4)


def _check_entries(result, data_size: int) -> None:
    _, parsed = result
    spans = sorted((begin, end) for _, _, begin, end in parsed.values())
    covered = 0
    for begin, end in spans:  # the invariants a reader relies on
        assert begin == covered and end >= begin
        covered = end
    assert covered == data_size


@BUDGET
@given(raw=st.binary(max_size=256), data_size=st.integers(0, 128))
def test_any_header_bytes_give_entries_or_one_fuse_error(raw, data_size):
    try:
        result = parse_header(raw, data_size, "fuzz.safetensors")
    except FuseError as exc:
        assert "\n" not in str(exc)
    else:
        _check_entries(result, data_size)


@BUDGET
@given(header=headers, data_size=st.integers(0, 96))
def test_structured_headers_give_entries_or_one_fuse_error(header, data_size):
    try:
        result = parse_header(json.dumps(header).encode(), data_size, "fuzz.safetensors")
    except FuseError as exc:
        assert "\n" not in str(exc)
    else:
        _check_entries(result, data_size)


@BUDGET
@given(blob=st.binary(max_size=300))
def test_any_file_bytes_open_or_fail_with_one_line(blob):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.safetensors"
        path.write_bytes(blob)
        try:
            file = SafetensorsFile(path)
        except FuseError as exc:
            assert "\n" not in str(exc)
        else:
            for name in file.names:
                assert tuple(file.read(name).shape) == file.entries[name][1]
            file.close()


index_values = st.one_of(
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    st.dictionaries(st.sampled_from(["weight_map", "metadata"]), st.dictionaries(st.text(max_size=5), json_values, max_size=4) | json_values).map(json.dumps),
)


@BUDGET
@given(text=index_values)
def test_any_shard_index_gives_a_map_or_one_fuse_error(text):
    with tempfile.TemporaryDirectory() as folder:
        index = Path(folder) / "model.safetensors.index.json"
        index.write_text(text, encoding="latin-1")
        try:
            weight_map = read_shard_index(folder, index)
        except FuseError as exc:
            assert "\n" not in str(exc)
            return
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())
        for fname in weight_map.values():  # every name is confined to the folder, or refused
            try:
                path = member(folder, fname, named_in=index)
            except FuseError as exc:
                assert "\n" not in str(exc)
            else:
                real = os.path.realpath(folder)
                assert str(path) == real or str(path).startswith(real + os.sep)


@BUDGET
@given(name=st.one_of(st.text(max_size=40), st.sampled_from(["../x", "/etc/passwd", "a/../../b", "C:\\x", "..", "a\\..\\..\\b"])))
def test_names_from_a_folder_never_resolve_outside_it(name):
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = member(folder, name, named_in="index.json")
        except FuseError as exc:
            assert "\n" not in str(exc)
        else:
            real = os.path.realpath(folder)
            assert str(path) == real or str(path).startswith(real + os.sep)
