"""Peak memory of `fuse analyze task-vectors` as the model grows: it should not grow with the model.

Makes a base and N "fine-tunes" (base + seeded noise) of a stack of L square fp32 layers
(width W) as .safetensors files in a scratch directory, for two depths, then runs
``fuse analyze task-vectors`` on each in a child process and prints its wall time and peak
RSS (``ru_maxrss`` of the child) side by side:

    python bench/bench_analyze.py                      # W 1024, depths 8 and 32, N 3
    python bench/bench_analyze.py --width 2048 --depths 4 16 --n 4

The model size grows with the depth; the analysis keeps N×N sums per layer and reads tensors
in row blocks of 2¹⁶ entries per model, so the peak RSS should stay roughly flat
(the interpreter, torch and one block per model), while a flatten-everything analysis (as
FusionBench's) would grow with N × the model size.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_models(folder: Path, width: int, depth: int, n: int) -> list[Path]:
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.proj.weight": torch.randn(width, width, generator=gen) for i in range(depth)}
    paths = [folder / "base.safetensors"]
    save_file(base, str(paths[0]))
    for j in range(n):
        noisy = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        paths.append(folder / f"ft{j}.safetensors")
        save_file(noisy, str(paths[-1]))
        del noisy
    return paths


def run_analyze(paths: list[Path]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB, this child's own ``ru_maxrss`` from ``wait4``) of `fuse analyze task-vectors`."""
    entry = "import sys; from fusion_core.cli.main import main; sys.exit(main(sys.argv[1:]))"
    args = [sys.executable, "-c", entry, "analyze", "task-vectors", "--base", str(paths[0])]
    for p in paths[1:]:
        args += ["--model", str(p)]
    start = time.perf_counter()
    child = subprocess.Popen([*args, "--format", "plain"], stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"fuse analyze failed with exit code {child.returncode}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depths", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--n", type=int, default=3)
    parser.add_argument("--make", metavar="DIR", help=argparse.SUPPRESS)  # internal: write the models of --depths[0] into DIR
    args = parser.parse_args()
    if args.make:
        make_models(Path(args.make), args.width, args.depths[0], args.n)
        return
    rows = []
    for depth in args.depths:
        with tempfile.TemporaryDirectory(prefix="bench_analyze_") as tmp:
            # the models are written by another child: this process stays small (a forked child starts with its RSS)
            subprocess.run([sys.executable, __file__, "--make", tmp, "--width", str(args.width), "--depths", str(depth),
                            "--n", str(args.n)], check=True)
            paths = [Path(tmp) / "base.safetensors", *(Path(tmp) / f"ft{j}.safetensors" for j in range(args.n))]
            size_mib = sum(p.stat().st_size for p in paths[:1]) / 2**20
            seconds, peak = run_analyze(paths)
            rows.append((depth, size_mib, seconds, peak))
    print(f"{'depth':>5} {'model MiB':>10} {'inputs MiB':>10} {'seconds':>8} {'peak RSS MiB':>12}")
    for depth, size, seconds, peak in rows:
        print(f"{depth:>5} {size:>10.0f} {size * (args.n + 1):>10.0f} {seconds:>8.1f} {peak:>12.0f}")
    (_, s0, _, p0), (_, s1, _, p1) = rows[0], rows[-1]
    print(f"model {s1 / s0:.1f}x larger → peak RSS {p1 / p0:.2f}x")


if __name__ == "__main__":
    main()
