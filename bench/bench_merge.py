"""Benchmark `fuse merge` against a naive torch merge script on GPT-2-small-shaped checkpoints.

Makes a base and K "fine-tunes" (base + seeded noise on every tensor) of a GPT-2 small
shaped model (124M parameters, fp32, ~0.5 GB each) as HF folders in a scratch directory,
then, in one run, times each merge and measures the peak RSS of the child process
(``/usr/bin/time``), for `fuse merge` and for the naive script (load every state dict
with safetensors, merge tensor by tensor in a loop, save), side by side:

    python bench/bench_merge.py                       # TA, TIES (density 0.2), DARE-TIES at N=4 and N=8
    python bench/bench_merge.py --n 4 --methods task_arithmetic --threads 2

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
    "ties": ["--set", "density=0.2", "--set", "scaling_factor=0.3"],
    "dare": ["--set", "variant=ties", "--set", "density=0.2", "--set", "scaling_factor=0.3"],
}
TARGETS = {("task_arithmetic", 4): 5.0, ("ties", 4): 12.0}
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
    config = GPT2Config(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024)
    for i, folder in enumerate(folders):
        stamp = folder / "bench-stamp.json"
        if stamp.exists() and json.loads(stamp.read_text()) == {"seed": seed, "index": i}:
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
    parser.add_argument("--methods", nargs="+", default=list(METHOD_ARGS), choices=list(METHOD_ARGS))
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
                method,
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
            if not args.no_naive:
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
    diffs = [r["max_abs_diff"] for r in rows if "max_abs_diff" in r]
    if diffs:
        print(f"\nmax |fuse − naive| on sampled tensors (TA/TIES): {max(diffs):.2e}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0 if all(math.isfinite(r["fuse_s"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
