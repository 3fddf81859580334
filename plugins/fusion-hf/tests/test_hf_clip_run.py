"""End to end: task arithmetic on a tiny CLIP pool evaluated by clip_zero_shot, then the saved model."""

from __future__ import annotations

import json

import pytest
from hf_testkit import CLIP_TASKS, TEMPLATE, clip_run_config

torch = pytest.importorskip("torch")

LAMBDA = 0.5


@pytest.fixture(scope="module")
def run_report(clip_assets, tmp_path_factory):
    import fusion_core

    out = tmp_path_factory.mktemp("run") / "out"
    config = clip_run_config(clip_assets, out, save_model=True)
    config["method"]["scaling_factor"] = LAMBDA
    return fusion_core.run(config), out


def _safetensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def independent_eval(clip_dir, vision_state, data_dir, class_names):
    """Accuracy and loss of the CLIP at ``clip_dir`` with its vision tower replaced, in plain transformers code."""
    import datasets
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(clip_dir).eval()
    model.vision_model.load_state_dict(vision_state)
    tok = AutoTokenizer.from_pretrained(clip_dir)
    proc = AutoImageProcessor.from_pretrained(clip_dir)
    ds = datasets.load_from_disk(str(data_dir))["test"]
    with torch.no_grad():
        text = model.get_text_features(**tok([TEMPLATE.format(c) for c in class_names], padding=True, return_tensors="pt")).pooler_output
        image = model.get_image_features(pixel_values=proc(images=[im.convert("RGB") for im in ds["image"]], return_tensors="pt")["pixel_values"]).pooler_output
        text = text / text.norm(dim=-1, keepdim=True)
        image = image / image.norm(dim=-1, keepdim=True)
        logits = model.logit_scale.exp() * image @ text.T
        labels = torch.tensor(ds["label"])
        return int((logits.argmax(-1) == labels).sum()) / len(labels), float(torch.nn.functional.cross_entropy(logits, labels))


def test_report_has_per_task_accuracy_for_merged_pretrained_and_individual(run_report, clip_assets):
    report, out = run_report
    results = report["results"]
    assert set(results) == {"merged", "pretrained", "individual"}
    for row in results.values():
        assert set(row) == set(CLIP_TASKS)
        for metrics in row.values():
            assert set(metrics) == {"accuracy", "loss", "samples"}
            assert metrics["samples"] == 24.0
    # labels are the base model's own predictions (computed independently in conftest)
    assert all(results["pretrained"][t]["accuracy"] == 1.0 for t in CLIP_TASKS)
    assert report["averages"]["pretrained"] == 1.0
    assert json.loads((out / "report.json").read_text())["results"] == json.loads(json.dumps(results))


def test_saved_merged_weights_are_task_arithmetic_in_closed_form(run_report, clip_assets):
    _, out = run_report
    saved = _safetensors(out / "model" / "model.safetensors")
    base = _safetensors(clip_assets["base"] / "model.safetensors")
    fts = [_safetensors(clip_assets["ft"][name] / "model.safetensors") for name in ("animals", "digits", "extra")]
    vision_keys = [k for k in base if k.startswith("vision_model.")]
    assert sorted(saved) == sorted(vision_keys)
    for key in vision_keys:
        expected = base[key] + LAMBDA * sum(ft[key] - base[key] for ft in fts)
        torch.testing.assert_close(saved[key], expected, rtol=0, atol=1e-6)


def test_merged_and_individual_scores_match_an_independent_evaluation(run_report, clip_assets):
    from transformers import CLIPVisionModel

    report, out = run_report
    merged = CLIPVisionModel.from_pretrained(out / "model").state_dict()
    for task, names in CLIP_TASKS.items():
        acc, loss = independent_eval(clip_assets["base"], merged, clip_assets["data"][task], names)
        assert report["results"]["merged"][task]["accuracy"] == pytest.approx(acc, abs=1e-9)
        assert report["results"]["merged"][task]["loss"] == pytest.approx(loss, rel=1e-5)
        own = CLIPVisionModel.from_pretrained(clip_assets["ft"][task]).state_dict()
        acc, loss = independent_eval(clip_assets["base"], own, clip_assets["data"][task], names)
        assert report["results"]["individual"][task]["accuracy"] == pytest.approx(acc, abs=1e-9)
        assert report["results"]["individual"][task]["loss"] == pytest.approx(loss, rel=1e-5)


def test_saved_model_reloads_with_the_same_outputs_as_the_in_memory_merge(run_report, clip_assets):
    from fusion_hf.model_pools import CLIPVisionPool, HFPoolFields
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPVisionModel

    from fusion_core.run_context import RunContext

    _, out = run_report
    pool = CLIPVisionPool(HFPoolFields(base=str(clip_assets["base"]), models={k: str(v) for k, v in clip_assets["ft"].items()}))
    from fusion_merging.task_arithmetic import METHODS

    method_cls = next(m for m in METHODS if m.name == "task_arithmetic")
    method = method_cls(method_cls.Config(scaling_factor=LAMBDA))
    in_memory = pool.model_from_state_dict(method.run(pool, RunContext(show_progress=False)))
    reloaded = CLIPVisionModel.from_pretrained(out / "model").eval()
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(in_memory(pixel_values=pixels).pooler_output, reloaded(pixel_values=pixels).pooler_output)
    # the processor and tokenizer travel with the model
    text = "a photo of a cat."
    assert AutoTokenizer.from_pretrained(out / "model")(text)["input_ids"] == AutoTokenizer.from_pretrained(clip_assets["base"])(text)["input_ids"]
    assert AutoImageProcessor.from_pretrained(out / "model")(images=[pixels[0]], return_tensors="pt", do_rescale=False)["pixel_values"].shape == (1, 3, 32, 32)


def test_model_card_records_the_recipe(run_report, clip_assets):
    import yaml

    _, out = run_report
    text = (out / "model" / "README.md").read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert front["base_model"] == [str(clip_assets["base"])]
    assert "fusion-task_arithmetic" in front["tags"]
    recipe = yaml.safe_load(text.split("```yaml")[1].split("```")[0])
    assert recipe["method"] == "task_arithmetic"
    assert recipe["fields"]["scaling_factor"] == LAMBDA
    assert recipe["seed"] == 0
    assert recipe["inputs"] == {"base": str(clip_assets["base"]), **{k: str(v) for k, v in clip_assets["ft"].items()}}
    assert {"fusion-core", "fusion-hf", "torch", "transformers"} <= set(recipe["versions"])
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folders left behind


def test_same_config_and_seed_give_bit_identical_results(clip_assets, tmp_path, run_report):
    import fusion_core

    report, _ = run_report
    config = clip_run_config(clip_assets, tmp_path / "again", evaluate_inputs=False)
    again = fusion_core.run(config)
    assert again["results"]["merged"] == report["results"]["merged"]


def test_scaling_factor_zero_reproduces_the_pretrained_scores(clip_assets, tmp_path, run_report):
    import fusion_core

    report, _ = run_report
    config = clip_run_config(clip_assets, tmp_path / "zero", evaluate_inputs=False)
    config["method"]["scaling_factor"] = 0.0
    zero = fusion_core.run(config, write=False)
    assert zero["results"]["merged"] == report["results"]["pretrained"]


def test_hub_hosted_hub_names_in_the_model_card_carry_revisions():
    from fusion_hf.model_pools import CLIPVisionPool, HFPoolFields

    pool = CLIPVisionPool(HFPoolFields(base={"path": "openai/clip-vit-base-patch32", "revision": "abc123"},
                                       models={"svhn": "tanganke/clip-vit-base-patch32_svhn"}))
    assert pool.inputs() == {"base": "openai/clip-vit-base-patch32@abc123", "svhn": "tanganke/clip-vit-base-patch32_svhn@main"}
