"""Per-step cost of AdaMerging (layer-wise) and WEMoE against naive deepcopy-and-merge loops, in one run.

Model: an MLP encoder of ``--layers`` Linear(d, d) + ReLU (d = ``--width``; 4 × 1024² ≈ 4.2 M
parameters by default), a fixed linear head, N = ``--models`` fine-tunes (base + seeded noise),
a batch of ``--batch`` unlabelled inputs per task.  Each variant runs in its own child process
(so peak memory is its own), does ``--warmup`` + ``--steps`` adaptation steps (forward, entropy,
backward, Adam step), and reports the median step time and the peak RSS of the measured steps above the RSS
before them (models, task vectors and warm-up done; Linux ``clear_refs`` resets the peak):

- ``adamerging``: fusion-adaptive's step (``merge_parameters`` + ``functional_call`` of the base).
- ``adamerging-naive``: every step deep-copies the base module and swaps in the merged tensors
  (the "copy and merge" loop AdaMerging implementations commonly use).
- ``wemoe``: a step of fusion-adaptive's WEMoE model (routers on every linear layer).
- ``wemoe-naive``: the same routing computed by deep-copying the base and merging per sample.

    python bench/bench_adaptive_step.py
    python bench/bench_adaptive_step.py --width 512 --steps 5
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = ("adamerging", "adamerging-naive", "wemoe", "wemoe-naive")


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    """Peak RSS since the last :func:`reset_peak` (VmHWM), else since the start."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ``clear_refs`` 5), so warm-up steps do not count."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def build(args):
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers = []
    for _ in range(args.layers):
        layers += [nn.Linear(args.width, args.width), nn.ReLU()]
    base = nn.Sequential(*layers[:-1])
    base.requires_grad_(False)
    params = {k: v.detach() for k, v in base.named_parameters()}
    g = torch.Generator().manual_seed(1)
    vectors = [{k: torch.randn(v.shape, generator=g) * 0.01 for k, v in params.items()} for _ in range(args.models)]
    head = nn.Linear(args.width, 10).requires_grad_(False)
    x = torch.randn(args.batch, args.width, generator=g)
    return base, params, vectors, head, x


def child(args) -> dict:
    import copy

    import torch

    torch.set_num_threads(args.threads)
    from fusion_adaptive.adamerging import merge_parameters
    from fusion_adaptive.common import entropy

    from fusion_core.adapters import functional_forward

    base, params, vectors, head, x = build(args)
    n = len(vectors)
    setup_rss = rss_mb()
    times = []

    if args.variant.startswith("adamerging"):
        lam = torch.full((n, len(params)), 0.3, requires_grad=True)
        opt = torch.optim.Adam([lam], lr=1e-3)

        def step():
            merged = merge_parameters(params, vectors, lam)
            if args.variant == "adamerging":
                out = functional_forward(base, merged, x)
            else:  # deep-copy the module, replace each parameter by its merged tensor, run it
                model = copy.deepcopy(base)
                for name, value in merged.items():
                    owner, _, leaf = name.rpartition(".")
                    module = model.get_submodule(owner)
                    delattr(module, leaf)
                    setattr(module, leaf, value)
                out = model(x)
            loss = entropy(head(out))
            opt.zero_grad()
            loss.backward()
            opt.step()

    else:
        from fusion_adaptive.layers import Router, WeightEnsemblingMoE

        model = copy.deepcopy(base)
        routers = []
        for name, module in list(model.named_modules()):
            if isinstance(module, torch.nn.Linear):
                experts = {p: torch.stack([v[f"{name}.{p}"] for v in vectors]) for p in ("weight", "bias")}
                router = Router(args.width, n, args.width, 0.3)
                model._modules[name] = WeightEnsemblingMoE(module, experts, router, linear=True)
                routers += list(router.parameters())
        opt = torch.optim.Adam(routers, lr=1e-3)

        def step():
            if args.variant == "wemoe":
                out = model(x)
            else:  # per sample: route, deep-copy the base layer by layer, merge, run
                rows = []
                for b in range(x.shape[0]):
                    h = x[b : b + 1]
                    for layer in model.children():
                        if isinstance(layer, WeightEnsemblingMoE):
                            w = layer.routing_weights(h)[0]
                            copy_ = copy.deepcopy(layer.base)
                            for p in ("weight", "bias"):
                                merged = getattr(layer.base, p) + torch.einsum("n,n...->...", w, layer.expert(p))
                                delattr(copy_, p)
                                setattr(copy_, p, merged)
                            h = copy_(h)
                        else:
                            h = layer(h)
                    rows.append(h)
                out = torch.cat(rows)
            loss = entropy(head(out))
            opt.zero_grad()
            loss.backward()
            opt.step()

    for _ in range(args.warmup):
        step()
    reset = reset_peak()
    steady_rss = rss_mb() if reset else setup_rss
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    n_params = sum(v.numel() for v in params.values())
    return {"variant": args.variant, "step_ms": 1000 * statistics.median(times), "peak_extra_mb": peak_mb() - steady_rss,
            "setup_mb": setup_rss, "params_m": n_params / 1e6}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.variant:
        print(json.dumps(child(args)))
        return 0
    results = {}
    common = [f"--{k}={getattr(args, k)}" for k in ("width", "layers", "models", "batch", "steps", "warmup", "threads")]
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, __file__, *common, f"--variant={variant}"], capture_output=True, text=True, check=True)
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    first = results["adamerging"]
    print(f"model: {args.layers} x Linear({args.width}, {args.width}) = {first['params_m']:.2f} M params, N={args.models} "
          f"task vectors, batch {args.batch}, {args.steps} steps (median), {args.threads} thread(s); "
          f"setup RSS {first['setup_mb']:.0f} MiB")
    print(f"{'variant':<18}{'step ms':>10}{'peak extra MiB':>16}")
    for variant, r in results.items():
        print(f"{variant:<18}{r['step_ms']:>10.1f}{r['peak_extra_mb']:>16.1f}")
    for name in ("adamerging", "wemoe"):
        ours, naive = results[name], results[f"{name}-naive"]
        print(f"{name}: naive / ours  time x{naive['step_ms'] / ours['step_ms']:.2f}, "
              f"peak extra memory x{naive['peak_extra_mb'] / max(ours['peak_extra_mb'], 1e-9):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
