"""The plugin as installed: listed by `fuse plugins`, cheap to import, and the FusionBench config validates offline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "clip-vit-b32-tall8.yaml"
POOLS = ["hf", "hf_causal_lm", "hf_clip_vision", "hf_seq2seq", "hf_seq_classification"]
TASK_POOLS = ["causal_lm_perplexity", "clip_zero_shot", "text_classification"]


def test_fuse_plugins_json_lists_hf(capsys):
    from fusion_core.cli.main import main

    assert main(["plugins", "--json"]) == 0
    plugins = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    hf = plugins["hf"]
    assert (hf["distribution"], hf["status"], hf["module"]) == ("fusion-hf", "ok", "fusion_hf.plugin")
    registered = set(hf["registered"])
    assert {f"model-pool:{n}" for n in POOLS} | {f"task-pool:{n}" for n in TASK_POOLS} | {"benchmark:clip-vit-b32-tall8"} <= registered


def test_listing_does_not_import_torch_transformers_or_datasets():
    code = ("import sys\nfrom fusion_core.cli.main import main\n"
            "codes = [main(['list']), main(['show', 'hf_clip_vision']), main(['show', 'clip_zero_shot'])]\n"
            "heavy = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]\n"
            "print(codes, heavy, file=sys.stderr)\nassert codes == [0, 0, 0] and heavy == [], heavy\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]


def test_config_file_and_registered_benchmark_describe_the_same_pools():
    from fusion_hf import fusionbench

    data = yaml.safe_load(CONFIG.read_text())
    assert data["modelpool"] == fusionbench.modelpool()
    assert data["taskpool"] == fusionbench.taskpool()
    assert set(data["modelpool"]["models"]) == set(data["taskpool"]["tasks"]) == set(fusionbench.TASKS)
    assert data["modelpool"]["models"]["svhn"]["path"] == "tanganke/clip-vit-base-patch32_svhn"


def test_fusionbench_config_dry_run_validates_offline_and_lists_downloads(capsys, monkeypatch):
    from fusion_core.cli.main import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["run", str(CONFIG), "--dry-run"]) == 0
    captured = capsys.readouterr()
    plan = yaml.safe_load(captured.out)
    assert plan["modelpool"]["base"] == "would fetch openai/clip-vit-base-patch32@main"
    assert len(plan["modelpool"]["would_fetch"]) == 9
    assert plan["taskpool"]["tasks"]["mnist"] == "would fetch dataset tanganke/mnist@main [test]"
    assert "nothing was loaded" in captured.err
    assert main(["run", "benchmark=clip-vit-b32-tall8", "--dry-run"]) == 0
