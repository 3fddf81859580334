"""Backdoor-safe merging: Safe Concrete AdaMerging and the post-merge defenses AWM and SAU.

Yang et al., "Mitigating the Backdoor Effect for Multi-Task Model Merging via Safety-Aware
Subspace" (2024, arXiv 2410.13910), as FusionBench 0.2.33 implements it
(``method/concrete_subspace/clip_safe_concrete_adamerging.py``, ``clip_post_defense.py``).  A
backdoored expert's task vector carries a trigger → target-class shortcut; merging inherits it.
These methods learn the shared Concrete mask of :mod:`.concrete` so that the merged model stays
confident on inputs carrying a *learned* adversarial perturbation δ (a stand-in for the unknown
trigger; :mod:`.perturb` says where δ is added), which prunes the entries that implement the
shortcut.  Each step, on unlabelled test batches (never labels):

1. (Safe Concrete AdaMerging only) the inner AdaMerging step of :class:`~.concrete.ConcreteAdaMerging`;
2. δ (one per task, Adam ``adv_lr``) maximises the cross-entropy of the perturbed predictions
   against the clean predictions of the current masked model (held fixed): ``−CE(f(x + δ), argmax f(x))``;
   SAU adds a Jensen–Shannon term that keeps the attacks of the masked and the unmasked merge shared;
3. the mask logits (Adam ``lr``) minimise ``H(f(x)) + adv_weight · H(f(x + δ))`` with δ fixed (SAU:
   ``+ shared_weight ·`` a loss pushing down the class the unmasked merge is attacked to).
   ``adv_objective: consistency`` replaces ``H(f(x + δ))`` by ``CE(f(x + δ), argmax f(x))``, the loss
   δ maximises: entropy does not penalise a perturbation that sends inputs *confidently* to a
   backdoor's target class, consistency does (fuse's option; FusionBench's is ``entropy``).

The run's notes report what δ does to the mask steps' predictions over the last steps
(``attack``: per task, the share of flipped predictions and the classes they go to), which tells
whether the perturbation found a backdoor (its flips go to the target class) or other directions.

AWM and SAU are *post-merge* defenses: FusionBench applies them to a merged model from its pool;
here the merged model is task arithmetic of the pool with ``scaling_factor`` (FusionBench's configs
carry 0.3), and the mask covers its task vector ``θ_merged − θ₀``.

As FusionBench's safe variant, Safe Concrete AdaMerging zeroes λ's gradient only after each step on
λ, so the mask step's gradient on λ adds to the next inner step's (and to the first AdaMerging step).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import attrs

from fusion_core import Capabilities, in_range, option, positive

from .common import check_finite, entropy, progress
from .concrete import PAPER as CONCRETE_PAPER
from .concrete import ConcreteAdaMerging, ConcreteMethod, MaskFields, Setup, effective, masked_merge, optimise

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fusion_core import ModelPool, RunContext

    from .perturb import Perturbations

PAPER = "https://arxiv.org/abs/2410.13910"


@attrs.frozen(slots=False)  # a mixin: a second slotted base would clash
class AdversaryFields:
    """The adversarial perturbation's fields (FusionBench's names in parentheses)."""

    adv_lr: float = option(1e-4, help="Adam learning rate of the perturbations δ (adv_lr)", validator=positive)
    perturb_site: Literal["auto", "input", "embeddings", "prefix"] = option(
        "auto", help="where δ acts: added to the float input (images) or to the input-embedding output (tokens), auto (FusionBench's "
                     "convention: input for float batches, else embeddings), or prefix (tokens: δ is a learned soft token inserted "
                     "after the first token, as a trigger word)")
    perturb_clamp: bool = option(True, help="clamp x + δ to [0, 1] in the mask step, as FusionBench (input site only)")
    adv_objective: Literal["entropy", "consistency"] = option(
        "entropy", help="the mask's term on perturbed inputs: their prediction entropy (FusionBench), or consistency: the "
                        "cross-entropy of the perturbed predictions against the clean predictions' classes, the loss δ "
                        "maximises (a min-max game; the entropy term does not penalise a confident trigger → target shortcut)")


def perturbations(setup: Setup, site: str, method: str) -> "Perturbations":
    """One zero perturbation per task, shaped from a peeked batch of each task."""
    from fusion_core.adapters import functional_forward

    from .perturb import Perturbations

    return Perturbations(setup.base, [t.peek_inputs() for t in setup.tasks], site=site, method=method,
                         run=lambda inputs: functional_forward(setup.base, setup.params, inputs, setup.pool))


def clean_and_perturbed(setup: Setup, perturb: "Perturbations", index: int, params: Mapping[str, "torch.Tensor"], *,
                        track: bool, clamp: bool) -> tuple["torch.Tensor", "torch.Tensor", Any]:
    """The logits of task ``index``'s next batch and of its perturbed copy (one forward pass), and the batch."""
    task = setup.tasks[index]
    inputs = task.next_inputs()
    with perturb.applied(index, inputs, clamp=(0.0, 1.0) if clamp else None, track=track) as both:
        logits = setup.logits(task, params, both)
    half = logits.shape[0] // 2
    return logits[:half], logits[half:], both


def attack_loss(clean: "torch.Tensor", perturbed: "torch.Tensor") -> "torch.Tensor":
    """``−CE(perturbed, argmax clean)``: minimised by δ to flip the clean predictions."""
    import torch.nn.functional as F

    return -F.cross_entropy(perturbed, clean.argmax(dim=1).long())


TALLY_STEPS = 20
"""The attack tally (:class:`AttackTally`) counts the mask steps' predictions over the last this-many steps."""


class AttackTally:
    """What the learned perturbation does to the mask steps' predictions, per task, over the last :data:`TALLY_STEPS` steps.

    ``flipped``: share of samples whose perturbed class differs from their clean class;
    ``to_class``: share of the flipped samples per perturbed class (a perturbation that found a
    backdoor sends them to its target class).  Reported as ``attack`` in the method's notes.
    """

    def __init__(self, task_names: list[str], steps: int) -> None:
        self.names, self.first = list(task_names), max(0, steps - TALLY_STEPS)
        self.samples = [0] * len(self.names)
        self.flips: list[dict[int, int]] = [{} for _ in self.names]

    def add(self, index: int, step: int, clean: "torch.Tensor", perturbed: "torch.Tensor") -> None:
        if step < self.first:
            return
        before, after = clean.argmax(dim=1), perturbed.argmax(dim=1)
        self.samples[index] += int(before.numel())
        for label in after[after != before].tolist():
            self.flips[index][label] = self.flips[index].get(label, 0) + 1

    def summary(self) -> dict[str, Any]:
        out = {}
        for name, samples, flips in zip(self.names, self.samples, self.flips, strict=True):
            flipped = sum(flips.values())
            out[name] = {"samples": samples, "flipped": flipped / samples if samples else 0.0,
                         "to_class": {str(c): n / flipped for c, n in sorted(flips.items())}}
        return out


def perturbed_term(clean: "torch.Tensor", perturbed: "torch.Tensor", objective: str, eps: float) -> "torch.Tensor":
    """The mask's loss on the perturbed predictions (``adv_objective``), the clean ones as fixed pseudo-labels.

    ``entropy``: ``H(f(x + δ))`` (FusionBench);  ``consistency``: ``CE(f(x + δ), argmax f(x))``, which δ's
    step maximises (:func:`attack_loss`), so that mask and perturbation play one min-max game.
    """
    if objective == "consistency":
        return -attack_loss(clean.detach(), perturbed)
    return entropy(perturbed, eps)


def js_unshared(perturbed: "torch.Tensor", ref_perturbed: "torch.Tensor", shared: "torch.Tensor") -> "torch.Tensor":
    """Σ over samples whose attack is *not* shared of the Jensen–Shannon divergence of the two perturbed predictions, / batch."""
    p = perturbed.softmax(dim=1).clamp(min=1e-8)
    q = ref_perturbed.softmax(dim=1).clamp(min=1e-8)
    mix = 0.5 * (p + q)
    js = 0.5 * (p * p.log() + q * q.log()) - 0.5 * (p * mix.log() + q * mix.log())
    return js[~shared].sum(dim=1).sum() / perturbed.shape[0]


def poisoned_samples(clean: "torch.Tensor", ref_clean: "torch.Tensor", ref_perturbed: "torch.Tensor") -> "torch.Tensor":
    """Samples whose perturbed prediction by the unmasked merge differs from both clean predictions (masked and unmasked)."""
    ref_label = ref_perturbed.argmax(dim=1)
    return (ref_label != clean.argmax(dim=1)) & (ref_label != ref_clean.argmax(dim=1))


def shared_loss(perturbed: "torch.Tensor", ref_clean: "torch.Tensor", ref_perturbed: "torch.Tensor", clean: "torch.Tensor") -> "torch.Tensor":
    """SAU's shared-adversarial loss: on samples the unmasked merge is attacked on, push down the class it is attacked to."""
    import torch
    import torch.nn.functional as F

    ref_label = ref_perturbed.argmax(dim=1)
    poisoned = poisoned_samples(clean, ref_clean, ref_perturbed)
    if not bool(poisoned.any()):
        return perturbed.new_zeros(())
    one_hot = F.one_hot(ref_label, num_classes=perturbed.shape[1]).to(perturbed.dtype)
    probs = perturbed.softmax(dim=1)
    neg = (probs * (1 - one_hot)).sum(dim=1)[poisoned]
    pos = (probs * one_hot).sum(dim=1)[poisoned]
    value = (-torch.log(1e-6 + neg.clamp(max=0.999)).sum() - torch.log(1 + 1e-6 - pos.clamp(min=0.001)).sum()) / 2
    return value / perturbed.shape[0]


class SafeConcreteAdaMerging(ConcreteAdaMerging):
    """Safe Concrete AdaMerging (Yang et al. 2024): Concrete AdaMerging whose mask also keeps an adversarially perturbed input confident."""

    name = "safe_concrete_adamerging"
    summary = "Concrete AdaMerging whose shared mask is learned to resist a learned trigger-like perturbation (backdoor-safe merging)."
    reference_url: ClassVar[str] = PAPER
    fusionbench_config = "concrete_subspace/clip_safe_concrete_layer_wise_adamerging.yaml"
    carry_outer_gradient: ClassVar[bool] = True

    @attrs.frozen
    class Config(ConcreteAdaMerging.Config, AdversaryFields):
        adv_weight: float = option(0.1, help="weight of the perturbed-input term (adv_objective) in the mask loss (adv_weight)")

    def prepare_run(self, setup: Setup) -> None:
        import torch

        self._perturb = perturbations(setup, self.config.perturb_site, self.name)
        self._tally = AttackTally([t.name for t in setup.tasks], self.config.steps)
        self._adv_optimizer = torch.optim.Adam(self._perturb.parameters(), lr=self.config.adv_lr)

    def before_mask_step(self, setup: Setup, params: Mapping[str, "torch.Tensor"], step: int) -> None:
        fixed = {k: v.detach() for k, v in params.items()}
        total = None
        for index in range(len(setup.tasks)):
            clean, perturbed, _ = clean_and_perturbed(setup, self._perturb, index, fixed, track=True, clamp=False)
            loss = attack_loss(clean, perturbed)
            total = loss if total is None else total + loss
        assert total is not None
        optimise(self._adv_optimizer, total, step, method=self.name)

    def mask_loss(self, setup: Setup, params: Mapping[str, "torch.Tensor"], step: int) -> "torch.Tensor":
        cfg = self.config
        total = None
        for index in range(len(setup.tasks)):
            clean, perturbed, _ = clean_and_perturbed(setup, self._perturb, index, params, track=False, clamp=cfg.perturb_clamp)
            self._tally.add(index, step, clean, perturbed)
            loss = entropy(clean, cfg.entropy_eps) + cfg.adv_weight * perturbed_term(clean, perturbed, cfg.adv_objective, cfg.entropy_eps)
            total = loss if total is None else total + loss
        assert total is not None
        return total

    def extra_notes(self) -> dict[str, Any]:
        return {"perturb_site": self._perturb.site,
                "perturbation_l2": [float(d.detach().norm()) for d in self._perturb.parameters()],
                "attack": self._tally.summary()}


class PostMergeDefense(ConcreteMethod):
    """AWM / SAU: a Concrete mask over the task vector of a task-arithmetic merge, learned against a learned perturbation."""

    reference_url: ClassVar[str] = PAPER
    capabilities: ClassVar[Capabilities] = ConcreteMethod.capabilities
    poisoned: int = 0
    """Samples of the mask steps that SAU's shared loss acted on (reported as ``shared_attack_samples``; AWM: 0)."""

    @abc.abstractmethod
    def attack(self, setup: Setup, index: int, params, ref) -> "torch.Tensor":
        """The perturbation's loss on task ``index`` (minimised by its optimiser)."""

    @abc.abstractmethod
    def mask_term(self, setup: Setup, index: int, params, ref) -> "torch.Tensor":
        """The defense's term of the mask's loss on task ``index``."""

    def run(self, pool: "ModelPool", ctx: "RunContext") -> dict[str, "torch.Tensor"]:
        import torch

        cfg = self.config
        setup = Setup(self, pool, ctx)
        self._perturb = perturbations(setup, cfg.perturb_site, self.name)
        self._tally, self._step = AttackTally([t.name for t in setup.tasks], cfg.steps), 0
        self.poisoned = 0
        coefficients = effective(setup.coefficients(cfg.scaling_factor, False).detach(), cfg.clamp_weights)
        ref = {k: v.detach() for k, v in masked_merge(setup.params, setup.vectors, coefficients, None).items()}
        optimizer = torch.optim.Adam(setup.mask.parameters(), lr=cfg.lr)
        adv_optimizer = torch.optim.Adam(self._perturb.parameters(), lr=cfg.adv_lr)
        history = []
        for step in progress(ctx, range(cfg.steps), f"learning the mask ({self.name})", total=cfg.steps):
            self._step = step
            mask = setup.mask.sample("continuous", cfg.temperature, setup.generator)
            params = masked_merge(setup.params, setup.vectors, coefficients, mask)
            fixed = {k: v.detach() for k, v in params.items()}
            adv = sum(self.attack(setup, i, fixed, ref) for i in range(len(setup.tasks)))
            optimise(adv_optimizer, adv, step, method=self.name)
            loss = sum(self.mask_term(setup, i, params, ref) for i in range(len(setup.tasks)))
            check_finite(loss, step, method=self.name)
            history.append(optimise(optimizer, loss, step, method=self.name))
        with torch.no_grad():
            final = setup.mask.sample(cfg.eval_mask, cfg.temperature, setup.generator)
        self.finish(setup, ctx, history, perturb_site=self._perturb.site, shared_attack_samples=self.poisoned,
                    attack=self._tally.summary(),
                    perturbation_l2=[float(d.detach().norm()) for d in self._perturb.parameters()])
        return setup.state(final, coefficients)


@attrs.frozen
class DefenseFields(MaskFields, AdversaryFields):
    scaling_factor: float = option(0.3, help="λ of the task-arithmetic merge that is defended (scaling_factor)")
    steps: int = option(2000, help="steps; each reads two unlabelled test batches per task (max_steps)", validator=in_range(0, None))
    lr: float = option(1e-3, help="Adam learning rate of the mask logits (lr)", validator=positive)
    adv_weight: float = option(0.01, help="weight of the perturbed-input term (adv_objective) in the mask loss (adv_weight)")


class AWM(PostMergeDefense):
    """AWM (adversarial weight masking), as FusionBench's post-merge defense: a Concrete mask on the merged task vector."""

    name = "awm"
    fusionbench_config = "concrete_subspace/clip_post_defense_AWM.yaml"
    summary = "Post-merge backdoor defense: a Concrete mask on a task-arithmetic merge learned to resist a learned perturbation (AWM)."
    Config = DefenseFields

    def attack(self, setup, index, params, ref):
        clean, perturbed, _ = clean_and_perturbed(setup, self._perturb, index, params, track=True, clamp=False)
        return attack_loss(clean, perturbed)

    def mask_term(self, setup, index, params, ref):
        cfg = self.config
        clean, perturbed, _ = clean_and_perturbed(setup, self._perturb, index, params, track=False, clamp=cfg.perturb_clamp)
        self._tally.add(index, self._step, clean, perturbed)
        return entropy(clean, cfg.entropy_eps) + cfg.adv_weight * perturbed_term(clean, perturbed, cfg.adv_objective, cfg.entropy_eps)


class SAU(PostMergeDefense):
    """SAU (shared adversarial unlearning), as FusionBench's post-merge defense, against the unmasked merge as reference."""

    name = "sau"
    fusionbench_config = "concrete_subspace/clip_post_defense_SAU.yaml"
    summary = "Post-merge backdoor defense: AWM plus shared-adversarial terms against the unmasked merge (SAU)."

    @attrs.frozen
    class Config(DefenseFields):
        shared_weight: float = option(0.01, help="weight of the shared-adversarial loss in the mask loss (shared_weight)")
        beta1: float = option(0.5, help="weight of the attack loss in the perturbation step (beta1)")
        beta2: float = option(0.5, help="weight of the unshared Jensen–Shannon term in the perturbation step (beta2)")

    def _ref_logits(self, setup: Setup, index: int, both: Any, ref, *, track: bool) -> tuple["torch.Tensor", "torch.Tensor"]:
        """The unmasked merge's logits on the same batch (``track``: differentiable in δ, as the attack step's JS term is)."""
        import torch

        with torch.set_grad_enabled(track), self._perturb.applied(index, both, track=track, replay=True) as again:
            logits = setup.logits(setup.tasks[index], ref, again)
        half = logits.shape[0] // 2
        return logits[:half], logits[half:]

    def attack(self, setup, index, params, ref):
        cfg = self.config
        clean, perturbed, both = clean_and_perturbed(setup, self._perturb, index, params, track=True, clamp=False)
        ref_clean, ref_perturbed = self._ref_logits(setup, index, both, ref, track=True)
        shared = ((perturbed.argmax(1) != clean.argmax(1)) & (ref_perturbed.argmax(1) != ref_clean.argmax(1))
                  & (perturbed.argmax(1) == ref_perturbed.argmax(1)))
        return cfg.beta1 * attack_loss(clean, perturbed) + cfg.beta2 * js_unshared(perturbed, ref_perturbed, shared)

    def mask_term(self, setup, index, params, ref):
        cfg = self.config
        clean, perturbed, both = clean_and_perturbed(setup, self._perturb, index, params, track=False, clamp=cfg.perturb_clamp)
        self._tally.add(index, self._step, clean, perturbed)
        ref_clean, ref_perturbed = self._ref_logits(setup, index, both, ref, track=False)
        self.poisoned += int(poisoned_samples(clean, ref_clean, ref_perturbed).sum())
        return (entropy(clean, cfg.entropy_eps) + cfg.adv_weight * perturbed_term(clean, perturbed, cfg.adv_objective, cfg.entropy_eps)
                + cfg.shared_weight * shared_loss(perturbed, ref_clean, ref_perturbed, clean))


METHODS = [SafeConcreteAdaMerging, AWM, SAU]
REFERENCES = {"concrete": CONCRETE_PAPER, "safe": PAPER}
