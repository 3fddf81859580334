"""How long the data-driven methods take on the mini benchmark: per-step cost × default steps (no evaluation).

    python plugins/fusion-minibench/scripts/time_adaptive.py --steps 6 --threads 1

Each test-time-adaptation method (AdaMerging task/layer-wise, WEMoE, E-WEMoE, and the Concrete
methods when installed) runs ``--steps`` steps on the built ``mini`` pools (build it first:
``fuse run``); the median step time (``seconds_per_step`` of the run's notes, the first step left
out) times the method's default step count is its default duration, which ``fuse show`` quotes.
Methods without steps (Fisher, RegMean, RegMean++) are timed whole.  Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import time

TTA = [("adamerging", {"granularity": "task"}), ("adamerging", {"granularity": "layer"}), ("wemoe", {}), ("e_wemoe", {}),
       ("concrete_task_arithmetic", {}), ("concrete_adamerging", {})]
WHOLE = [("fisher_merging", {}), ("regmean", {}), ("regmean_plusplus", {})]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--benchmark", default="mini")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="pool fields of the build to time on (e.g. modelpool.seed=1 taskpool.seed=1)")
    parser.add_argument("--only", nargs="*", help="time only these methods")
    args = parser.parse_args(argv)

    import attrs
    import torch

    from fusion_core import RunContext, build_registry, get_plugin_manager, raw_run_config, resolve_run_config
    from fusion_core.program import setup  # the run program's component setup (a measurement script, not a plugin)

    torch.set_num_threads(args.threads)
    registry = build_registry(get_plugin_manager())
    print("| method | fields | step (s) | default steps | default duration (min) |\n|---|---|---:|---:|---:|")
    for name, fields in TTA + WHOLE:
        if name not in registry.entries["method"] or (args.only and name not in args.only):
            continue
        cls = registry.get("method", name).cls
        stepped = "steps" in attrs.fields_dict(cls.Config)
        spec = {"name": name, **fields, **({"steps": args.steps} if stepped else {})}
        raw = raw_run_config((), args.overrides)
        config = resolve_run_config({**raw, "benchmark": args.benchmark, "method": spec, "threads": args.threads}, registry)
        parts = setup(config)
        ctx = RunContext(seed=0, taskpool=parts.taskpool, show_progress=False)
        parts.pool.materialize(ctx)
        parts.taskpool.materialize(ctx)
        started = time.perf_counter()
        parts.method.run(parts.pool, ctx)
        total = time.perf_counter() - started
        shown = ", ".join(f"{k}={v}" for k, v in fields.items()) or "–"
        if stepped:
            per_step = ctx.extras[name]["seconds_per_step"]
            default = attrs.fields_dict(cls.Config)["steps"].default
            print(f"| {name} | {shown} | {per_step:.3f} | {default} | {per_step * default / 60:.1f} |", flush=True)
        else:
            print(f"| {name} | {shown} | – | – | {total / 60:.2f} (whole run, {total:.1f} s) |", flush=True)


if __name__ == "__main__":
    main()
