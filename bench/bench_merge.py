"""Benchmark `fuse merge` against a naive torch merge script on GPT-2-small-shaped checkpoints.

Makes a base and K "fine-tunes" (base + seeded noise on every tensor) of a GPT-2 small
shaped model (124M parameters, fp32, ~0.5 GB each) as HF folders in a scratch directory,
then, in one run, times each merge and measures the peak RSS of the child process
(``/usr/bin/time``), for `fuse merge` and for the naive script (load every state dict
with safetensors, merge tensor by tensor in a loop, save), side by side:

    python bench/bench_merge.py                       # every row below at N=4 and N=8 (della: --methods ties della)
    python bench/bench_merge.py --n 4 --methods task_arithmetic --threads 2
    python bench/bench_merge.py --n 4 --methods mk_ties mk_ties_per_model mk_slerp mk_slerp_gradient \
        --mergekit /work/penv/mk/bin/python          # mergekit recipes, side by side with mergekit-yaml

The ``mk_*`` cases run mergekit YAML recipes through ``fuse merge --mergekit-config``: a
per-model-density TIES recipe and a gradient SLERP recipe (slices, filters, gradients) next
to the same recipes with one scalar value (target: within 1.2× of the scalar case), and,
with ``--mergekit PYTHON``, through mergekit 0.1.5's ``mergekit-yaml`` on the same files.

Rows: ``task_arithmetic``; ``ties`` = per-tensor TIES (``convention=paper``, density 0.2, the
naive script's trim); ``ties_model`` = FusionBench's TIES, the default (each model's *whole* task
vector trimmed to its top 20 %, streamed: a sample pass and a counting pass, then one pass counting the
elected signs for the zero-vote majority); ``dare`` = DARE-TIES
without a TIES trim (``convention=paper``, density 0.2); ``dare_fb`` = FusionBench's DARE-TIES, the
default (drop 0.5, rescale, then the whole-model TIES trim); ``della`` = DELLA-TIES at its defaults
(density 0.5, ε 0.15, per-row magnitude ranks); ``magnitude_prune`` = per-tensor top 20 %, linear.
The summary prints each row's time against ``ties``'s (the issue's goals: ``ties_model`` ≤ 1.5×,
random methods and magnitude_prune ≤ 1.2×).

Targets (issue 3, on the 2-core box): TA N=4 <= 5 s, TIES N=4 <= 12 s, peak RSS <= 1.5 GB at
N=4 and growing under 15% from N=4 to N=8.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SCRATCH = ROOT / "bench" / "out" / "merge"

METHOD_ARGS = {
    "task_arithmetic": ["--set", "scaling_factor=0.3"],
    "ties": ["--set", "convention=paper", "--set", "density=0.2", "--set", "scaling_factor=0.3"],
    "ties_model": ["--set", "density=0.2", "--set", "scaling_factor=0.3"],
    "dare": ["--set", "convention=paper", "--set", "variant=ties", "--set", "density=0.2", "--set", "scaling_factor=0.3"],
    "dare_fb": ["--set", "variant=ties"],
    "della": ["--set", "variant=ties", "--set", "scaling_factor=0.3"],
    "magnitude_prune": ["--set", "density=0.2", "--set", "scaling_factor=0.3"],
}
FUSE_METHOD = {"ties_model": "ties", "dare_fb": "dare"}
"""Rows whose `fuse merge` method differs from the row's label."""
NAIVE = {"task_arithmetic", "ties", "dare"}
"""Rows the naive script implements."""
RATIO_GOALS = {"ties_model": 1.5, "dare": 1.2, "dare_fb": 1.2, "della": 1.2, "magnitude_prune": 1.2}
"""Goals for a row's time over the per-tensor ``ties`` row's at the same N."""
TARGETS = {("task_arithmetic", 4): 5.0, ("ties", 4): 12.0}

# mergekit recipes: name → (YAML template over {base} and {models}, the scalar case it is compared with)
RECIPES = {
    "mk_ties": ("ties", None),
    "mk_ties_per_model": ("ties", "mk_ties"),
    "mk_slerp": ("slerp", None),
    "mk_slerp_gradient": ("slerp", "mk_slerp"),
}
RATIO_TARGET = 1.2


def recipe_yaml(name: str, base: Path, models: list[Path]) -> str:
    """The mergekit YAML of recipe case ``name`` (SLERP cases use the base and the first model)."""
    if name.startswith("mk_slerp"):
        if name == "mk_slerp":
            t = "  t: 0.5"
        else:
            t = (
                "  t:\n    - {filter: attn, value: [0, 0.5, 0.3, 0.7, 1]}\n"
                "    - {filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}\n    - value: 0.5"
            )
        return (
            f"merge_method: slerp\nbase_model: {base}\nslices:\n  - sources:\n"
            f"      - {{model: {base}, layer_range: [0, 12]}}\n      - {{model: {models[0]}, layer_range: [0, 12]}}\n"
            f"parameters:\n{t}\ndtype: float32\n"
        )
    lines = [f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {base}"]
    for i, m in enumerate(models):
        density, weight = (0.2, 1.0) if name == "mk_ties" else (0.1 + 0.05 * (i % 4), 1.0 - 0.1 * i)
        lines.append(f"  - model: {m}\n    parameters: {{density: {density:g}, weight: {weight:g}}}")
    return "\n".join(lines) + "\nparameters: {normalize: true, lambda: 0.3}\ndtype: float32\n"

RSS_TARGET_GB = 1.5

# runs the real `fuse` entry point
FUSE_CHILD = """
import sys
from fusion_core.cli.main import main
sys.exit(main(sys.argv[1:]))
"""

# the naive approach: every state dict in memory, then a loop over tensor names
NAIVE_CHILD = r"""
import sys, torch
from safetensors.torch import load_file, save_file
method, out, base, *models = sys.argv[1:]
torch.set_num_threads(int(__import__("os").environ.get("BENCH_THREADS", "1")))
B = load_file(base + "/model.safetensors")
Ms = [load_file(m + "/model.safetensors") for m in models]
lam, d = 0.3, 0.2
gen = torch.Generator().manual_seed(0)
res = {}
for k, b in B.items():
    taus = [m[k] - b for m in Ms]
    if method == "task_arithmetic":
        res[k] = b + lam * sum(taus)
        continue
    if method == "ties":
        kept = []
        for t in taus:
            n = t.numel(); keep = max(1, int(d * n))
            thr = t.abs().flatten().kthvalue(n - keep + 1).values
            kept.append(torch.where(t.abs() >= thr, t, torch.zeros_like(t)))
    else:
        kept = [torch.where(torch.rand(t.shape, generator=gen) < d, t / d, torch.zeros_like(t)) for t in taus]
    stacked = torch.stack(kept)
    sign = torch.sign(stacked.sum(0)); sign[sign == 0] = 1
    agree = torch.sign(stacked) == sign
    num = (stacked * agree).sum(0); den = agree.sum(0).clamp(min=1)
    res[k] = b + lam * num / den
save_file(res, out)
"""

GPT2_SMALL = dict(vocab=50257, positions=1024, d=768, layers=12)


def gpt2_small_shapes() -> list[tuple[str, tuple[int, ...]]]:
    v, p, d, n = GPT2_SMALL["vocab"], GPT2_SMALL["positions"], GPT2_SMALL["d"], GPT2_SMALL["layers"]
    shapes = [("transformer.wte.weight", (v, d)), ("transformer.wpe.weight", (p, d))]
    for i in range(n):
        h = f"transformer.h.{i}."
        shapes += [
            (h + "ln_1.weight", (d,)),
            (h + "ln_1.bias", (d,)),
            (h + "attn.c_attn.weight", (d, 3 * d)),
            (h + "attn.c_attn.bias", (3 * d,)),
            (h + "attn.c_proj.weight", (d, d)),
            (h + "attn.c_proj.bias", (d,)),
            (h + "ln_2.weight", (d,)),
            (h + "ln_2.bias", (d,)),
            (h + "mlp.c_fc.weight", (d, 4 * d)),
            (h + "mlp.c_fc.bias", (4 * d,)),
            (h + "mlp.c_proj.weight", (4 * d, d)),
            (h + "mlp.c_proj.bias", (d,)),
        ]
    shapes += [("transformer.ln_f.weight", (d,)), ("transformer.ln_f.bias", (d,))]
    return shapes


def make_models(scratch: Path, k: int, seed: int) -> list[Path]:
    """The base and ``k`` fine-tunes as HF folders (cached across runs by seed)."""
    import torch
    from transformers import GPT2Config

    from fusion_core.engine.kernel import tensor_seed
    from fusion_core.engine.writer import ModelWriter

    shapes = gpt2_small_shapes()
    folders = [scratch / "base"] + [scratch / f"ft{i}" for i in range(1, k + 1)]
    config = GPT2Config(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024, architectures=["GPT2LMHeadModel"])
    for i, folder in enumerate(folders):
        stamp = folder / "bench-stamp.json"
        if stamp.exists() and json.loads(stamp.read_text()) == {"seed": seed, "index": i}:
            config.to_json_file(str(folder / "config.json"))
            continue
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        writer = ModelWriter(folder, [(n, s, torch.float32) for n, s in shapes])
        for name, shape in shapes:
            gen = torch.Generator().manual_seed(tensor_seed(seed, name, "base"))
            tensor = torch.randn(shape, generator=gen) * 0.02
            if i:
                gen = torch.Generator().manual_seed(tensor_seed(seed, name, f"ft{i}"))
                tensor += torch.randn(shape, generator=gen) * 0.002
            writer.write(name, tensor)
        writer.finish()
        config.to_json_file(str(folder / "config.json"))
        stamp.write_text(json.dumps({"seed": seed, "index": i}))
    return folders


def run_child(argv: list[str], env: dict) -> tuple[float, float, int, str]:
    """(seconds, peak RSS in GB, exit code, stderr tail) of one child process.

    Measured by ``/usr/bin/time`` (a small process forks the child): the kernel's
    max-RSS counter of a child spawned straight from this (large) process would
    start at this process's own high-water mark.
    """
    import tempfile

    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        proc = subprocess.run(
            ["/usr/bin/time", "-f", "%e %M", "-o", report.name, *argv],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        fields = report.read().split()
    seconds, kb = float(fields[-2]), float(fields[-1])
    return seconds, kb / 1024**2, proc.returncode, proc.stderr.strip()[-500:]


def compare(a: Path, b: Path, names: list[str]) -> float:
    from fusion_core.engine.readers import open_reader

    ra, rb = open_reader(a), open_reader(b)
    try:
        return max(float((ra.get(n) - rb.get(n)).abs().max()) for n in names)
    finally:
        ra.close()
        rb.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[4, 8], help="numbers of fine-tuned models")
    parser.add_argument("--methods", nargs="+", default=list(METHOD_ARGS), choices=[*METHOD_ARGS, *RECIPES])
    parser.add_argument("--mergekit", metavar="PYTHON", help="a Python with mergekit 0.1.5: run the mk_* recipes with mergekit-yaml too")
    parser.add_argument("--scratch", type=Path, default=DEFAULT_SCRATCH)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every child (the project's benchmarks use 1)")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive script")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()

    args.scratch.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    folders = make_models(args.scratch, max(args.n), args.seed)
    print(
        f"models: {len(folders)} GPT-2-small-shaped fp32 folders in {args.scratch} ({time.perf_counter() - t0:.0f} s)",
        file=sys.stderr,
    )
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(args.threads),
        MKL_NUM_THREADS=str(args.threads),
        BENCH_THREADS=str(args.threads),
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    import_torch = run_child([sys.executable, "-c", "import torch"], env)
    rows = []
    for method in args.methods:
        if method in RECIPES:
            for n in args.n[:1] if method.startswith("mk_slerp") else args.n:
                row = run_recipe(method, n, folders, args, env)
                if row is None:
                    return 1
                rows.append(row)
            continue
        for n in args.n:
            base, models = folders[0], folders[1 : n + 1]
            out = args.scratch / f"out-{method}-{n}"
            naive_out = args.scratch / f"naive-{method}-{n}.safetensors"
            shutil.rmtree(out, ignore_errors=True)
            fuse_argv = [
                sys.executable,
                "-c",
                FUSE_CHILD,
                "merge",
                FUSE_METHOD.get(method, method),
                "--base",
                str(base),
                *sum((["--model", str(m)] for m in models), []),
                "--output",
                str(out),
                "--quiet",
                *METHOD_ARGS[method],
            ]
            secs, rss, code, err = run_child(fuse_argv, env)
            if code:
                print(f"fuse merge {method} N={n} failed ({code}): {err}", file=sys.stderr)
                return 1
            row = {"method": method, "n": n, "fuse_s": secs, "fuse_gb": rss}
            if not args.no_naive and method in NAIVE:
                nsecs, nrss, ncode, nerr = run_child(
                    [sys.executable, "-c", NAIVE_CHILD, method, str(naive_out), str(base), *map(str, models)], env
                )
                if ncode:
                    print(f"naive {method} N={n} failed ({ncode}): {nerr}", file=sys.stderr)
                    return 1
                row.update(naive_s=nsecs, naive_gb=nrss)
                if method != "dare":  # DARE's masks come from different generators
                    row["max_abs_diff"] = compare(
                        out, naive_out, ["transformer.h.3.mlp.c_fc.weight", "transformer.ln_f.bias", "transformer.wpe.weight"]
                    )
                naive_out.unlink(missing_ok=True)
            shutil.rmtree(out, ignore_errors=True)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)

    recipe_rows = [r for r in rows if r["method"] in RECIPES]
    rows = [r for r in rows if r["method"] not in RECIPES]
    if recipe_rows:
        print_recipes(recipe_rows)
    print(f"\n`import torch` alone: {import_torch[0]:.1f} s, {import_torch[1]:.2f} GB; torch threads per child: {args.threads}")
    header = f"{'method':<16}{'N':>3} {'fuse s':>8} {'fuse GB':>8} {'naive s':>8} {'naive GB':>9} {'time x':>7} {'RSS x':>6}  {'target':<22}"
    print(header)
    print("-" * len(header))
    by = {(r["method"], r["n"]): r for r in rows}
    for r in rows:
        naive = "naive_s" in r
        target = []
        if (r["method"], r["n"]) in TARGETS:
            limit = TARGETS[(r["method"], r["n"])]
            target.append(f"{'ok' if r['fuse_s'] <= limit else 'MISS'} <={limit:g}s")
        if r["n"] == 4:
            target.append(f"{'ok' if r['fuse_gb'] <= RSS_TARGET_GB else 'MISS'} <={RSS_TARGET_GB}GB")
        if r["n"] == 8 and (r["method"], 4) in by:
            growth = r["fuse_gb"] / by[(r["method"], 4)]["fuse_gb"] - 1
            target.append(f"{'ok' if growth < 0.15 else 'MISS'} RSS {growth:+.0%} vs N=4")
        cells = (
            [
                f"{r['naive_s']:.1f}",
                f"{r['naive_gb']:.2f}",
                f"{r['naive_s'] / r['fuse_s']:.1f}",
                f"{r['naive_gb'] / r['fuse_gb']:.1f}",
            ]
            if naive
            else ["-"] * 4
        )
        print(
            f"{r['method']:<16}{r['n']:>3} {r['fuse_s']:>8.1f} {r['fuse_gb']:>8.2f} {cells[0]:>8} {cells[1]:>9} {cells[2]:>7} {cells[3]:>6}  "
            f"{', '.join(target):<22}"
        )
    for r in rows:
        ties = by.get(("ties", r["n"]))
        if ties and r["method"] != "ties":
            goal = RATIO_GOALS.get(r["method"])
            verdict = f" (goal ≤ {goal:g}×: {'ok' if r['fuse_s'] / ties['fuse_s'] <= goal else 'MISS'})" if goal else ""
            print(f"{r['method']} / ties (per tensor) time, N={r['n']}: {r['fuse_s'] / ties['fuse_s']:.2f}×{verdict}")
    diffs = [r["max_abs_diff"] for r in rows if "max_abs_diff" in r]
    if diffs:
        print(f"\nmax |fuse − naive| on sampled tensors (TA/TIES): {max(diffs):.2e}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0 if all(math.isfinite(r["fuse_s"]) for r in rows) else 1


def run_recipe(name: str, n: int, folders: list[Path], args, env: dict) -> dict | None:
    base, models = folders[0], folders[1 : n + 1]
    n_used = 1 if name.startswith("mk_slerp") else n
    config = args.scratch / f"{name}-{n_used}.yml"
    config.write_text(recipe_yaml(name, base, models))
    out = args.scratch / f"out-{name}-{n_used}"
    shutil.rmtree(out, ignore_errors=True)
    argv = [sys.executable, "-c", FUSE_CHILD, "merge", "--mergekit-config", str(config), "--output", str(out), "--quiet"]
    secs, rss, code, err = run_child(argv, env)
    if code:
        print(f"fuse merge --mergekit-config {name} N={n_used} failed ({code}): {err}", file=sys.stderr)
        return None
    row = {"method": name, "n": n_used, "fuse_s": secs, "fuse_gb": rss}
    if args.mergekit:
        mk_out = args.scratch / f"mergekit-{name}-{n_used}"
        shutil.rmtree(mk_out, ignore_errors=True)
        mk = [args.mergekit, "-c", "from mergekit.scripts.run_yaml import main; main()", str(config), str(mk_out), "--quiet"]
        msecs, mrss, mcode, merr = run_child(mk, env)
        if mcode:
            print(f"mergekit-yaml {name} failed ({mcode}): {merr}", file=sys.stderr)
        else:
            names = ["transformer.h.3.mlp.c_fc.weight", "transformer.h.7.attn.c_attn.weight", "transformer.ln_f.bias"]
            row.update(mergekit_s=msecs, mergekit_gb=mrss, max_abs_diff_mergekit=compare(out, mk_out, names))
        shutil.rmtree(mk_out, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(row), file=sys.stderr)
    return row


def print_recipes(rows: list[dict]) -> None:
    by = {(r["method"], r["n"]): r for r in rows}
    header = f"{'mergekit recipe':<20}{'N':>3} {'fuse s':>8} {'fuse GB':>8} {'vs scalar':>10} {'mergekit s':>11} {'mk GB':>7} {'mk/fuse':>8} {'max|Δ|':>9}"
    print("\n" + header)
    print("-" * len(header))
    for r in rows:
        scalar = RECIPES[r["method"]][1]
        ratio = "-"
        if scalar and (scalar, r["n"]) in by:
            x = r["fuse_s"] / by[(scalar, r["n"])]["fuse_s"]
            ratio = f"{x:.2f}{'' if x <= RATIO_TARGET else ' MISS'}"
        mk = [f"{r['mergekit_s']:.1f}", f"{r['mergekit_gb']:.2f}", f"{r['mergekit_s'] / r['fuse_s']:.1f}", f"{r['max_abs_diff_mergekit']:.1e}"] if "mergekit_s" in r else ["-"] * 4
        print(f"{r['method']:<20}{r['n']:>3} {r['fuse_s']:>8.1f} {r['fuse_gb']:>8.2f} {ratio:>10} {mk[0]:>11} {mk[1]:>7} {mk[2]:>8} {mk[3]:>9}")


if __name__ == "__main__":
    sys.exit(main())
