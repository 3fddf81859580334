"""The HF model card: per-task heads saved beside the model are listed with how to load them; non-ASCII names kept."""

from __future__ import annotations

import torch
from fusion_hf.saving import write_card


def test_card_lists_task_heads_and_how_to_load_them(tmp_path):
    heads = {"sst2": {"score.weight": torch.zeros(2, 8)}, "émotion": {"score.weight": torch.zeros(6, 8)}}
    write_card(tmp_path, {"method": "ties", "inputs": {"émotion": "ft/émotion"}}, "gpt2", heads=heads)
    text = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert "| sst2 | `head-sst2.safetensors` | `score.weight` [2, 8] |" in text
    assert "| émotion | `head-émotion.safetensors` | `score.weight` [6, 8] |" in text
    snippet = text.split("```python\n")[1].split("```")[0]
    assert 'load_file("head-sst2.safetensors")' in snippet
    assert 'num_labels=head["score.weight"].shape[0], ignore_mismatched_sizes=True' in snippet
    assert "model.load_state_dict(head, strict=False)" in snippet
    compile(snippet, "card", "exec")  # the snippet is valid Python


def test_card_without_heads_has_no_heads_section(tmp_path):
    write_card(tmp_path, {"method": "ties", "inputs": {}}, None)
    assert "Task heads" not in (tmp_path / "README.md").read_text(encoding="utf-8")
