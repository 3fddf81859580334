"""Fixtures of the fusion-ui tests: the app on a test client, a tiny results database."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def registry_and_pm():
    from fusion_core.plugins import get_plugin_manager
    from fusion_core.registry import build_registry

    pm = get_plugin_manager()
    return build_registry(pm), pm


def tiny_db(path):
    """A results DB of two ties runs (density 0.2 and 0.4) and the baselines on the mini benchmark's task names,
    written through the DB module's own API (``store_report``)."""
    from fusion_ui.store import _db

    tasks = ("rt_sentiment", "language_id")
    base_cfg = {"modelpool": {"name": "minibench"}, "taskpool": {"name": "minibench"}, "device": "cpu",
                "compute_dtype": "float32", "seed": 0, "benchmark": "mini"}
    with _db.open_db(path) as db:
        for density, values in ((0.2, (0.70, 0.95)), (0.4, (0.66, 0.90))):
            config = {**base_cfg, "method": {"name": "ties", "density": density, "scaling_factor": 1.0}}
            report = {
                "primary_metric": "accuracy",
                "results": {"merged": {t: {"accuracy": v} for t, v in zip(tasks, values, strict=True)},
                            "pretrained": {t: {"accuracy": v} for t, v in zip(tasks, (0.64, 0.63), strict=True)},
                            "individual": {t: {"accuracy": v} for t, v in zip(tasks, (0.74, 0.96), strict=True)}},
                "versions": {"python": "3.11", "fusion-core": "0.1.0"},
                "timings": {"setup": 1.5, "method": 2.0, "evaluate": 0.5},
                "duration_s": 4.0,
            }
            _db.store_report(db, report, config, summary=f"density={density:g}", source="bench", benchmark="mini")
    return path


@pytest.fixture
def results_db(tmp_path):
    return tiny_db(tmp_path / "results.sqlite")


@pytest.fixture
def client(registry_and_pm, results_db):
    from fusion_ui.server import allowed_hosts_for, create_app
    from starlette.testclient import TestClient

    registry, pm = registry_and_pm
    app = create_app(pm, registry, db_path=str(results_db), allowed_hosts=allowed_hosts_for("127.0.0.1", 8765))
    with TestClient(app, base_url="http://127.0.0.1:8765") as c:
        c.headers.update({"Origin": "http://127.0.0.1:8765"})
        yield c
