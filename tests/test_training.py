"""The shared local-training routine (algorithms/training.py): every group follows its own recipe,
a persistent optimiser keeps its momentum across calls, batches are the client's keyed draws, the
hooks run where documented, and a non-finite loss stops with one line."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from pfedmoap import rng
from pfedmoap.algorithms.training import Batches, Group, Recipe, train
from pfedmoap.errors import PFedMoAPError

N, BS, EPOCHS = 10, 4, 3          # 2 full batches per epoch, the last 2 images dropped


def _batches(n=N, seed=1, purpose="batches", x=None):
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1) if x is None else x
    return Batches(torch.zeros(n, dtype=torch.long), lambda epoch, gen: x, BS,
                   rng.torch_generator(seed, purpose, 0, 0))


def test_recipe_schedules():
    t = SimpleNamespace(lr=0.1, momentum=0.9, weight_decay=5e-4, warmup_epochs=1, warmup_lr=1e-5)
    r = Recipe.from_train(t)
    assert [r.lr_at(e, 4) for e in range(4)] == [1e-5] + [0.5 * 0.1 * (1 + math.cos(math.pi * k / 4)) for k in (0, 1, 2)]
    c = Recipe.from_train(t, lr=0.01, schedule="constant")
    assert (c.momentum, c.weight_decay) == (0.9, 5e-4) and [c.lr_at(e, 4) for e in range(4)] == [0.01] * 4
    with pytest.raises(PFedMoAPError, match="schedule = 'step'"):
        Recipe(lr=1.0, schedule="step")


def test_each_group_steps_with_its_own_learning_rate():
    """Loss a.sum() + 2 b.sum(): constant gradients, so (momentum and weight decay off) each tensor
    moves by the sum over steps of its own lr times its gradient."""
    a, b = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)
    cosine = Recipe(lr=0.1, schedule="cosine", warmup_epochs=1, warmup_lr=0.001)
    const = Recipe(lr=0.5, schedule="constant")
    train([Group([a], cosine), Group([b], const)], lambda x, y: a.sum() + 2 * b.sum(), _batches(), EPOCHS)
    steps = N // BS
    expect_a = -steps * sum(cosine.lr_at(e, EPOCHS) for e in range(EPOCHS))
    expect_b = -steps * 2 * sum(const.lr_at(e, EPOCHS) for e in range(EPOCHS))
    torch.testing.assert_close(a.detach(), torch.full((3,), expect_a), rtol=1e-6, atol=0)
    torch.testing.assert_close(b.detach(), torch.full((2,), expect_b), rtol=1e-6, atol=0)


def test_a_persistent_optimiser_keeps_its_momentum_across_calls_a_fresh_one_does_not():
    recipe = Recipe(lr=0.1, momentum=0.9, schedule="constant")
    p, q = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    kept = recipe.sgd([p])
    for _ in range(2):                  # two "rounds"
        train([Group([p], recipe, kept)], lambda x, y: p.sum(), _batches(), 1)
        train([Group([q], recipe)], lambda x, y: q.sum(), _batches(), 1)
    # fresh: each call is 2 steps from zero momentum (-0.1, -0.19); persistent: 4 steps in a row
    assert q.item() == pytest.approx(-2 * (0.1 + 0.19))
    assert p.item() == pytest.approx(-(0.1 + 0.19 + 0.271 + 0.3439))


def test_batches_are_keyed_full_and_drop_the_last_partial_batch():
    def seen(seed, purpose):
        b = _batches(seed=seed, purpose=purpose)
        return [x[:, 0].tolist() for e in range(EPOCHS) for x, _ in b.epoch(e)]
    one = seen(1, "batches")
    assert one == seen(1, "batches")                    # a pure function of its keys
    assert one != seen(1, "finetune") and one != seen(2, "batches")
    assert len(one) == EPOCHS * (N // BS) and all(len(x) == BS for x in one)
    for e in range(EPOCHS):
        images = sum(one[e * 2:(e + 1) * 2], [])
        assert len(set(images)) == 2 * BS               # a permutation: no image twice in an epoch
    assert len(list(_batches(n=3).epoch(0))) == 1         # fewer images than a batch: one batch of all


def test_penalty_is_added_and_after_backward_runs_before_the_steps():
    p = torch.ones(2, requires_grad=True)
    calls = []

    def hook(groups):
        calls.append(groups[0].params[0].grad.clone())
        groups[0].params[0].grad.zero_()              # e.g. clipping to 0: the step then moves nothing
    loss = train([Group([p], Recipe(lr=1.0, schedule="constant"))], lambda x, y: p.sum(), _batches(), 1,
                 penalty=lambda: 10 * p.sum(), after_backward=hook)
    assert loss == pytest.approx(22.0)                  # 2 + 10 * 2, unchanged between the steps
    assert len(calls) == N // BS and all(torch.equal(g, torch.full((2,), 11.0)) for g in calls)
    assert torch.equal(p.detach(), torch.ones(2))


def test_no_images_no_training_and_a_non_finite_loss_is_one_line():
    p = torch.ones(1, requires_grad=True)
    assert math.isnan(train([Group([p], Recipe(lr=1.0))], lambda x, y: p.sum(), _batches(n=0), 2))
    assert p.item() == 1.0
    with pytest.raises(PFedMoAPError, match=r"^round 2, client 5: training loss is inf in local epoch 1 "):
        train([Group([p], Recipe(lr=1.0))], lambda x, y: p.sum() * float("inf"), _batches(), 2,
              where="round 2, client 5")
