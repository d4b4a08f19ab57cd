"""Hypernets as docs/design.md §1 specifies them (paper App. G)."""

import torch

import dymu
from dymu.hypernets import EdgeHypernet, PreferenceEmbedding, WeightHypernet

from .conftest import tiny_config


def test_preference_embedding_is_the_weighted_sum():
    emb = PreferenceEmbedding(3, 32)
    r, c = torch.tensor([0.2, 0.3, 0.5]), torch.tensor(0.7)
    expected = (
        0.2 * emb.task_embeddings[0]
        + 0.3 * emb.task_embeddings[1]
        + 0.5 * emb.task_embeddings[2]
        + 0.7 * emb.cost_embedding
    )
    assert torch.allclose(emb(r, c), expected)
    batched = emb(torch.stack([r, r]), torch.stack([c, c]))
    assert batched.shape == (2, 32) and torch.allclose(batched[1], expected)


def test_edge_hypernet_shape_and_layers():
    h = EdgeHypernet(n_tasks=4, n_layers=6)
    assert h(torch.full((4,), 0.25), torch.tensor(0.5)).shape == (5, 4, 4)
    assert h(torch.full((3, 4), 0.25), torch.zeros(3)).shape == (3, 5, 4, 4)
    hidden = [m for m in h.mlp if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in hidden] == [100, 100]
    assert h.embedding.task_embeddings.shape == (4, 32)


def test_weight_hypernet_starts_at_zero_and_covers_every_bn_channel():
    model = dymu.create_model(tiny_config())
    deltas = model.weight_hypernet(torch.tensor([0.1, 0.1, 0.8]), torch.tensor(1.0))
    layout = dict(model.anchor.bn_layout())
    assert set(deltas) == set(layout)
    for node, bns in layout.items():
        assert [name for name, _ in bns] == list(deltas[node])
        for name, ch in bns:
            dg, db = deltas[node][name]
            assert dg.shape == db.shape == (ch,)
            assert torch.count_nonzero(dg) == 0 and torch.count_nonzero(db) == 0
    hidden = [m for m in model.weight_hypernet.mlp if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in hidden] == [100, 100, 100]
    assert model.weight_hypernet.num_bn_channels == sum(
        ch for bns in layout.values() for _, ch in bns
    )


def test_weight_hypernet_subset_of_nodes():
    model = dymu.create_model(tiny_config())
    deltas = model.bn_deltas([1, 1, 1], 0.0, nodes=[(0, 1), (4, 2)])
    assert set(deltas) == {(0, 1), (4, 2)}


def test_weight_hypernet_layout_skips_nodes_without_bn():
    h = WeightHypernet(2, [((0, 0), [("bn", 4)]), ((0, 1), [])])
    assert set(h(torch.tensor([0.5, 0.5]), torch.tensor(0.0))) == {(0, 0)}


def test_control_params_count_both_hypernets():
    model = dymu.create_model(tiny_config())
    total = sum(p.numel() for p in model.edge_hypernet.parameters())
    total += sum(p.numel() for p in model.weight_hypernet.parameters())
    assert model.control_params == total


def test_the_functional_mlp_is_the_module_bitwise_with_the_same_gradients():
    from dymu.hypernets import run_mlp

    torch.manual_seed(0)
    h = EdgeHypernet(n_tasks=3, n_layers=4)
    x = torch.randn(5, 32, requires_grad=True)
    by_module, by_function = h.mlp(x), run_mlp(h.mlp, x)
    assert torch.equal(by_module, by_function) and (by_function == 0).any()  # ReLU ran
    (g_module,) = torch.autograd.grad(by_module.square().sum(), x)
    (g_function,) = torch.autograd.grad(by_function.square().sum(), x)
    assert torch.equal(g_module, g_function)
    r, c = torch.tensor([0.2, 0.3, 0.5]), torch.tensor(0.4)
    n = 3
    logits = torch.stack([hd(h.mlp(h.embedding(r, c))).unflatten(-1, (n, n)) for hd in h.heads])
    assert torch.equal(h(r, c), logits)
    wh = dymu.create_model(tiny_config()).weight_hypernet
    assert torch.equal(wh.features(r, c), wh.mlp(wh.embedding(r, c)))
