"""Every term of the edge hypernet's regularizer against hand-computed values (paper Eq. 3, 5,
6, 9; docs/design.md §7)."""

import math

import pytest
import torch

from dymu.preference import sample_preference
from training.branching import (
    RegularizerSwitches,
    active_loss,
    branching_regularizer,
    gumbel_temperature,
    inactive_loss,
    layer_weight,
    merge_probability,
    path_active_loss,
    path_inactive_loss,
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


@pytest.mark.parametrize("reading", ["path", "stream"])
def test_branching_regularizer_combines_the_terms(reading):
    # Every path keeps to its own stream, so both readings give the same numbers.
    probs = [E.clone(), E.clone()]
    aff = torch.full((3, 3), 0.5)
    r = torch.tensor([0.45, 0.45, 0.1])
    omega, stats = branching_regularizer(
        probs, r, 0.5, aff, tau=0.2, lambda_active=1.0, lambda_inactive=0.1, reading=reading
    )
    assert stats["active_loss"] == pytest.approx(2 / 3)
    assert stats["inactive_loss"] == pytest.approx(4.0)
    assert float(omega) == pytest.approx(0.5 * 2 / 3 + 0.1 * 4.0)
    omega0, _ = branching_regularizer(probs, r, 0.0, aff, tau=0.2, reading=reading)
    assert float(omega0) == pytest.approx(0.4)  # c = 0: only the inactive term
    off, _ = branching_regularizer(
        probs,
        r,
        0.5,
        aff,
        tau=0.2,
        switches=RegularizerSwitches(inactive_loss=False),
        reading=reading,
    )
    assert float(off) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="reading"):
        branching_regularizer(probs, r, 0.5, aff, tau=0.2, reading="nodes")


def _tree(*parents):
    """Hard parent choices per boundary (child stream -> parent stream), as probs."""
    return [torch.nn.functional.one_hot(torch.tensor(p), 3).float() for p in parents]


def test_merge_probability_on_hard_trees():
    assert [float(m) for m in merge_probability(_tree([0, 1, 2], [0, 1, 2]), 0, 1)] == [0, 0]
    # child (2, 1) reads node (1, 0): the paths of tasks 0 and 1 meet at layer 1 and stay met
    assert [float(m) for m in merge_probability(_tree([0, 1, 2], [0, 0, 2]), 0, 1)] == [1, 1]
    # they meet at layer 0 only
    assert [float(m) for m in merge_probability(_tree([2, 2, 2], [0, 1, 2]), 0, 1)] == [1, 0]


def test_merge_probability_by_hand_and_by_sampling():
    # One boundary, two tasks: the paths meet iff both children pick the same parent.
    nu = torch.tensor([[0.7, 0.3, 0.0], [0.4, 0.6, 0.0], [0.0, 0.0, 1.0]])
    (m,) = merge_probability([nu], 0, 1)
    assert float(m) == pytest.approx(0.7 * 0.4 + 0.3 * 0.6)
    # Three boundaries of soft choices against 20,000 sampled trees.
    g = torch.Generator().manual_seed(0)
    probs = [torch.softmax(2 * torch.randn(3, 3, generator=g), -1) for _ in range(3)]
    exact = torch.stack(merge_probability(probs, 0, 2))
    draws = 20_000
    a, b = torch.zeros(draws, dtype=torch.long), torch.full((draws,), 2)
    met = torch.zeros(3)
    for layer in (2, 1, 0):
        choice = torch.multinomial(probs[layer], draws, replacement=True, generator=g)  # (3, D)
        a, b = choice[a, torch.arange(draws)], choice[b, torch.arange(draws)]
        met[layer] = (a == b).float().mean()
    assert torch.allclose(exact, met, atol=0.015)


def test_path_reading_closes_the_stream_loophole():
    # Task 0 leaves its stream for the inactive task 2's nodes below the top; task 1 keeps to
    # stream 1: the paths never meet, yet the stream reading sees no divergence (node (l, 0)
    # is unused below the top, so its pair term has weight 0).
    probs = _tree([0, 1, 2], [0, 1, 2], [0, 1, 2], [2, 1, 2])
    r = torch.tensor([0.45, 0.45, 0.1])
    use = usage_probability(probs)
    assert float(active_loss(probs, use, [0, 1], None)) == 0.0
    weights = sum(layer_weight(b, 5) for b in range(4))  # 3/5 + 2/5 + 1/5 + 0
    assert float(path_active_loss(probs, [0, 1], None)) == pytest.approx(2 * 2 * weights)
    # the inactive task 2 follows task 0's path all the way down: nothing to pay
    assert float(path_inactive_loss(probs, [0, 1], [2])) == 0.0
    _, stats = branching_regularizer(probs, r, 1.0, None, tau=0.2)
    assert stats["active_loss"] == pytest.approx(4 * weights)


def test_path_losses_vanish_on_the_fully_shared_tree():
    probs = _tree([1, 1, 1], [1, 1, 1], [1, 1, 1])
    assert float(path_active_loss(probs, [0, 1, 2], torch.ones(3, 3))) == 0.0
    assert float(path_inactive_loss(probs, [0], [1, 2])) == 0.0


@pytest.mark.parametrize("reading", ["path", "stream"])
def test_regularizer_gradient_reaches_the_logits(reading):
    logits = torch.randn(2, 3, 3, requires_grad=True)
    probs = list(torch.softmax(logits, -1))
    omega, _ = branching_regularizer(
        probs, torch.tensor([0.4, 0.4, 0.2]), 1.0, torch.ones(3, 3), tau=0.3, reading=reading
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


def test_row_minmax_affinity_cannot_rank_two_tasks_and_rdm_spearman_can():
    """App. D's row normalization maps a 2-task row (0, d) to (1, 0): A(0, 1) = 0 for any pair of
    different streams, close or far. RSA's Spearman score orders them, and equals scipy's rho
    of the similarity matrices' upper triangles."""
    from scipy.stats import spearmanr

    g = torch.Generator().manual_seed(1)
    base = torch.randn(30, 8, generator=g)
    near = base + 0.1 * torch.randn(30, 8, generator=g)
    far = torch.randn(30, 8, generator=g)
    for other in (near, far):
        assert task_affinity([[base, other]])[0, 1] == 0.0
    a_near = task_affinity([[base, near]], "rdm-spearman")
    a_far = task_affinity([[base, far]], "rdm-spearman")
    assert 0.9 < a_near[0, 1] <= 1.0 and a_far[0, 1] < 0.2
    assert torch.equal(a_near, a_near.T) and torch.all(a_near.diagonal() == 1.0)

    def upper(f):
        s = (
            torch.nn.functional.normalize(f.double(), dim=1)
            @ torch.nn.functional.normalize(f.double(), dim=1).T
        )
        i, j = torch.triu_indices(30, 30, offset=1)
        return s[i, j].numpy()

    rho = spearmanr(upper(base), upper(near)).statistic
    assert a_near[0, 1].item() == pytest.approx(rho, abs=1e-6)
    # two layers average; identical streams score 1; a constant stream has no affinity
    two = task_affinity([[base, near], [base, far]], "rdm-spearman")
    assert two[0, 1].item() == pytest.approx((a_near[0, 1] + a_far[0, 1]).item() / 2, abs=1e-6)
    assert torch.allclose(task_affinity([[base, base * 2]], "rdm-spearman"), torch.ones(2, 2))
    flat = task_affinity([[base, torch.ones(30, 8)]], "rdm-spearman")
    assert flat[0, 1] == 0.0 and flat[1, 1] == 1.0
    with pytest.raises(ValueError, match="unknown affinity score"):
        task_affinity([[base, near]], "pearson")


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
