"""FusionBench defaults, named conventions, per-model parameters, the whole-model TIES trim, unchanged tensors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from fusion_merging.model_trim import KthMagnitude, fusionbench_rank
from fusion_merging.task_arithmetic import Dare, MagMax, TaskArithmetic, Ties

from fusion_core.config import describe_fields, make_config
from fusion_core.engine.stream import MergeOptions, merge_readers
from fusion_core.errors import InputError
from fusion_core.plugins import get_plugin_manager
from fusion_core.registry import build_registry

torch.set_num_threads(1)


def test_defaults_are_fusionbench_and_conventions_fill_only_unset_fields():
    ties = Ties.Config()
    assert (ties.trim, ties.density, ties.scaling_factor, ties.sign_election, ties.divisor) == ("model", 0.2, 0.3, "sum", "none")
    mk = Ties.Config(convention="mergekit", density=0.5)
    assert (mk.trim, mk.density, mk.scaling_factor, mk.sign_election, mk.divisor) == ("tensor", 0.5, 1.0, "weighted_sum", "weights")
    assert Ties.Config(convention="paper").divisor == "count"
    assert TaskArithmetic.Config().scaling_factor == 0.3 and TaskArithmetic.Config(convention="mergekit").scaling_factor == 1.0
    dare = Dare.Config()
    assert (dare.density, dare.scaling_factor, dare.rescale, dare.ties_trim) == (0.5, 0.3, "inverse_p", 0.2)
    assert Dare.Config(variant="ties").scaling_factor == 0.5
    assert Dare.Config(convention="paper").density == 0.1
    assert MagMax.Config().scaling_factor == 0.5 and MagMax.Config().tie_break == "later"


def test_an_explicit_null_is_refused_with_the_type():
    from fusion_core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"method.scaling_factor: expected float, got None"):
        make_config(Ties.Config, {"scaling_factor": None}, where="method")


def test_fusionbench_rank_is_kthvalue_of_d_minus_floor():
    assert fusionbench_rank(10, 0.2) == 8  # keeps ⌊0.2·10⌋ + 1 = 3 distinct entries
    assert fusionbench_rank(10, 1.0) == 0 and fusionbench_rank(10, 0.0) == 10


def _kth_of(parts, dtype, density):
    kth = KthMagnitude(dtype, density)
    passes = 0
    while not kth.done:
        for p in reversed(parts):
            kth.add(p)
        kth.end_pass()
        passes += 1
    return kth, passes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("skewed", [False, True], ids=["sampled", "missed-bracket"])
def test_kth_magnitude_brackets_from_a_sample_and_stays_exact_when_it_misses(dtype, skewed):
    gen = torch.Generator().manual_seed(1)
    big = torch.randn(4_000_000, generator=gen).to(dtype).abs()
    if skewed:  # the strided sample sees only tiny values: its bracket is far below the true rank
        big[::16] = 1e-3
    flat = big.float() if dtype == torch.bfloat16 else big
    for density in (0.2, 0.7):
        kth, passes = _kth_of([big[:1_000_000], big[1_000_000:]], dtype, density)
        assert kth.threshold == float(flat.kthvalue(fusionbench_rank(flat.numel(), density)).values)
        if dtype == torch.float32:  # the sample, then one counting pass (a wider bracket: two; after a miss: two more)
            assert passes == 4 if skewed else passes == (2 if density == 0.2 else 3) or passes == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kth_magnitude_counts_a_histogram_past_the_band_cap(dtype, monkeypatch):
    """Past BAND_CAP in-window entries the counting pass narrows a histogram instead: still exact."""
    from fusion_merging import model_trim

    monkeypatch.setattr(model_trim, "BAND_CAP", 50)
    gen = torch.Generator().manual_seed(2)
    big = torch.randn(600_000, generator=gen).to(dtype).abs()
    for density in (0.2, 0.7):
        kth, passes = _kth_of([big[:200_000], big[200_000:]], dtype, density)
        assert kth.threshold == float(big.kthvalue(fusionbench_rank(big.numel(), density)).values)
        assert passes >= 3  # the sample, a histogram pass, then the narrowed window


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_kth_magnitude_is_kthvalue_over_all_tensors(dtype):
    gen = torch.Generator().manual_seed(0)
    parts = [torch.randn(s, generator=gen).to(dtype).abs() * 10.0**e for e, s in enumerate((300, 7, 1000))]
    parts[0][:40] = parts[0][40]  # ties
    parts[1][:3] = 0
    flat = torch.cat(parts)
    flat = flat.float() if dtype == torch.bfloat16 else flat  # kthvalue has no bfloat16 kernel; the values are exact in float32
    for density in (0.0, 0.05, 0.2, 0.5, 0.99):
        kth = KthMagnitude(dtype, density)
        while not kth.done:
            for p in reversed(parts):
                kth.add(p)
            kth.end_pass()
        assert kth.threshold == float(flat.kthvalue(fusionbench_rank(flat.numel(), density)).values)


def _models(n=3):
    gen = torch.Generator().manual_seed(1)
    base = {"a": torch.randn(40, 30, generator=gen), "b": torch.randn(30, generator=gen), "frozen": torch.randn(5, 5, generator=gen)}
    models = []
    for i in range(n):
        m = copy.deepcopy(base)
        m["a"] += torch.randn(40, 30, generator=gen) * (1 + i)
        m["b"] += torch.randn(30, generator=gen) * 0.01
        models.append(m)
    return base, models


def _reference_fusionbench_ties(base, models, density=0.2, scale=0.3):
    """FusionBench's TIES written out: flatten every task vector, trim with kthvalue + ≥, elect, sum."""
    keys = sorted(base)
    flat = torch.stack([torch.cat([(m[k] - base[k]).reshape(-1) for k in keys]) for m in models])
    d = flat.shape[1]
    kth = flat.abs().kthvalue(d - int(d * density), dim=1, keepdim=True).values
    trimmed = flat * (flat.abs() >= kth)
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    merged = (trimmed * torch.where(sign > 0, trimmed > 0, trimmed < 0)).sum(0)
    out, at = {}, 0
    for k in keys:
        n = base[k].numel()
        out[k] = base[k] + scale * merged[at : at + n].reshape(base[k].shape)
        at += n
    return out


@pytest.mark.parametrize("chunk_bytes", [None, 2048])
def test_whole_model_trim_in_the_engine_is_fusionbenchs(chunk_bytes):
    base, models = _models()
    opts = MergeOptions(prefetch=False, notify=lambda m: None)
    if chunk_bytes:
        opts.chunk_bytes = chunk_bytes
    got = merge_readers(Ties(Ties.Config()), base, models, opts)
    expected = _reference_fusionbench_ties(base, models)
    for k in base:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-6)
    # the large-magnitude tensor takes almost all of the budget: the small biases are trimmed to nothing
    assert torch.equal(got["b"], base["b"])


def test_per_model_density_and_its_count_check():
    base, models = _models()
    method = Ties(Ties.Config(convention="paper", density=[1.0, 0.0, 1.0]))
    got = merge_readers(method, base, models, MergeOptions(prefetch=False))
    expected = merge_readers(Ties(Ties.Config(convention="paper", density=1.0)), base, [models[0], models[2]], MergeOptions(prefetch=False))
    for k in base:
        assert torch.equal(got[k], expected[k])
    with pytest.raises(InputError, match="density has 2 value"):
        merge_readers(Ties(Ties.Config(density=[0.1, 0.2])), base, models, MergeOptions(prefetch=False))


def test_a_tensor_no_expert_changed_comes_out_as_the_base_in_every_method():
    from fusion_core.engine.kernel import KernelMethod

    base, models = _models(4)
    registry = build_registry(get_plugin_manager())
    checked = []
    for name in registry.names("method"):
        cls = registry.get("method", name).cls
        if not issubclass(cls, KernelMethod):
            continue
        if cls.max_models is not None and cls.max_models < 4:
            continue
        got = merge_readers(cls(make_config(cls.Config, {}, where=name)), base, models, MergeOptions(prefetch=False))
        assert torch.equal(got["frozen"], base["frozen"]), name
        checked.append(name)
    assert {"ties", "dare", "della", "multislerp", "karcher", "tsv_m", "magmax", "model_stock", "task_arithmetic"} <= set(checked)


def test_fuse_run_ties_on_fusionbenchs_clip_config_resolves_to_fusionbenchs_settings(capsys):
    from pathlib import Path

    from fusion_core.cli.main import main

    config = Path(__file__).resolve().parents[2] / "fusion-hf" / "configs" / "clip-vit-b32-tall8.yaml"
    if not config.exists():
        pytest.skip("fusion-hf's configs are not in this checkout")
    assert main(["run", str(config), "method=ties", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert (
        "method:\n  name: ties\n  convention: fusionbench\n  trim: model\n  density: 0.2\n  scaling_factor: 0.3\n"
        "  weights: null\n  sign_election: sum\n  divisor: none\n"
    ) in out


def test_fuse_show_ties_names_the_fusionbench_default_and_the_mergekit_convention(capsys, monkeypatch):
    from fusion_core.cli.main import main

    monkeypatch.setenv("COLUMNS", "400")  # one line per field: the help text is not wrapped inside table cells
    assert main(["show", "ties"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "'fusionbench'" in text and "mergekit" in text and "merge_method: ties" in text and "fusion_bench method=ties_merging" in text


@pytest.fixture
def fresh_console():
    """The stdout console built for this test's COLUMNS (it is cached), and not left to later tests."""
    from fusion_core.consoles import console

    console.cache_clear()
    yield
    console.cache_clear()


def test_fuse_show_ties_table_gives_each_unset_fields_effective_default_and_its_convention(capsys, monkeypatch, fresh_console):
    from fusion_core.cli.main import main

    monkeypatch.setenv("COLUMNS", "400")
    assert main(["show", "ties"]) == 0
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in capsys.readouterr().out.splitlines() if line.startswith("│")}
    assert rows["density"][:2] == ["float | list[float]", "0.2 (convention fusionbench; mergekit: 1.0, paper: 0.2)"]
    assert rows["scaling_factor"][1] == "0.3 (convention fusionbench; mergekit: 1.0, paper: 1.0)"
    assert rows["trim"][1] == "'model' (convention fusionbench; mergekit: 'tensor', paper: 'tensor')"
    assert rows["divisor"][1] == "'none' (convention fusionbench; mergekit: 'weights', paper: 'count')"
    assert rows["weights"][1] == "None" and rows["convention"][1] == "'fusionbench'"
    assert "null" not in " ".join(r[1] for r in rows.values())

def test_fuse_show_on_a_narrow_terminal_wraps_a_long_default_under_its_field(capsys, monkeypatch, fresh_console):
    from fusion_core.cli.main import main

    monkeypatch.setenv("COLUMNS", "80")  # narrow: one block per field; a long default wraps indented under its field
    assert main(["show", "ties"]) == 0
    fields = capsys.readouterr().out.split("fields:\n")[1]
    assert "  trim: 'model' | 'tensor' = 'model' (convention fusionbench; mergekit:\n    'tensor', paper: 'tensor')\n" in fields
    assert all(line.startswith("  ") and len(line) <= 80 for line in fields.splitlines())


def test_fuse_show_json_gives_each_conventions_default_and_the_declaration_is_what_is_filled(capsys):
    from fusion_merging.geometric import ModelStock

    from fusion_core.cli.main import main

    assert main(["show", "ties", "--json"]) == 0
    fields = {f["name"]: f for f in json.loads(capsys.readouterr().out)["fields"]}
    assert fields["density"]["default"] == "0.2 (convention fusionbench; mergekit: 1.0, paper: 0.2)"
    assert fields["density"]["default_by_convention"] == {"fusionbench": 0.2, "mergekit": 1.0, "paper": 0.2}
    assert fields["sign_election"]["default_by_convention"] == {"fusionbench": "sum", "mergekit": "weighted_sum", "paper": "sum"}
    assert "default_by_convention" not in fields["weights"] and "default_by_convention" not in fields["convention"]
    assert main(["show", "dare", "--json"]) == 0
    scaling = next(f for f in json.loads(capsys.readouterr().out)["fields"] if f["name"] == "scaling_factor")
    assert scaling["default"] == "0.3 (convention fusionbench; mergekit: 1.0, paper: 1.0; fusionbench with variant='ties': 0.5)"
    assert scaling["default_cases"] == [{"choice": "fusionbench", "when": "variant", "equals": "ties", "value": 0.5}]
    # what fuse show declares is what each convention's config is built with
    for cls, extra in ((Ties, {}), (TaskArithmetic, {}), (Dare, {}), (Dare, {"variant": "ties"}), (ModelStock, {})):
        for row in describe_fields(cls.Config):
            for convention, value in row.get("default_by_convention", {}).items():
                built = getattr(cls.Config(convention=convention, **extra), row["name"])
                case = next((c["value"] for c in row.get("default_cases", []) if c["choice"] == convention
                             and extra.get(c["when"]) == c["equals"]), value)
                assert built == case, (cls.name, convention, extra, row["name"])


def test_fuse_show_of_a_convention_method_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys; from fusion_core.cli.main import main\n"
            "codes = [main(['show', 'ties']), main(['show', 'dare', '--json'])]\n"
            "print('HEAVY', codes, [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY [0, 0] []" in out.stdout


@pytest.mark.parametrize("chunk_bytes", [None, 2048])
def test_fusionbench_dare_ties_is_drop_rescale_then_the_whole_model_trim(chunk_bytes):
    """The documented DARE mask (``ctx.rand_like(τ, salt=str(i)) < density``), ÷ density, then
    FusionBench's TIES on the result: whole-model trim to the top 20 %, sign of the sum, sum, λ 0.5."""
    from fusion_core.engine.kernel import KernelContext

    base, models = _models()
    opts = MergeOptions(prefetch=False, notify=lambda m: None, seed=3)
    if chunk_bytes:
        opts.chunk_bytes = chunk_bytes
    got = merge_readers(Dare(Dare.Config(variant="ties")), base, models, opts)
    dropped = []
    for i, m in enumerate(models):
        d = {}
        for k in base:
            tau = m[k] - base[k]
            keep = KernelContext(name=k, seed=3).rand_like(tau, salt=str(i)) < 0.5
            d[k] = base[k] + torch.where(keep, tau, torch.zeros_like(tau)) / 0.5
        dropped.append(d)
    expected = _reference_fusionbench_ties(base, dropped, density=0.2, scale=0.5)
    for k in base:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-6)


# -- zero votes: FusionBench elects the model-wide majority sign where the trimmed votes cancel


def _cancelling_toy(tie: bool):
    """Two models over a zero base whose votes cancel at a[0,0], a[1,2] and b[0] (worked by hand).

    Elected signs elsewhere — a: −, +, (+ if ``tie`` else −), +; b: −, −: the majority is − by
    4 to 2, or a 3–3 tie (FusionBench leaves γ = 0 there and its disjoint merge keeps the
    negative entries: −)."""
    zero = {"a": torch.zeros(2, 3), "b": torch.zeros(3)}
    first = {"a": torch.tensor([[1.0, -2.0, 3.0], [4.0, 5.0, -6.0]]), "b": torch.tensor([1.0, -1.0, -1.0])}
    second = {"a": torch.tensor([[-1.0, -1.0, 1.0], [1.0 if tie else -5.0, 1.0, 6.0]]), "b": torch.tensor([-1.0, -2.0, -1.0])}
    return zero, [first, second]


@pytest.mark.parametrize("chunk_bytes", [None, 8])
@pytest.mark.parametrize("tie", [False, True], ids=["minus-majority", "tie"])
def test_cancelling_votes_take_the_model_wide_majority_sign_worked_by_hand(tie, chunk_bytes):
    base, models = _cancelling_toy(tie)
    opts = MergeOptions(prefetch=False, notify=lambda m: None)
    if chunk_bytes:
        opts.chunk_bytes = chunk_bytes  # row blocks of a
    method = Ties(Ties.Config(density=1.0))  # fusionbench: zero_vote majority, merge by sum, λ 0.3
    assert method.config.zero_vote == "majority"
    got = merge_readers(method, base, models, opts)
    # agreeing entries summed; the cancelled entries take − (the negative model's entry)
    merged_a = torch.tensor([[-1.0, -3.0, 4.0], [5.0 if tie else -5.0, 6.0, -6.0]])
    merged_b = torch.tensor([-1.0, -3.0, -2.0])
    assert torch.equal(got["a"], 0.3 * merged_a) and torch.equal(got["b"], 0.3 * merged_b)
    plus = merge_readers(Ties(Ties.Config(density=1.0, zero_vote="plus")), base, models, opts)
    merged_a[0, 0], merged_a[1, 2], merged_b[0] = 1.0, 6.0, 1.0  # + : the positive model's entry
    assert torch.equal(plus["a"], 0.3 * merged_a) and torch.equal(plus["b"], 0.3 * merged_b)


def test_a_majority_of_plus_keeps_the_positive_entries_and_one_model_needs_no_vote_pass():
    base, (first, second) = _cancelling_toy(False)
    flipped = [{k: -v for k, v in first.items()}, {k: -v for k, v in second.items()}]
    got = merge_readers(Ties(Ties.Config(density=1.0)), base, flipped, MergeOptions(prefetch=False))
    expected = 0.3 * torch.tensor([[1.0, 3.0, -4.0], [5.0, -6.0, 6.0]])  # majority + : the positive entries
    assert torch.equal(got["a"], expected) and torch.equal(got["b"], 0.3 * torch.tensor([1.0, 3.0, 2.0]))
    method = Ties(Ties.Config(density=0.5))
    assert method.model_passes(1) == method.model_passes(2) - 1  # the vote pass only where votes can cancel
    assert Ties(Ties.Config(convention="paper")).model_passes(2) == 0
    assert Ties(Ties.Config(convention="paper", zero_vote="majority")).model_passes(2) == 1


def test_a_kernel_called_on_its_own_takes_the_majority_of_its_tensor():
    from fusion_core.engine.kernel import KernelContext

    base, models = _cancelling_toy(False)
    method = Ties(Ties.Config(density=1.0))
    got = method.kernel("a", base["a"], [m["a"] for m in models], KernelContext(name="a"))
    # a alone elects −, +, −, + where the votes do not cancel: a tie, so −
    assert torch.equal(got, 0.3 * torch.tensor([[-1.0, -3.0, 4.0], [-5.0, 6.0, -6.0]]))


def _quantized_models(n: int, seed: int):
    """Task vectors in multiples of 1/4, mostly negative: many exact cancellations, majority −."""
    gen = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(37, 11, generator=gen), "v": torch.randn(13, generator=gen)}
    models = []
    for _ in range(n):
        models.append({k: b + (torch.randint(-4, 3, b.shape, generator=gen).float() * 0.25) for k, b in base.items()})
    return base, models


@pytest.mark.parametrize("n", [2, 3])
def test_zero_votes_in_the_engine_are_fusionbenchs_with_any_row_blocks(n):
    base, models = _quantized_models(n, 5)
    expected = _reference_fusionbench_ties(base, models, density=0.6)
    outputs = []
    for chunk_bytes in (None, 4 * 11 * (n + 1), 4 * 11 * 5 * (n + 1)):  # whole tensors, rows of 1 and of 5
        opts = MergeOptions(prefetch=False, notify=lambda m: None)
        if chunk_bytes:
            opts.chunk_bytes = chunk_bytes
        outputs.append(merge_readers(Ties(Ties.Config(density=0.6)), base, models, opts))
    for k in base:
        assert all(torch.equal(o[k].view(torch.int32), outputs[0][k].view(torch.int32)) for o in outputs), k
        torch.testing.assert_close(outputs[0][k], expected[k], rtol=0, atol=1e-6)
    plus = merge_readers(Ties(Ties.Config(density=0.6, zero_vote="plus")), base, models, MergeOptions(prefetch=False))
    assert any(not torch.equal(plus[k], outputs[0][k]) for k in base)  # the toy has cancelling votes
