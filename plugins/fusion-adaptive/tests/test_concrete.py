"""Concrete subspace methods and backdoor-safe merging: closed forms, limits, determinism, perturbation sites."""

from __future__ import annotations

import pytest
import torch
from fusion_adaptive.adamerging import AdaMerging
from fusion_adaptive.concrete import ConcreteAdaMerging, ConcreteMask, ConcreteTaskArithmetic, relaxed_bernoulli
from fusion_adaptive.perturb import Perturbations, fit, with_slot
from fusion_adaptive.safe import AWM, SAU, AttackTally, SafeConcreteAdaMerging, js_unshared, perturbed_term, shared_loss
from torch import nn


def task_arithmetic(world, lam: float) -> dict:
    out = {}
    for key, base in world.base.state_dict().items():
        out[key] = base + lam * sum(m.state_dict()[key] - base for m in world.models.values())
    return out


def close(a: dict, b: dict, tol: float) -> float:
    worst = max(float((a[k] - b[k]).abs().max()) for k in b)
    assert worst <= tol, worst
    return worst


# --------------------------------------------------------------------------- the mask


def test_high_temperature_mask_is_one_after_rescaling():
    g = torch.Generator().manual_seed(0)
    mask = ConcreteMask({"w": torch.zeros(50, 40)}, initial_logits=0.7).sample("continuous", 1e7, g)["w"]
    torch.testing.assert_close(mask, torch.ones(50, 40), atol=1e-6, rtol=0)


def test_low_temperature_draws_are_bernoulli_of_the_keep_probability():
    g = torch.Generator().manual_seed(0)
    draws = relaxed_bernoulli(torch.full((200_000,), 1.0), 1e-4, g)
    assert float(((draws > 1e-3) & (draws < 1 - 1e-3)).float().mean()) < 1e-3  # hard 0/1
    assert float((draws > 0.5).float().mean()) == pytest.approx(float(torch.sigmoid(torch.tensor(1.0))), abs=0.005)


def test_relaxed_bernoulli_is_torchs_relaxed_bernoulli():
    logits = torch.linspace(-3, 3, 1000)
    torch.manual_seed(7)
    expected = torch.distributions.RelaxedBernoulli(logits=logits, temperature=torch.tensor(0.5)).rsample()
    got = relaxed_bernoulli(logits, 0.5, torch.Generator().manual_seed(7))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_discrete_all_zero_mask_stays_zero():
    g = torch.Generator().manual_seed(0)
    mask = ConcreteMask({"w": torch.zeros(10)}, initial_logits=-200.0).sample("discrete", 0.5, g)["w"]
    assert torch.equal(mask, torch.zeros(10))


# --------------------------------------------------------------------------- limits: mask = 1 is the plain method


@pytest.mark.parametrize("how", ["temperature", "logits"])
def test_concrete_task_arithmetic_with_a_unit_mask_is_task_arithmetic(world, how):
    fields = {"temperature": 1e7} if how == "temperature" else {"initial_logits": 60.0}
    out = ConcreteTaskArithmetic(ConcreteTaskArithmetic.Config(steps=0, scaling_factor=0.3, **fields)).run(world.pool(), world.ctx())
    close(out, task_arithmetic(world, 0.3), 1e-5)


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_concrete_adamerging_with_a_unit_mask_is_adamerging(world, granularity):
    steps = 6
    ours = ConcreteAdaMerging(ConcreteAdaMerging.Config(steps=0, adamerging_steps=steps, adamerging_lr=0.01, temperature=1e7,
                                                        granularity=granularity)).run(world.pool(), world.ctx())
    plain = AdaMerging(AdaMerging.Config(steps=steps, lr=0.01, granularity=granularity)).run(world.pool(), world.ctx())
    close(ours, plain, 1e-4)


def test_mask_learning_lowers_entropy_and_changes_the_merge(world):
    ctx = world.ctx()
    cfg = ConcreteTaskArithmetic.Config(steps=30, lr=0.05)
    out = ConcreteTaskArithmetic(cfg).run(world.pool(), ctx)
    info = ctx.extras["concrete_task_arithmetic"]
    assert info["steps"] == 30 and info["loss_min"] < info["loss_first"]
    assert 0.0 <= info["mask_kept"] <= 1.0 and info["mask_mean_probability"] != pytest.approx(0.5, abs=1e-4)
    assert ctx.extras["transductive"]["method"] == "concrete_task_arithmetic"
    assert max(float((out[k] - v).abs().max()) for k, v in task_arithmetic(world, 0.3).items()) > 1e-3


@pytest.mark.parametrize("cls", [ConcreteTaskArithmetic, ConcreteAdaMerging, SafeConcreteAdaMerging, AWM, SAU])
def test_same_seed_same_bits_other_seed_other_mask(world, cls):
    fields = {"steps": 2}
    if cls in (ConcreteAdaMerging, SafeConcreteAdaMerging):
        fields["adamerging_steps"] = 2
    method = cls(cls.Config(**fields))
    a = method.run(world.pool(), world.ctx(seed=3))
    b = method.run(world.pool(), world.ctx(seed=3))
    c = method.run(world.pool(), world.ctx(seed=4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


# --------------------------------------------------------------------------- the safe variants


def test_safe_variant_learns_a_perturbation_at_the_input(world):
    ctx = world.ctx()
    SafeConcreteAdaMerging(SafeConcreteAdaMerging.Config(steps=3, adamerging_steps=1, adv_lr=0.05)).run(world.pool(), ctx)
    info = ctx.extras["safe_concrete_adamerging"]
    assert info["perturb_site"] == "input" and len(info["perturbation_l2"]) == 3 and min(info["perturbation_l2"]) > 0
    attack = info["attack"]  # every mask step's batch counted (3 steps < the tally's 20)
    assert len(attack) == 3 and all(a["samples"] > 0 and 0.0 <= a["flipped"] <= 1.0 for a in attack.values())


def test_attack_tally_counts_flips_by_class_over_the_last_steps():
    tally = AttackTally(["a", "b"], steps=25)  # counts steps 5..24
    clean = torch.tensor([[5.0, 0.0, 0.0], [5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0]])
    perturbed = torch.tensor([[0.0, 0.0, 5.0], [5.0, 0.0, 0.0], [0.0, 0.0, 5.0], [5.0, 0.0, 0.0]])
    tally.add(0, 4, clean, perturbed)  # before the window: not counted
    tally.add(0, 5, clean, perturbed)
    tally.add(0, 24, clean, clean)
    out = tally.summary()
    assert out["a"] == {"samples": 8, "flipped": 3 / 8, "to_class": {"0": 1 / 3, "2": 2 / 3}}
    assert out["b"] == {"samples": 0, "flipped": 0.0, "to_class": {}}


@pytest.mark.parametrize("cls", [AWM, SAU])
def test_defenses_with_a_unit_mask_and_no_steps_are_the_task_arithmetic_merge(world, cls):
    out = cls(cls.Config(steps=0, temperature=1e7, scaling_factor=0.3)).run(world.pool(), world.ctx())
    close(out, task_arithmetic(world, 0.3), 1e-5)


class TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, ids):
        return self.out(self.emb(ids).mean(dim=1))


def test_embedding_site_adds_delta_to_the_second_half_only():
    torch.manual_seed(0)
    model = TokenModel()
    ids = torch.randint(0, 20, (5, 6))
    perturb = Perturbations(model, [ids], site="auto", method="t", run=model)
    assert perturb.site == "embeddings" and perturb.deltas[0].shape == (6, 4)
    with torch.no_grad():
        perturb.deltas[0].copy_(torch.randn(6, 4))
    with perturb.applied(0, ids) as both:
        got = model(both)
    expected_clean = model(ids)
    expected_perturbed = model.out((model.emb(ids) + perturb.deltas[0]).mean(dim=1))
    torch.testing.assert_close(got[:5], expected_clean)
    torch.testing.assert_close(got[5:], expected_perturbed)


class MaskedTokenModel(nn.Module):
    """Mean of the attended token embeddings → a linear head (a text encoder in miniature)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 4)
        self.out = nn.Linear(4, 3)

    def pooled(self, emb, mask):
        m = mask.unsqueeze(-1).to(emb.dtype)
        return self.out((emb * m).sum(dim=1) / m.sum(dim=1))

    def forward(self, input_ids, attention_mask):
        return self.pooled(self.emb(input_ids), attention_mask)


def test_with_slot_inserts_an_attended_position_after_the_first_token_and_pads_the_clean_copy():
    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    both = with_slot({"input_ids": ids, "attention_mask": mask, "flag": 3}, method="t")
    assert both["input_ids"].tolist() == [[5, 6, 7, 7], [8, 9, 0, 0], [5, 5, 6, 7], [8, 8, 9, 0]]
    assert both["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]]
    assert both["flag"] == 3


def test_prefix_site_inserts_delta_as_a_soft_token_in_the_second_half_only():
    torch.manual_seed(0)
    model = MaskedTokenModel()
    ids = torch.randint(1, 20, (5, 6))
    mask = torch.ones_like(ids)
    mask[3:, 4:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    perturb = Perturbations(model, [batch], site="prefix", method="t", run=lambda b: model(**b))
    assert perturb.site == "prefix" and perturb.deltas[0].shape == (4,)
    with torch.no_grad():
        perturb.deltas[0].copy_(torch.randn(4))
    with perturb.applied(0, batch) as both:
        got = model(**both)
    emb = model.emb(ids)
    slotted = torch.cat([emb[:, :1], perturb.deltas[0].expand(5, 1, 4), emb[:, 1:]], dim=1)
    slot_mask = torch.cat([mask[:, :1], torch.ones(5, 1, dtype=mask.dtype), mask[:, 1:]], dim=1)
    torch.testing.assert_close(got[:5], model(ids, mask))
    torch.testing.assert_close(got[5:], model.pooled(slotted, slot_mask))
    got.sum().backward()
    assert perturb.deltas[0].grad is not None and float(perturb.deltas[0].grad.abs().sum()) > 0


def test_prefix_site_refuses_batches_without_an_attention_mask():
    from fusion_core.errors import InputError

    with pytest.raises(InputError, match="perturb_site=prefix needs token batches with input_ids and attention_mask"):
        Perturbations(TokenModel(), [torch.zeros(2, 3, dtype=torch.long)], site="prefix", method="t", run=None)


def test_fit_cuts_and_pads_along_the_sequence():
    delta = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(fit(delta, (2, 2)), delta[:2])
    assert torch.equal(fit(delta, (4, 2)), torch.cat([delta, torch.zeros(1, 2)]))


def test_input_site_refuses_token_batches():
    from fusion_core.errors import InputError

    with pytest.raises(InputError, match="perturb_site=input needs floating-point"):
        Perturbations(TokenModel(), [torch.zeros(2, 3, dtype=torch.long)], site="input", method="t", run=None)


def test_sau_terms_closed_forms():
    same = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    assert float(js_unshared(same, same, torch.tensor([False, False]))) == pytest.approx(0.0, abs=1e-7)
    # the unmasked merge is attacked to class 2 on sample 0 (clean class 0): the loss is −½[log(1e-6 + p¬2) + log(1 + 1e-6 − p₂)] / B
    perturbed = torch.tensor([[0.0, 0.0, 1.0], [5.0, 0.0, 0.0]])
    clean = torch.tensor([[1.0, 0.0, 0.0], [5.0, 0.0, 0.0]])
    ref_perturbed = torch.tensor([[0.0, 0.0, 9.0], [5.0, 0.0, 0.0]])
    p2 = float(perturbed[0].softmax(0)[2])
    expected = -(torch.log(torch.tensor(1e-6 + (1 - p2))) + torch.log(torch.tensor(1 + 1e-6 - p2))) / 2 / 2
    assert float(shared_loss(perturbed, clean, ref_perturbed, clean)) == pytest.approx(float(expected), rel=1e-5)
    assert float(shared_loss(perturbed, clean, clean, clean)) == 0.0


def test_perturbed_term_entropy_or_consistency_closed_forms():
    clean = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 2.0]], requires_grad=True)
    # sample 0 flipped to class 1 with confidence (low entropy), sample 1 kept
    perturbed = torch.tensor([[0.0, 6.0, 0.0], [0.0, 0.0, 2.0]], requires_grad=True)
    p = perturbed.detach().softmax(1)
    h = float(-(p * p.log()).sum(1).mean())
    assert float(perturbed_term(clean, perturbed, "entropy", 0.0).detach()) == pytest.approx(h, rel=1e-6)
    ce = float(-(perturbed.detach().log_softmax(1)[[0, 1], [0, 2]]).mean())
    assert float(perturbed_term(clean, perturbed, "consistency", 0.0).detach()) == pytest.approx(ce, rel=1e-6)
    # the confident flip is what the consistency term penalises and the entropy term does not
    assert ce > 2.5 and h < 0.6
    # the clean predictions are fixed pseudo-labels: no gradient reaches them
    perturbed_term(clean, perturbed, "consistency", 0.0).backward()
    assert clean.grad is None and perturbed.grad is not None and float(perturbed.grad.abs().sum()) > 0
