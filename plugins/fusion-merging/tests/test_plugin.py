import json

from fusion_merging.plugin import all_methods

from fusion_core.cli.main import main

EXPECTED = {
    "simple_average", "weighted_average", "linear_interpolation", "task_arithmetic", "ties", "dare", "breadcrumbs",
    "della", "magnitude_prune", "sce", "magmax", "slerp", "nuslerp", "multislerp", "karcher", "model_stock", "expo",
    "tsv_m", "iso_c", "iso_cts", "layer_stack", "magnitude_pruning", "random_pruning", "consensus_ta", "tall_masks", "emr_merging",
    "mixtral_upcycling", "mixtral_merging", "wudi", "svc",
}


def test_plugin_is_installed(capsys):
    assert main(["plugins", "--json"]) == 0
    row = next(r for r in json.loads(capsys.readouterr().out) if r["name"] == "merging")
    assert row["status"] == "ok" and row["distribution"] == "fusion-merging"
    assert {r.split(":", 1)[1] for r in row["registered"]} == EXPECTED


def test_every_method_describes_itself():
    import attrs

    for cls in all_methods():
        assert cls.reference_url and cls.reference_url.startswith("http"), cls.name
        for field in attrs.fields(cls.Config):
            assert field.metadata.get("help"), f"{cls.name}.{field.name} has no help"
