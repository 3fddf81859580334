"""Tiny CLIP worlds and FusionBench 0.2.33 drivers shared by the parity suite and ``bench/bench_adaptive.py``.

A :class:`World` is a base CLIP, N noisy vision fine-tunes, per-task text heads and image batches,
seen through fusion's pools (:meth:`World.pool`, :meth:`World.ctx`) and through FusionBench's
(:meth:`World.fb_pool`, :meth:`World.fb_heads`, :meth:`World.fb_test_iterators`): FusionBench's
algorithm classes run with only their I/O hooks replaced.  Needs torch and transformers (and
FusionBench for the ``fb_*`` methods).
"""

from __future__ import annotations

import copy

import torch

from fusion_core.components import ModelPool, TaskPool
from fusion_core.run_context import RunContext

TASKS = ("alpha", "beta", "gamma")
BATCH, N_BATCHES = 8, 3


# --------------------------------------------------------------------------- tiny CLIP world


class World:
    """A base CLIP, N noisy vision fine-tunes (one per task), per-task text heads and image batches.

    The defaults are a 32-wide, 2-layer tower; ``World(hidden=768, intermediate=3072, heads=12,
    image=224, patch=32, projection=512)`` has ViT-B/32's shape with ``layers`` blocks.
    """

    def __init__(self, *, hidden: int = 32, intermediate: int = 48, heads: int = 4, layers: int = 2, image: int = 32, patch: int = 8,
                 projection: int = 16, tasks: tuple[str, ...] = TASKS, batch: int = BATCH, n_batches: int = N_BATCHES) -> None:
        from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

        torch.manual_seed(0)
        self.tasks, self.batch, self.n_batches = tuple(tasks), batch, n_batches
        config = CLIPConfig(
            text_config=dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_hidden_layers=1, vocab_size=50,
                             max_position_embeddings=16),
            vision_config=dict(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads, num_hidden_layers=layers,
                               image_size=image, patch_size=patch),
            projection_dim=projection,
        )
        self.clip = CLIPModel(config).eval()
        self.base = copy.deepcopy(self.clip.vision_model).eval()
        assert isinstance(self.base, CLIPVisionModel)
        g = torch.Generator().manual_seed(1)
        self.models = {}
        for name in self.tasks:
            model = copy.deepcopy(self.base)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
            self.models[name] = model
        classes = {t: 3 + i for i, t in enumerate(self.tasks)}
        self.text = {t: torch.nn.functional.normalize(torch.randn(classes[t], projection, generator=g), dim=-1) for t in self.tasks}
        self.logit_scale_exp = self.clip.logit_scale.detach().exp()
        self.images = {t: [torch.randn(batch, 3, image, image, generator=g) for _ in range(n_batches)] for t in self.tasks}
        self.labels = {t: [torch.randint(0, classes[t], (batch,), generator=g) for _ in range(n_batches)] for t in self.tasks}

    def head(self, task: str):
        projection, text = self.clip.visual_projection.weight.detach(), self.text[task] * self.logit_scale_exp

        def head(output):
            feats = torch.nn.functional.linear(output["pooler_output"], projection)
            return (feats / feats.norm(dim=-1, keepdim=True)) @ text.T

        return head

    # fusion's side
    def pool(self, with_data: bool = True) -> "Pool":
        data = {(n, "train"): list(zip(self.images[n], self.labels[n], strict=True)) for n in self.tasks} if with_data else {}
        return Pool(self.base, self.models, data)

    def ctx(self, seed: int = 0) -> RunContext:
        return RunContext(seed=seed, taskpool=Tasks(self), show_progress=False)

    # FusionBench's side
    def fb_pool(self):
        from fusion_bench.modelpool import BaseModelPool

        pool = BaseModelPool({"_pretrained_": V4Layout(self.base), **{n: V4Layout(m) for n, m in self.models.items()}})
        datasets = {n: [(x, int(y)) for xs, ys in zip(self.images[n], self.labels[n], strict=True) for x, y in zip(xs, ys, strict=True)]
                    for n in self.tasks}
        pool.load_train_dataset = lambda name, *a, **k: datasets[name]
        pool.load_model = _copying(pool.load_model)
        return pool

    def fb_heads(self, algorithm) -> None:
        """Set FusionBench's zero-shot head attributes directly (what setup_zero_shot_classification_head computes)."""
        algorithm.zeroshot_weights = dict(self.text)
        algorithm.visual_projection = copy.deepcopy(self.clip.visual_projection).requires_grad_(False)
        algorithm.logit_scale_exp = self.logit_scale_exp
        algorithm._clip_processor = lambda image: image  # the datasets already hold pixel tensors
        algorithm.setup_zero_shot_classification_head = lambda *a, **k: None

    def fb_test_iterators(self):
        """Per task an endless iterator over the same (images, labels) batches fusion's task pool gives."""

        def endless(task):
            while True:
                yield from zip(self.images[task], self.labels[task], strict=True)

        iterators = {t: endless(t) for t in self.tasks}
        return lambda task, *a, **k: iterators[task]


class V4Layout(torch.nn.Module):
    """A CLIP vision tower in transformers 4's layout (``model.vision_model.encoder...``).

    FusionBench 0.2.33's CLIP code reaches the blocks through ``.vision_model`` (WEMoE, RegMean++), which
    transformers 5 removed from ``CLIPVisionModel``: the peer's classes get the towers in the old layout.
    """

    def __init__(self, model) -> None:
        super().__init__()
        self.vision_model = copy.deepcopy(model)

    def forward(self, *args, **kwargs):
        return self.vision_model(*args, **kwargs)


def _copying(load):
    return lambda name, *a, **k: copy.deepcopy(load(name, *a, **k))


class Pool(ModelPool):
    name = "parity_memory"
    summary = "in-memory parity pool"

    class Config:
        pass

    def __init__(self, base, models, data) -> None:
        super().__init__()
        self._base, self._models, self._data = base, dict(models), dict(data)

    @property
    def model_names(self):
        return list(self._models)

    @property
    def has_base(self):
        return True

    def load_model(self, name=None):
        return copy.deepcopy(self._base if name is None else self._models[name])

    def data(self, name, split):
        return self._data.get((name, split))


class Tasks(TaskPool):
    name = "parity_tasks"
    summary = "in-memory parity task pool"

    class Config:
        pass

    def __init__(self, world: World) -> None:
        super().__init__()
        self.world = world

    @property
    def task_names(self):
        return list(self.world.tasks)

    def classifier(self, task):
        return self.world.head(task)

    def unlabelled_batches(self, task):
        return list(self.world.images[task])

    def evaluate(self, model, *, tasks=None, ctx=None):
        return {}


def max_diff(a: dict, b: dict) -> float:
    """Largest |a − b| over the float tensors both have (FusionBench's ``vision_model.`` prefix dropped)."""
    a = {k.removeprefix("vision_model."): v for k, v in a.items()}
    keys = [k for k in a if k in b and torch.is_tensor(a[k]) and a[k].is_floating_point()]
    assert keys
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in keys)


def fabric():
    import lightning as L

    return L.Fabric(accelerator="cpu", devices=1)




# --------------------------------------------------------------------------- FusionBench's algorithms, I/O hooks replaced


def fb_ensemble_classifier(world: World, method: str, weights: list[float]):
    """FusionBench's ensemble of ``world``'s fine-tunes inside its ``HFCLIPClassifier`` (set ``zeroshot_weights`` per task)."""
    from fusion_bench.method import MaxModelPredictorAlgorithm, SimpleEnsembleAlgorithm, WeightedEnsembleAlgorithm
    from fusion_bench.modelpool import BaseModelPool
    from fusion_bench.models.hf_clip import HFCLIPClassifier

    members = [copy.deepcopy(world.models[n]) for n in world.tasks]
    if method == "simple_ensemble":  # its run() takes a list in its signature but needs a pool
        model = SimpleEnsembleAlgorithm().run(BaseModelPool(members))
    elif method == "weighted_ensemble":
        model = WeightedEnsembleAlgorithm(weights=weights).run(members)
    else:
        model = MaxModelPredictorAlgorithm().run(members)
    classifier = HFCLIPClassifier(copy.deepcopy(world.clip), processor=None)
    classifier.clip_model.vision_model = model
    return classifier


def fb_fisher(world: World, n_examples: int):
    from fusion_bench.method import FisherMergingForCLIPVisionModel

    algorithm = FisherMergingForCLIPVisionModel(exclude_param_names_regex=[], normalize_fisher_weight=True, minimal_fisher_weight=1e-6,
                                                num_fisher_examples=n_examples,
                                                dataloader_kwargs={"batch_size": world.batch, "num_workers": 0})
    world.fb_heads(algorithm)
    algorithm.on_fisher_merging_start = lambda: None
    algorithm._fabric_instance = fabric()
    return algorithm


def _adaptation_config(name: str, steps: int, batch: int, **fields) -> "object":
    from omegaconf import DictConfig

    return DictConfig({"name": name, "optimizer": "adam", "devices": 1, "batch_size": batch, "num_workers": 0, "max_steps": steps,
                       "fast_dev_run": False, "cache_dir": "outputs", **fields})


def fb_adamerging(world: World, steps: int, granularity: str):
    """FusionBench's CLIP layer-wise or task-wise AdaMerging (``config/method/adamerging/clip.yaml`` settings)."""
    fields = {"weights": None, "lr": 1e-3, "init_values": 0.3, "clamp_weights": False, "tie_weights": True, "strict": False,
              "save_merging_weights": False}
    if granularity == "layer":
        from fusion_bench.method.adamerging.clip_layer_wise_adamerging import CLIPLayerWiseAdaMergingAlgorithm

        algorithm = CLIPLayerWiseAdaMergingAlgorithm(_adaptation_config("clip_layer_wise_adamerging", steps, world.batch, **fields))
        algorithm._fabric_instance = fabric()
        algorithm.log_hyperparams = lambda *a, **k: None  # needs a Fabric logger
    else:
        from fusion_bench.method.adamerging.clip_task_wise_adamerging import CLIPTaskWiseAdaMergingAlgorithm

        algorithm = CLIPTaskWiseAdaMergingAlgorithm(_adaptation_config("clip_task_wise_adamerging", steps, world.batch, **fields))
        algorithm._fabric = fabric()  # built only on CUDA by FusionBench
        algorithm.on_test_time_adaptation_start = lambda: None
    world.fb_heads(algorithm)
    algorithm.get_shuffled_test_loader_iter = world.fb_test_iterators()
    return algorithm


def fb_wemoe(world: World, steps: int):
    """FusionBench's CLIP WEMoE (``config/method/wemoe/weight_ensembling_moe.yaml`` settings), its model pool set.

    Its ``construct_moe_model`` needs :func:`task_arithmetic_merge` patched in (FusionBench 0.2.33's own one fails).
    """
    from fusion_bench.method.we_moe.clip_we_moe import CLIPWeightEnsemblingMoEAlgorithm

    config = _adaptation_config("clip_weight_ensembling_moe", steps, world.batch, checkpoint=False, save_checkpoint=False,
                                router_hidden_layers=2, init_lambda=0.3, batch_reduce=True, lr=1e-4, use_grad_accumulate=True)
    algorithm = CLIPWeightEnsemblingMoEAlgorithm(config)
    world.fb_heads(algorithm)
    algorithm._fabric = fabric()  # FusionBench builds its Fabric only when CUDA is available; its CLI would give one
    algorithm.get_shuffled_test_loader_iter = world.fb_test_iterators()
    algorithm.on_test_time_adaptation_start = lambda: None
    algorithm.modelpool = world.fb_pool()
    return algorithm


def fb_sparse_wemoe(world: World, steps: int, prune: float):
    """FusionBench's CLIP E-WEMoE with its yaml defaults (shared gate, 2-layer router, λ 0.3, batch_reduce, lr 1e-4)."""
    from fusion_bench.method.sparse_we_moe.sparse_clip_we_moe import SparseCLIPWeightEnsemblingMoEAlgorithm

    config = _adaptation_config("sparse_clip_weight_ensembling_moe", steps, world.batch, checkpoint=False, save_checkpoint=False,
                                router_hidden_layers=2, init_lambda=0.3, batch_reduce=True, tv_prune_ratio=prune,
                                post_sparse_gate=False, gate_prune_ratio=0.0, shared_gate=True, position_encoding=False,
                                position_encoding_dim=8, lr=1e-4, use_grad_accumulate=False)
    algorithm = SparseCLIPWeightEnsemblingMoEAlgorithm(config)
    world.fb_heads(algorithm)
    algorithm._fabric = fabric()  # FusionBench builds its Fabric only on CUDA; its CLI would give one
    algorithm.get_shuffled_test_loader_iter = world.fb_test_iterators()
    algorithm.on_test_time_adaptation_start = lambda: None
    algorithm.modelpool = world.fb_pool()
    return algorithm


def task_arithmetic_merge(pretrained_model, finetuned_models, scaling_factor, inplace=True):
    """θ₀ + λ Σ (θᵢ − θ₀), what FusionBench's ``task_arithmetic_merge`` computes (its strict type check rejects its own call)."""
    state = pretrained_model.state_dict()
    models = [m.state_dict() for m in finetuned_models]
    with torch.no_grad():
        merged = {k: v + scaling_factor * sum(m[k] - v for m in models) if v.is_floating_point() else v for k, v in state.items()}
    pretrained_model.load_state_dict(merged)
    return pretrained_model


def fb_regmean(world: World, cls):
    algorithm = cls(exclude_param_names_regex=[], num_regmean_examples=world.batch * world.n_batches, reduce_non_diagonal_ratio=0.95,
                    weight_transpose=True, dataloader_kwargs={"batch_size": world.batch, "num_workers": 0})
    world.fb_heads(algorithm)
    algorithm.on_regmean_start = lambda: None
    algorithm._fabric_instance = fabric()
    return algorithm


def fb_smile(k: int):
    from fusion_bench.method import SmileUpscalingAlgorithm

    return SmileUpscalingAlgorithm(device="cpu", upscaling_accelerator=None, full_matrices=True, gate_k=1, k=k, top_k=1,
                                   routing_use_diff=True, average_experts=False, model_path=None)
