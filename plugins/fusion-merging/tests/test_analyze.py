"""fuse analyze task-vectors: cosines (identical 1, opposite −1, orthogonal 0), sign conflicts, magnitudes, CLI outputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from fusion_merging import analyze as an
from safetensors.torch import save_file

from fusion_core.cli.main import main
from fusion_core.engine.readers import StateDictReader

BASE = {"model.layers.0.a.weight": torch.zeros(2, 2), "model.layers.1.b.weight": torch.ones(3), "head.bias": torch.zeros(1)}


def with_tau(layer0, layer1, head):
    return {"model.layers.0.a.weight": torch.tensor(layer0).reshape(2, 2), "model.layers.1.b.weight": 1 + torch.tensor(layer1),
            "head.bias": torch.tensor([head])}


# τ over (layer0 [4], layer1 [3], head [1]):
A = with_tau([1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0], 1.0)    # τA = e0 + head
B = with_tau([1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0], 1.0)    # identical to A
C = with_tau([-1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0], -1.0)  # opposite of A
D = with_tau([0.0, 2.0, 0.0, 0.0], [3.0, 0.0, 0.0], 0.0)    # orthogonal to A


def run(*models, names="ABCD", group=an.block_of):
    names = list(names[: len(models)])
    return an.analyze(StateDictReader(BASE), [StateDictReader(m, label=n) for m, n in zip(models, names, strict=True)], names, group=group)


def test_cosines_identical_opposite_orthogonal():
    report = run(A, B, C, D)
    cos = report["whole"]["cosine"]
    assert math.isclose(cos[0][1], 1.0) and math.isclose(cos[0][2], -1.0) and cos[0][3] == 0.0
    assert all(math.isclose(cos[i][i], 1.0) for i in range(4))
    # per layer: layer 1 has τ = 0 for A, B, C → cosine 0 with everything (ε guards the zero norm), as torch's
    assert report["layers"]["model.layers.1"]["cosine"][0][3] == 0.0
    assert math.isclose(report["layers"]["model.layers.0"]["cosine"][0][2], -1.0)
    assert set(report["layers"]) == {"model.layers.0", "model.layers.1", "head"}


def test_sign_conflicts_and_magnitudes_hand_worked():
    report = run(A, C, D, names="ACD")
    whole = report["whole"]
    assert whole["entries"] == 8
    # A and C are opposite at entry e0 and at the head: 2 of 8 entries; A and D never (no shared non-zero entry)
    assert whole["sign_conflict"][0][1] == 2 / 8 and whole["sign_conflict"][0][2] == 0.0
    assert whole["any_sign_conflict"] == 2 / 8
    mag = whole["magnitude"]
    assert math.isclose(mag["A"]["l2"], math.sqrt(2)) and mag["A"]["mean_abs"] == 2 / 8 and mag["A"]["max_abs"] == 1.0
    assert math.isclose(mag["D"]["l2"], math.sqrt(13)) and mag["D"]["zero_fraction"] == 6 / 8


def test_random_vectors_match_torch_cosine_and_block_reading(monkeypatch):
    g = torch.Generator().manual_seed(0)
    base = {"w.0.x": torch.randn(50, 7, generator=g), "s": torch.randn((), generator=g)}
    models = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    monkeypatch.setattr(an, "BLOCK", 20)  # several row blocks per tensor
    report = an.analyze(StateDictReader(base), [StateDictReader(m) for m in models], ["x", "y", "z"], group=None)
    flat = [torch.cat([(m[k].double() - base[k].double()).reshape(-1) for k in base]) for m in models]
    for i in range(3):
        for j in range(3):
            expected = float(torch.nn.functional.cosine_similarity(flat[i], flat[j], dim=0))
            assert math.isclose(report["whole"]["cosine"][i][j], expected, rel_tol=1e-12)
    assert set(report["layers"]) == {"w.0.x", "s"}


def test_cli_plain_records_json_and_png(tmp_path, capsys, monkeypatch):
    paths = []
    for name, state in (("base", BASE), ("A", A), ("C", C), ("D", D)):
        path = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        paths.append(str(path))
    monkeypatch.chdir(tmp_path)
    args = ["analyze", "task-vectors", "--base", paths[0], *sum((["--model", p] for p in paths[1:]), [])]
    assert main([*args, "--json", "out.json", "--format", "plain"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split("\t") == ["layer", "a", "b", "cosine", "sign_conflict", "any_conflict"]
    assert lines[1].split("\t")[:4] == [an.WHOLE, "A", "C", "-1.0000"]
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["models"] == ["A", "C", "D"] and math.isclose(saved["whole"]["cosine"][0][1], -1.0)
    assert main([*args, "--json", "out.json"]) == 2  # an existing output is never replaced
    capsys.readouterr()
    pytest.importorskip("matplotlib")
    assert main([*args, "--png", "cos.png", "--format", "json"]) == 0
    assert (tmp_path / "cos.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(capsys.readouterr().out)["models"] == ["A", "C", "D"]


def test_fewer_than_two_models_or_a_missing_tensor_is_a_one_line_error():
    from fusion_core.errors import InputError

    with pytest.raises(InputError, match="at least two models"):
        run(A)
    broken = dict(B)
    del broken["head.bias"]
    with pytest.raises(InputError, match="has no tensor 'head.bias'"):
        an.analyze(StateDictReader(BASE), [StateDictReader(A), StateDictReader(broken, label="B")], ["A", "B"])
