"""`fuse extract-lora`: PEFT adapters from truncated SVDs of the deltas (mergekit-extract-lora's format)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[3] / "tests"))  # the core's shared test helpers
from merge_testkit import tiny_llama  # noqa: E402

from fusion_core.cli.main import main  # noqa: E402

torch.set_num_threads(1)


def tiny(seed: int = 0):
    return tiny_llama(seed, vocab_size=64)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base, tuned = tiny(0), tiny(0)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "proj" in name:  # a low-rank update on the linears, a full one elsewhere
                p.add_(torch.randn(p.shape[0], 3, generator=gen) @ torch.randn(3, p.shape[1], generator=gen) * 0.01)
            else:
                p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    base.save_pretrained(str(root / "base"))
    tuned.save_pretrained(str(root / "tuned"))
    return root, base, tuned


def _logits(model):
    with torch.no_grad():
        return model(torch.tensor([[1, 5, 9, 14, 33]])).logits


def test_full_rank_adapter_loads_in_peft_and_reproduces_the_model(pair, tmp_path, capsys):
    from peft import PeftModel

    root, base, tuned = pair
    out = tmp_path / "adapter"
    assert main(["extract-lora", "--base", str(root / "base"), "--model", str(root / "tuned"), "--rank", "full", "-o", str(out)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "relative reconstruction error per layer" in printed and "model.layers.0.self_attn.q_proj" in printed
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 32 and "lm_head" in config["modules_to_save"]
    assert "q_proj" in config["target_modules"] and "input_layernorm" in config["modules_to_save"]
    report = json.loads((out / "extract_lora_report.json").read_text())
    assert max(row["relative_error"] for row in report.values()) == 0.0  # full rank: nothing dropped
    model = PeftModel.from_pretrained(tiny(0), str(out)).eval()
    merged = model.merge_and_unload()
    for name, p in tuned.state_dict().items():
        assert torch.allclose(merged.state_dict()[name], p, atol=2e-6), name
    assert torch.allclose(_logits(merged), _logits(tuned), atol=1e-4)


def test_low_rank_keeps_the_rank_of_the_update_and_reports_the_error(pair, tmp_path, capsys):
    from safetensors.torch import load_file

    root, base, tuned = pair
    out = tmp_path / "r2"
    assert main(["extract-lora", "--base", str(root / "base"), "--model", str(root / "tuned"), "--rank", "2", "-o", str(out)]) == 0
    state = load_file(str(out / "adapter_model.safetensors"))
    a = state["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"]
    b = state["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    assert a.shape == (2, 64) and b.shape == (32, 2)
    delta = tuned.state_dict()["model.layers.1.mlp.down_proj.weight"] - base.state_dict()["model.layers.1.mlp.down_proj.weight"]
    s = torch.linalg.svdvals(delta)
    expected = float(s[2:].norm() / s.norm())
    report = json.loads((out / "extract_lora_report.json").read_text())["model.layers.1.mlp.down_proj"]
    assert report["rank"] == 2 and report["relative_error"] == pytest.approx(expected, rel=1e-4)
    assert float((delta - b @ a).norm() / delta.norm()) == pytest.approx(expected, rel=1e-3)
    # rank 3 recovers the rank-3 update
    assert main(["extract-lora", "--base", str(root / "base"), "--model", str(root / "tuned"), "--rank", "3", "-o", str(tmp_path / "r3")]) == 0
    assert max(r["relative_error"] for r in json.loads((tmp_path / "r3" / "extract_lora_report.json").read_text()).values()) < 1e-5


def test_bad_rank_is_a_one_line_error(pair, tmp_path, capsys):
    root, _, _ = pair
    assert main(["extract-lora", "--base", str(root / "base"), "--model", str(root / "tuned"), "--rank", "zero", "-o", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip() == "error: --rank must be a positive integer or full, got 'zero'"
