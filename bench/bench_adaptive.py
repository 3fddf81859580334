"""fusion-adaptive's data-driven methods side by side with FusionBench 0.2.33's own implementations.

Pools, built from configs (no downloads), the same inputs on both sides:

- ``clip``: CLIP vision towers of ViT-B/32's shape (width 768, MLP 3072, 12 heads, 224² images,
  32² patches) with ``--clip-layers`` blocks; ``--tasks`` noisy fine-tunes, random text heads,
  ``--batches`` batches of ``--batch`` random images per task.
- ``bert``: ``BertForSequenceClassification`` of all-MiniLM-L6-v2's shape (6 layers, width 384,
  MLP 1536, vocab 30522: 22.7 M parameters), ``--bert-models`` noisy fine-tunes, random token batches.

Rows (each side in its own child process; time = the method's run, pools built before the clock
starts; peak = the child's peak RSS, VmHWM):

- ``fisher`` (clip, bert): Fisher merging on ``--fisher-examples`` examples per model.  fusion
  runs its default (FusionBench's label-free batch estimator) and, as ``fisher[previous]``, its
  earlier default (per-example squared gradients through ``torch.func.vmap``, the implementation
  that was measured at 729 s in issue 15); FusionBench runs ``FisherMergingForCLIPVisionModel``
  (clip) or its ``fisher_merging`` function with a minimal trainer (bert).
- ``regmean`` (clip): Gram collection + solve.
- ``adamerging`` / ``wemoe`` / ``e_wemoe`` (clip): ``--steps`` test-time adaptation steps (steps/s in the note).
- ``smile`` (clip): the upscaling.
- ``ensemble`` (clip): evaluating a simple ensemble on every batch of every task (images/s).

The ``floor`` side is what no implementation of a row can avoid, as a bare torch loop on the same models and
batches: the forward passes (regmean, ensemble: every member on every batch) or forward and backward passes
(fisher: each model's batches, gradients of every parameter; adamerging: steps x tasks, every parameter;
wemoe / e_wemoe: steps x tasks, gradients reaching the MLPs only) of the row, nothing else (no merge, no Gram,
no solve, no optimiser).  Its ratio is the best a row could reach.

Sides alternate (fusion first on odd rounds) over ``--repeat`` rounds; the median time is shown.  Time is the
child's CPU time (``time.process_time``, every thread of the process) over the timed part, and the ratio is taken
on it: on a shared machine wall time swings with the other processes' load (2× between runs was seen), CPU time
much less; with ``--threads 1`` and an idle machine the two agree.  The wall time is printed next to it.

    python bench/bench_adaptive.py                       # needs fusion-bench==0.2.33 next to fusion for its column
    python bench/bench_adaptive.py --only fisher --pools bert
    python bench/bench_adaptive.py --device cuda          # every data-driven method on the GPU (both sides)
    python bench/bench_adaptive.py --only smile --sides fusion floor --profile prof/   # cProfile summaries per child
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

ROOT = Path(__file__).resolve().parent.parent
ROWS = {  # (pool, method): the sides that run it
    ("clip", "fisher"): ("fusion", "fusion[previous]", "fusionbench", "floor"),
    ("bert", "fisher"): ("fusion", "fusion[previous]", "fusionbench", "floor"),
    ("clip", "regmean"): ("fusion", "fusionbench", "floor"),
    ("clip", "adamerging"): ("fusion", "fusionbench", "floor"),
    ("clip", "wemoe"): ("fusion", "fusionbench", "floor"),
    ("clip", "e_wemoe"): ("fusion", "fusionbench", "floor"),
    ("clip", "smile"): ("fusion", "fusionbench"),
    ("clip", "ensemble"): ("fusion", "fusionbench", "floor"),
}


# --------------------------------------------------------------------------- the child: one side of one row


def peak_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def clip_world(args):
    sys.path.insert(0, str(ROOT / "tests" / "parity"))
    from fusionbench_kit import World

    tasks = tuple(f"task{i}" for i in range(args.tasks))
    return World(hidden=768, intermediate=3072, heads=12, layers=args.clip_layers, image=224, patch=32, projection=512,
                 tasks=tasks, batch=args.batch, n_batches=args.batches)


class BertWorld:
    """A MiniLM-shaped BERT classifier base, noisy fine-tunes and token batches (dicts of input_ids, attention_mask)."""

    def __init__(self, args) -> None:
        import copy

        import torch
        from transformers import BertConfig, BertForSequenceClassification

        torch.manual_seed(0)
        config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                            max_position_embeddings=512, num_labels=2)
        self.base = BertForSequenceClassification(config).eval()
        g = torch.Generator().manual_seed(1)
        self.models = {}
        for i in range(args.bert_models):
            model = copy.deepcopy(self.base)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.01)
            self.models[f"glue{i}"] = model
        n_batches = -(-args.fisher_examples // args.batch)
        self.batches = {n: [{"input_ids": torch.randint(1000, 30000, (args.batch, args.seq_len), generator=g),
                             "attention_mask": torch.ones(args.batch, args.seq_len, dtype=torch.long)} for _ in range(n_batches)]
                        for n in self.models}
        self.labels = {n: [torch.randint(0, 2, (args.batch,), generator=g) for _ in range(n_batches)] for n in self.models}

    def pool(self):
        sys.path.insert(0, str(ROOT / "tests" / "parity"))
        from fusionbench_kit import Pool

        data = {(n, "train"): list(zip(self.batches[n], self.labels[n], strict=True)) for n in self.models}
        return Pool(self.base, self.models, data)


def run_fusion(pool_name: str, method: str, side: str, args):
    """Build, then time fusion's method; returns (seconds, note)."""
    import torch

    from fusion_core.run_context import RunContext

    world = clip_world(args) if pool_name == "clip" else BertWorld(args)
    pool = world.pool()
    ctx = world.ctx() if pool_name == "clip" else RunContext(seed=0, show_progress=False)
    ctx.device = args.device
    start = now()
    if method == "fisher":
        from fusion_adaptive.fisher import FisherMerging

        fields = {"num_examples": args.fisher_examples}
        if side == "fusion[previous]":
            fields.update(estimator="empirical", normalize="divide")
        FisherMerging(FisherMerging.Config(**fields)).run(pool, ctx)
    elif method == "regmean":
        from fusion_adaptive.regmean import RegMean

        RegMean(RegMean.Config(num_batches=args.batches)).run(pool, ctx)
    elif method == "adamerging":
        from fusion_adaptive.adamerging import AdaMerging

        AdaMerging(AdaMerging.Config(steps=args.steps)).run(pool, ctx)
    elif method == "wemoe":
        from fusion_adaptive.wemoe import WEMoE

        WEMoE(WEMoE.Config(steps=args.steps)).run(pool, ctx)
    elif method == "e_wemoe":
        from fusion_adaptive.ewemoe import EWEMoE

        EWEMoE(EWEMoE.Config(steps=args.steps)).run(pool, ctx)
    elif method == "smile":
        from fusion_adaptive.smile import Smile

        Smile(Smile.Config()).run(pool, ctx)
    elif method == "ensemble":
        from fusion_adaptive.ensemble import SimpleEnsemble

        from fusion_core.adapters import logits

        ensemble = SimpleEnsemble().run(pool, ctx)
        start = now()  # throughput of evaluation only
        with torch.inference_mode():
            for task in world.tasks:
                head = world.head(task)
                for x in world.images[task]:
                    logits(ensemble, x.to(args.device), head, pool)
    return finish(world, method, start, args)


def now() -> tuple[float, float]:
    """(wall clock, this process's CPU time): both are measured; ratios use the CPU time (see the module's doc)."""
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = now()
    return wall - start[0], cpu - start[1]


def run_floor(pool_name: str, method: str, args):
    """The bare forward (and backward) passes of the row (see the module's doc); returns (wall, cpu, note)."""
    import torch

    world = clip_world(args) if pool_name == "clip" else BertWorld(args)
    per_model = -(-args.fisher_examples // args.batch)
    grads: str | None = None
    if method == "fisher" and pool_name == "bert":
        plan = [(m, x, None) for n, m in world.models.items() for x in world.batches[n][:per_model]]
        grads = "all"
    elif method == "fisher":
        plan = [(world.models[t], x, world.head(t)) for t in world.tasks for x in world.images[t][:per_model]]
        grads = "all"
    elif method in ("adamerging", "wemoe", "e_wemoe"):
        plan = [(world.base, world.images[t][s % len(world.images[t])], world.head(t)) for s in range(args.steps) for t in world.tasks]
        grads = "all" if method == "adamerging" else "mlp"
    elif method == "regmean":
        plan = [(world.models[t], x, None) for t in world.tasks for x in world.images[t]]
    elif method == "ensemble":
        plan = [(m, x, None) for t in world.tasks for x in world.images[t] for m in world.models.values()]
    else:
        raise SystemExit(f"no floor for {method}")
    for model in {id(m): m for m, _, _ in plan}.values():
        model.to(args.device)
        for name, p in model.named_parameters():
            p.requires_grad_(grads == "all" or (grads == "mlp" and ".mlp." in name))

    def call(model, x):
        x = {k: v.to(args.device) for k, v in x.items()} if isinstance(x, dict) else x.to(args.device)
        return model(**x).logits if isinstance(x, dict) else model(pixel_values=x)

    start = now()
    for model, x, head in plan:
        if grads is None:
            with torch.inference_mode():
                call(model, x)
            continue
        out = call(model, x)
        (head(out) if head is not None else out).log_softmax(dim=-1).sum().backward()
    wall, cpu = since(start)
    return wall, cpu, f"{len(plan)} {'forward' if grads is None else 'forward+backward'} passes"


def finish(world, method: str, start: tuple[float, float], args) -> tuple[float, float, str]:
    """(wall and CPU seconds since ``start``, the row's note: images/s of an ensemble, steps/s of an adaptation, on CPU time)."""
    wall, cpu = since(start)
    if method == "ensemble":
        return wall, cpu, f"{sum(len(x) for t in world.tasks for x in world.images[t]) / cpu:.1f} images/s"
    if method in ("adamerging", "wemoe", "e_wemoe"):
        return wall, cpu, f"{args.steps / cpu:.3f} steps/s (setup included)"
    return wall, cpu, ""


class Trainer:
    """The three things FusionBench's ``fisher_merging`` asks of a Hugging Face Trainer."""

    def __init__(self, batches, batch_size: int) -> None:
        self._batches, self._train_batch_size = batches, batch_size

    def get_train_dataloader(self):
        return list(self._batches)

    def _prepare_inputs(self, inputs):
        return inputs


def run_fusionbench(pool_name: str, method: str, args):
    """Build, then time FusionBench's implementation; returns (seconds, note)."""
    import torch

    sys.path.insert(0, str(ROOT / "tests" / "parity"))
    import fusionbench_kit as kit

    if pool_name == "bert":
        from fusion_bench.method.fisher_merging.fisher_merging import fisher_merging

        world = BertWorld(args)
        models = [world.models[n] for n in world.models]
        trainers = [Trainer(world.batches[n], args.batch) for n in world.models]
        start = now()
        fisher_merging(models, trainers, exclude_param_names_regex=[], nums_fisher_examples=[args.fisher_examples] * len(models))
        return (*since(start), "")
    world = clip_world(args)
    if method == "fisher":
        algorithm, fb_pool = kit.fb_fisher(world, args.fisher_examples), world.fb_pool()
        start = now()
        algorithm.run(fb_pool)
    elif method == "regmean":
        from fusion_bench.method import RegMeanAlgorithmForCLIP

        algorithm, fb_pool = kit.fb_regmean(world, RegMeanAlgorithmForCLIP), world.fb_pool()
        start = now()
        algorithm.run(fb_pool)
    elif method == "adamerging":
        algorithm, fb_pool = kit.fb_adamerging(world, args.steps, "layer"), world.fb_pool()
        start = now()
        algorithm.run(fb_pool)
    elif method == "wemoe":
        from fusion_bench.method.we_moe import clip_we_moe

        clip_we_moe.task_arithmetic_merge = kit.task_arithmetic_merge  # FusionBench 0.2.33's own one fails (see the parity suite)
        algorithm = kit.fb_wemoe(world, args.steps)
        start = now()
        algorithm.test_time_adaptation(algorithm.construct_moe_model())
    elif method == "e_wemoe":
        from fusion_bench.method.sparse_we_moe import sparse_clip_we_moe

        sparse_clip_we_moe.task_arithmetic_merge = kit.task_arithmetic_merge  # as for WEMoE
        algorithm = kit.fb_sparse_wemoe(world, args.steps, 0.9)
        start = now()
        algorithm.test_time_adaptation(algorithm.construct_moe_model_sharedgate())
    elif method == "smile":
        algorithm, fb_pool = kit.fb_smile(128), world.fb_pool()
        start = now()
        algorithm.run(fb_pool)
    elif method == "ensemble":
        classifier = kit.fb_ensemble_classifier(world, "simple_ensemble", [])
        start = now()
        with torch.no_grad():
            for task in world.tasks:
                classifier.zeroshot_weights = world.text[task]
                for x in world.images[task]:
                    classifier(x)
    return finish(world, method, start, args)


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    pool_name, method, side = args.child
    if side == "fusionbench":
        run = lambda: run_fusionbench(pool_name, method, args)  # noqa: E731
    elif side == "floor":
        run = lambda: run_floor(pool_name, method, args)  # noqa: E731
    else:
        run = lambda: run_fusion(pool_name, method, side, args)  # noqa: E731
    if args.profile:
        wall, cpu, note = profiled(run, Path(args.profile) / f"{pool_name}-{method}-{side}.txt")
    else:
        wall, cpu, note = run()
    print(json.dumps({"wall": wall, "seconds": cpu, "peak_mb": peak_mb(), "note": note}))


def profiled(run, path: Path):
    """``run()`` under cProfile; the functions with the most cumulative time go to ``path``."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    result = profiler.runcall(run)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(60)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.getvalue())
    return result


# --------------------------------------------------------------------------- the parent: interleaved rows, the table


def have_fusionbench() -> bool:
    import importlib.util

    return importlib.util.find_spec("fusion_bench") is not None


def measure(row: tuple[str, str], side: str, args, forwarded: list[str]) -> dict:
    command = [sys.executable, __file__, "--child", *row, side, *forwarded]
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": last[:120]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--pools", nargs="+", default=["clip", "bert"], choices=["clip", "bert"])
    parser.add_argument("--only", nargs="+", default=None, help="methods to run (default all)")
    parser.add_argument("--tasks", type=int, default=4, help="CLIP fine-tunes (one per task)")
    parser.add_argument("--clip-layers", type=int, default=2, help="blocks of the ViT-B/32-shaped tower")
    parser.add_argument("--bert-models", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=2, help="batches per CLIP task")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--fisher-examples", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="test-time adaptation steps (adamerging, wemoe, e_wemoe)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="fusion's device (cpu, cuda); FusionBench's sides run where its code puts them")
    parser.add_argument("--sides", nargs="+", default=None, choices=["fusion", "fusion[previous]", "fusionbench", "floor"],
                        help="the sides to run (default all)")
    parser.add_argument("--no-previous", action="store_true", help="skip fisher[previous] (fusion's earlier Fisher estimator)")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--profile", default=None, help="folder: each child writes its cProfile summary there (cumulative time, top 60)")
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return
    forwarded = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                 if k in ("tasks", "clip_layers", "bert_models", "batch", "batches", "seq_len", "fisher_examples", "steps", "threads", "device",
                          "profile") and v is not None]
    peer = have_fusionbench()
    if not peer:
        print("fusion_bench is not importable here: its column is skipped (install fusion-bench==0.2.33 next to fusion)")
    rows = [(p, m) for (p, m) in ROWS if p in args.pools and (args.only is None or m in args.only)]
    print(f"# {' '.join(sys.argv)}\n# threads={args.threads} device={args.device} tasks={args.tasks} clip_layers={args.clip_layers} "
          f"bert_models={args.bert_models} batch={args.batch} fisher_examples={args.fisher_examples} steps={args.steps}", flush=True)
    header = f"{'pool':<5} {'method':<11} {'side':<17} {'CPU s':>9} {'wall s':>9} {'peak MB':>9} {'ratio':>7}  note"
    print(header)
    print("-" * len(header), flush=True)
    for row in rows:
        sides = [s for s in ROWS[row] if (s != "fusionbench" or peer) and not (s == "fusion[previous]" and args.no_previous)
                 and (args.sides is None or s in args.sides)]
        results: dict[str, list[dict]] = {s: [] for s in sides}
        for r in range(args.repeat):
            for side in (sides if r % 2 == 0 else list(reversed(sides))):
                results[side].append(measure(row, side, args, forwarded))
        reference = _median(results.get("fusionbench", []))
        for side in sides:
            runs = results[side]
            errors = [x["error"] for x in runs if "error" in x]
            if errors:
                print(f"{row[0]:<5} {row[1]:<11} {side:<17} {'failed':>9} {'':>9} {'':>9} {'':>7}  {errors[0]}", flush=True)
                continue
            seconds, wall = _median(runs), _median(runs, "wall")
            peak = max(x["peak_mb"] for x in runs)
            ratio = f"{seconds / reference:.3f}" if reference and side != "fusionbench" else ""
            print(f"{row[0]:<5} {row[1]:<11} {side:<17} {seconds:>9.2f} {wall:>9.2f} {peak:>9.0f} {ratio:>7}  {runs[-1]['note']}", flush=True)


def _median(runs: list[dict], key: str = "seconds") -> float | None:
    values = [x[key] for x in runs if key in x]
    return statistics.median(values) if values else None


if __name__ == "__main__":
    main()
