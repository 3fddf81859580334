"""Bad inputs: each gives one clear line through the CLI and a nonzero exit, quickly and without network."""

from __future__ import annotations

import time

import pytest
import yaml
from hf_testkit import clip_run_config, save_clip_base, save_clip_finetuned

pytest.importorskip("torch")


def fuse(capsys, config: dict, tmp_path, *extra: str) -> tuple[int, str]:
    from fusion_core.cli.main import main

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    capsys.readouterr()  # drop what building the fixtures printed
    code = main(["run", str(path), *extra])
    err = capsys.readouterr().err.strip()
    return code, err


def assert_one_line(code: int, err: str, *needles: str) -> None:
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_hub_id_offline_fails_fast(clip_assets, tmp_path, capsys):
    config = clip_run_config(clip_assets, tmp_path / "out")
    config["modelpool"]["models"]["ghost"] = {"path": "no-such-org/no-such-model", "revision": "v1"}
    start = time.perf_counter()
    code, err = fuse(capsys, config, tmp_path)
    assert time.perf_counter() - start < 30
    assert_one_line(code, err, "model 'ghost'", "no-such-org/no-such-model@v1", "offline")
    code, err = fuse(capsys, config, tmp_path, "--dry-run")  # the dry run only says what would be fetched
    assert code == 0


def test_unreachable_hub_fails_fast_when_not_offline(monkeypatch):
    from fusion_hf import hub

    from fusion_core.errors import InputError

    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(key, "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    start = time.perf_counter()
    with pytest.raises(InputError, match="hub is unreachable: cannot connect to 127.0.0.1:9"):
        hub.require_network("model 'x': hub id a/b@main")
    assert time.perf_counter() - start < hub.PROBE_TIMEOUT_S + 1


def test_local_path_missing(clip_assets, tmp_path, capsys):
    config = clip_run_config(clip_assets, tmp_path / "out")
    config["modelpool"]["models"]["lost"] = str(tmp_path / "nowhere" / "model")
    code, err = fuse(capsys, config, tmp_path, "--dry-run")
    assert_one_line(code, err, "model 'lost'", "local path not found", "nowhere/model")


def test_architectures_differ_across_the_pool(clip_assets, tmp_path, capsys):
    other = save_clip_finetuned(save_clip_base(tmp_path / "wide_base", hidden=48), tmp_path / "wide", seed=3)
    config = clip_run_config(clip_assets, tmp_path / "out")
    config["modelpool"]["models"]["wide"] = str(other)
    code, err = fuse(capsys, config, tmp_path, "--dry-run")
    assert_one_line(code, err, "architectures differ across the pool", "model 'wide'", "hidden_size=48", "differs in hidden_size")


@pytest.mark.parametrize(
    ("task_fields", "needles"),
    [
        ({"split": "validation"}, ["task 'animals'", "split 'validation' not found", "available splits: test"]),
        ({"label_column": "labels"}, ["task 'animals'", "column 'labels' not found", "columns: image, label"]),
        ({"class_names": ["cat", "dog"]}, ["task 'animals'", "class_names has 2 names", "has 3 classes"]),
    ],
)
def test_dataset_problems(clip_assets, tmp_path, capsys, task_fields, needles):
    config = clip_run_config(clip_assets, tmp_path / "out")
    config["taskpool"]["tasks"]["animals"].update(task_fields)
    code, err = fuse(capsys, config, tmp_path, "evaluate_inputs=false")
    assert_one_line(code, err, *needles)
    assert not (tmp_path / "out").exists()


def test_class_names_shorter_than_the_labels_of_a_plain_column(tmp_path):
    import datasets
    from fusion_hf.task_pools.clip_zero_shot import ClipZeroShot, ClipZeroShotConfig

    from fusion_core.errors import InputError

    folder = tmp_path / "plain"
    datasets.Dataset.from_dict({"image": [[[0] * 4] * 4] * 3, "label": [0, 1, 4]}).save_to_disk(str(folder))
    pool = ClipZeroShot(ClipZeroShotConfig(clip_model="x/y", tasks={"t": {"dataset": str(folder), "class_names": ["a", "b"]}}))
    with pytest.raises(InputError, match=r"labels span 0\.\.4 but there are 2 class names"):
        pool.dataset("t")


def test_missing_hub_dataset_offline_is_one_line(clip_assets, tmp_path, capsys):
    config = clip_run_config(clip_assets, tmp_path / "out")
    config["taskpool"]["tasks"]["animals"] = {"dataset": "no-such-org/no-such-data", "split": "test"}
    code, err = fuse(capsys, config, tmp_path, "evaluate_inputs=false")
    assert_one_line(code, err, "task 'animals'", "no-such-org/no-such-data", "offline")
