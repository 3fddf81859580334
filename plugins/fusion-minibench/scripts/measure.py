"""Measure the mini benchmark end to end: a cold ``fuse run`` (build + merge + evaluate), a cached
``fuse run`` (wall time and peak RSS of each), and pretrained / individual / merged accuracies over
several recipe seeds, with the zero-shot → individual gap of every task.

    python plugins/fusion-minibench/scripts/measure.py --seeds 0 1 2 --out /tmp/minibench-measure

Each seed is its own recipe (splits, training order, dropout), built once into ``--out/cache``.
The cold run uses an empty cache folder of its own.  The load average before and after each
timed run is printed with it (the figures mean something on an idle machine only).  Prints
Markdown and writes it to ``--out/measure.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = {
    "simple_average": ["method=simple_average"],
    "task_arithmetic (λ=0.3)": ["method=task_arithmetic", "method.scaling_factor=0.3"],
    "ties (default: k=0.2, λ=0.3)": ["method=ties"],
}


def timed_fuse_run(cache: Path, out: Path, extra: list[str]) -> tuple[float, float, dict]:
    """Wall seconds, peak RSS (GB) and report of ``fuse run`` in a child process."""
    env = dict(os.environ, FUSE_CACHE_DIR=str(cache))
    start = time.perf_counter()
    child = subprocess.Popen(["fuse", "run", f"output_dir={out}", *extra], env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"fuse run failed (exit {os.waitstatus_to_exitcode(status)})")
    return wall, usage.ru_maxrss / 1e6, json.loads((out / "report.json").read_text())


def load() -> str:
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def averages(report: dict) -> dict[str, float]:
    results = report["results"]
    return {label: mean(v["accuracy"] for v in per_task.values()) for label, per_task in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("/tmp/minibench-measure"))
    parser.add_argument("--skip-cold", action="store_true", help="skip the cold/cached fuse run timings")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    lines = []
    cache = args.out / "cache"
    if not args.skip_cold:
        stamp = int(time.time())
        cold_cache = cache = args.out / f"cold-cache-{stamp}"  # the seed runs reuse its build
        before = load()
        t_cold, rss_cold, report = timed_fuse_run(cold_cache, args.out / f"run-cold-{stamp}", [])
        between = load()
        t_warm, rss_warm, report2 = timed_fuse_run(cold_cache, args.out / f"run-cached-{stamp}", [])
        lines.append(f"cold `fuse run` (build + TIES + evaluate): {t_cold:.1f} s, peak RSS {rss_cold:.2f} GB "
                     f"(load average 1/5/15 min before: {before}, after: {between})")
        lines.append(f"cached `fuse run`: {t_warm:.1f} s, peak RSS {rss_warm:.2f} GB (load average after: {load()})")
        lines.append(f"cold-run averages: {json.dumps({k: round(v, 4) for k, v in averages(report).items()})}")
        lines.append(f"cached run identical results: {report['results'] == report2['results']}")
        meta = next((cold_cache / "minibench").glob("*/meta.json"))
        built = json.loads(meta.read_text())
        lines.append(f"build timings (s, {built['threads']} thread): {built['timings_s']}")
        lines.append(f"run phases (s): {report.get('timings')}")

    import fusion_core

    os.environ["FUSE_CACHE_DIR"] = str(cache)
    table: dict[str, dict[int, float]] = {}
    per_task: dict[str, dict[int, dict[str, float]]] = {}
    for seed in args.seeds:
        recipe = [
            "modelpool=minibench",
            f"modelpool.seed={seed}",
            "taskpool=minibench",
            f"taskpool.seed={seed}",
            "progress=false",
        ]
        for label, overrides in METHODS.items():
            report = fusion_core.run(
                None, overrides=[*recipe, *overrides, f"evaluate_inputs={label == 'simple_average'}"], write=False
            )
            for key, value in averages(report).items():
                name = label if key == "merged" else key
                table.setdefault(name, {})[seed] = value
                per_task.setdefault(name, {})[seed] = {t: v["accuracy"] for t, v in report["results"][key].items()}
    order = ["pretrained", "individual", *METHODS]
    tasks = list(per_task["pretrained"][args.seeds[0]])
    lines.append("")
    lines.append("| model | " + " | ".join(tasks) + " | avg (seed " + ", ".join(map(str, args.seeds)) + ") | mean ± sd |")
    lines.append("|---" * (len(tasks) + 3) + "|")
    for name in order:
        accs = [table[name][s] for s in args.seeds]
        cells = [f"{100 * mean(per_task[name][s][t] for s in args.seeds):.1f}" for t in tasks]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append(
            f"| {name} | "
            + " | ".join(cells)
            + " | "
            + ", ".join(f"{100 * a:.1f}" for a in accs)
            + f" | {100 * mean(accs):.1f} ± {100 * sd:.1f} |"
        )
    gaps = {s: table["individual"][s] - table["pretrained"][s] for s in args.seeds}
    sa = {s: table["individual"][s] - table["simple_average"][s] for s in args.seeds}
    lines.append("")
    task_gaps = {t: 100 * mean(per_task["individual"][s][t] - per_task["pretrained"][s][t] for s in args.seeds) for t in tasks}
    lines.append("individual − pretrained per task (mean over seeds): "
                 + ", ".join(f"{t} {g:.1f}" for t, g in task_gaps.items()) + f"; smallest {min(task_gaps.values()):.1f}")
    lines.append("individual − pretrained: " + ", ".join(f"{100 * g:.1f}" for g in gaps.values()) + " points")
    lines.append("individual − simple average: " + ", ".join(f"{100 * g:.1f}" for g in sa.values()) + " points")
    text = "\n".join(lines)
    print(text)
    (args.out / "measure.md").write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
