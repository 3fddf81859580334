"""Model cards keep non-ASCII names as they are (YAML with allow_unicode, UTF-8 file)."""

from __future__ import annotations

import yaml

from fusion_core.engine.writer import write_model_card


def test_model_card_keeps_non_ascii_names(tmp_path):
    recipe = {"method": "ties", "models": ["modèle-é", "模型"], "base": "base-ø", "seed": 0, "versions": {"x": "1"}}
    write_model_card(tmp_path, recipe)
    text = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert "modèle-é" in text and "模型" in text and "base-ø" in text and "\\u" not in text and "\\x" not in text
    front = yaml.safe_load(text.split("---")[1])
    assert front["base_model"] == ["base-ø"]
    recipe_yaml = text.split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(recipe_yaml)["models"] == ["modèle-é", "模型"]
