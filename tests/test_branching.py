"""Every term of the edge hypernet's regularizer against hand-computed values (DESIGN.md §2)."""

import math

import pytest
import torch

from training.branching import (
    RegularizerSwitches,
    active_loss,
    branching_regularizer,
    gumbel_temperature,
    inactive_loss,
    layer_weight,
    sample_preference,
    task_affinity,
    task_dichotomy,
    usage_probability,
)

E = torch.eye(3)


def test_usage_probability_two_tasks_by_hand():
    nu = torch.tensor([[0.8, 0.2], [0.3, 0.7]])
    use = usage_probability([nu])
    assert torch.allclose(use[1], torch.tensor([1.0, 1.0]))
    # P(0, i) = 1 - prod_k (1 - P(1, k) nu_k(i))
    assert torch.allclose(use[0], torch.tensor([1 - 0.2 * 0.7, 1 - 0.8 * 0.3]))
    only_first = usage_probability([nu], tasks=[0])
    assert torch.allclose(only_first[1], torch.tensor([1.0, 0.0]))
    assert torch.allclose(only_first[0], torch.tensor([0.8, 0.2]))


def test_usage_probability_three_layers_one_hot_equals_used_nodes():
    # one-hot distributions: P_use is the indicator of the used nodes of the tree
    from dymu.architecture import Architecture

    arch = Architecture.from_parents([[0, 0, 2], [1, 1, 0]])
    nus = arch.one_hot_nu()
    use = usage_probability(nus)
    for l, streams in enumerate(arch.used_nodes()):
        assert use[l].tolist() == [1.0 if j in streams else 0.0 for j in range(3)]


def test_layer_weight():
    assert layer_weight(0, 3) == pytest.approx(1 / 3)
    assert layer_weight(1, 3) == 0.0  # the top boundary is never pulled together
    assert layer_weight(1, 3, enabled=False) == 1.0


def test_active_loss_by_hand():
    probs = [E.clone(), E.clone()]  # boundary 0: nu_i = e_i; boundary 1: identity
    use = usage_probability(probs)
    aff = torch.full((3, 3), 0.5)
    # pairs (0,1),(1,0): (L-l)/L = 1/3, A = 0.5, P_use = 1, ||e0 - e1||^2 = 2
    assert float(active_loss(probs, use, [0, 1], aff)) == pytest.approx(2 / 3)
    assert float(active_loss(probs, use, [0, 1, 2], aff)) == pytest.approx(2.0)
    assert float(active_loss(probs, use, [1], aff)) == 0.0
    no_aff = RegularizerSwitches(affinity=False)
    assert float(active_loss(probs, use, [0, 1], aff, no_aff)) == pytest.approx(4 / 3)
    flat = RegularizerSwitches(layer_weighting=False)
    # both boundaries count with weight 1: 2 pairs x 0.5 x 2 per boundary
    assert float(active_loss(probs, use, [0, 1], aff, flat)) == pytest.approx(4.0)


def test_active_loss_uses_the_childrens_usage():
    probs = [E.clone(), E.clone()]
    use = [torch.ones(3), torch.tensor([1.0, 0.5, 1.0]), torch.ones(3)]
    aff = torch.ones(3, 3)
    assert float(active_loss(probs, use, [0, 1], aff)) == pytest.approx(2 * (1 / 3) * 0.5 * 2)


def test_inactive_loss_by_hand():
    probs = [E.clone(), E.clone()]
    assert float(inactive_loss(probs, [0], [1, 2])) == pytest.approx(8.0)
    assert float(inactive_loss(probs, [0, 1], [2])) == pytest.approx(4.0)
    copy = [torch.tensor([[1.0, 0, 0], [0, 1, 0], [1, 0, 0]])]
    assert float(inactive_loss(copy, [0, 1], [2])) == 0.0  # task 2 copies task 0's path
    assert float(inactive_loss(probs, [0, 1, 2], [])) == 0.0


def test_task_dichotomy_and_the_empty_active_case():
    r = torch.tensor([0.5, 0.3, 0.2])
    assert task_dichotomy(r, 0.2) == ([0, 1, 2], [])
    assert task_dichotomy(r, 0.25) == ([0, 1], [2])
    assert task_dichotomy(r, 0.8) == ([0], [1, 2])  # nobody reaches tau: the arg-max is active
    assert task_dichotomy(torch.tensor([0.1, 0.1, 0.8]), 0.9) == ([2], [0, 1])
    assert task_dichotomy(r, 0.25, enabled=False) == ([0, 1, 2], [])


def test_branching_regularizer_combines_the_terms():
    probs = [E.clone(), E.clone()]
    aff = torch.full((3, 3), 0.5)
    r = torch.tensor([0.45, 0.45, 0.1])
    omega, stats = branching_regularizer(
        probs, r, 0.5, aff, tau=0.2, lambda_active=1.0, lambda_inactive=0.1
    )
    assert stats["active_loss"] == pytest.approx(2 / 3) and stats["inactive_loss"] == 4.0
    assert float(omega) == pytest.approx(0.5 * 2 / 3 + 0.1 * 4.0)
    omega0, _ = branching_regularizer(probs, r, 0.0, aff, tau=0.2)
    assert float(omega0) == pytest.approx(0.4)  # c = 0: only the inactive term
    off, _ = branching_regularizer(
        probs, r, 0.5, aff, tau=0.2, switches=RegularizerSwitches(inactive_loss=False)
    )
    assert float(off) == pytest.approx(1 / 3)


def test_regularizer_gradient_reaches_the_logits():
    logits = torch.randn(2, 3, 3, requires_grad=True)
    probs = list(torch.softmax(logits, -1))
    omega, _ = branching_regularizer(
        probs, torch.tensor([0.4, 0.4, 0.2]), 1.0, torch.ones(3, 3), tau=0.3
    )
    omega.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_task_affinity_rsa():
    g = torch.Generator().manual_seed(0)
    same = torch.randn(20, 4, 5, 5, generator=g)
    other = torch.randn(20, 4, 5, 5, generator=g)
    feats = [[same, same.clone(), same * 3.0]]  # cosine similarity is scale-invariant
    assert torch.allclose(task_affinity(feats), torch.ones(3, 3))
    feats = [[same, same.clone(), other], [same, same, other]]
    a = task_affinity(feats)
    assert torch.allclose(a[0], torch.tensor([1.0, 1.0, 0.0]))
    assert torch.allclose(a.diagonal(), torch.ones(3))
    assert a[2, 0] == 0.0 and a[2, 2] == 1.0


def test_preference_sampling_and_temperature():
    g = torch.Generator().manual_seed(3)
    draws = [sample_preference(3, 0.2, g) for _ in range(2000)]
    rs = torch.stack([r for r, _ in draws])
    cs = torch.stack([c for _, c in draws])
    assert torch.allclose(rs.sum(1), torch.ones(2000))
    assert (rs >= 0).all() and ((cs >= 0) & (cs <= 1)).all()
    assert torch.allclose(rs.mean(0), torch.full((3,), 1 / 3), atol=0.05)
    # Dir(0.2) is sparse: most draws have a dominant task
    assert (rs.max(1).values > 0.8).float().mean() > 0.4
    a = sample_preference(3, 0.2, torch.Generator().manual_seed(9))
    b = sample_preference(3, 0.2, torch.Generator().manual_seed(9))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert gumbel_temperature(0) == 5.0
    assert gumbel_temperature(299) == 5.0
    assert gumbel_temperature(300) == pytest.approx(5 * 0.97)
    assert gumbel_temperature(30_000) == pytest.approx(5 * 0.97**100)
    assert math.isclose(gumbel_temperature(10, every=5, decay=0.5), 1.25)
