"""A weight hypernet on the readers' preference (``[hypernet] weight_input = "readers"``):
each node's BN deltas from c and r restricted to the tasks that read the node (docs/training.md,
"Deltas from the readers' preference")."""

from __future__ import annotations

import pytest
import torch

import dymu
from dymu.architecture import Architecture
from dymu.config import HypernetConfig
from dymu.hypernets import readers_preference

from .conftest import randomize_, tiny_config

#: tasks 0 and 1 share layers 0-1, task 2 leaves after layer 0 (5 layers, 3 tasks)
TREE = Architecture.from_parents([[0, 0, 0], [0, 0, 2], [0, 1, 2], [0, 1, 2]], 3, 5)
SHARED = [(0, 0), (1, 0)]
ALONE = [(1, 2), (2, 0), (2, 1), (2, 2), (3, 0), (3, 1), (3, 2), (4, 0), (4, 1), (4, 2)]


def model_reading(weight_input: str, seed: int = 0) -> dymu.ControllableModel:
    config = tiny_config().model_copy(
        update={"hypernet": HypernetConfig(weight_input=weight_input)}
    )
    torch.manual_seed(seed)
    return randomize_(dymu.create_model(config), seed=seed)


def test_readers_preference_restricts_and_renormalizes():
    r = torch.tensor([0.5, 0.3, 0.2])
    got = readers_preference(r, [(0,), (1, 2), (0, 1, 2)])
    want = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.6, 0.4], [0.5, 0.3, 0.2]])
    torch.testing.assert_close(got, want)
    # tasks the preference gives no weight at all: uniform over them
    got = readers_preference(torch.tensor([1.0, 0.0, 0.0]), [(1, 2)])
    torch.testing.assert_close(got, torch.tensor([[0.0, 0.5, 0.5]]))


def test_readers_follow_the_paths_through_the_tree():
    assert TREE.readers(0, 0) == (0, 1, 2) and TREE.readers(1, 0) == (0, 1)
    assert TREE.readers(1, 2) == (2,) and TREE.readers(4, 1) == (1,)
    assert TREE.readers(0, 1) == () and TREE.readers(1, 1) == ()  # unused nodes
    assert TREE.reader_sets() == ((0,), (0, 1), (0, 1, 2), (1,), (2,))
    assert [TREE.reader_row(*n) for n in [(0, 0), (1, 0), (1, 2), (4, 1)]] == [2, 1, 4, 3]
    assert TREE.reader_row(1, 1) is None  # unused: no readers, no row


@torch.no_grad()
def test_a_node_one_task_reads_has_one_delta_for_every_r():
    r1, r2, c = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.1, 0.2, 0.7]), torch.tensor(0.4)
    readers = model_reading("readers").weight_hypernet
    d1, d2 = readers(r1, c, None, TREE), readers(r2, c, None, TREE)
    assert set(d1) == set(SHARED + ALONE)  # the unused nodes have no readers and no deltas
    for node in ALONE:
        for name, (g, b) in d1[node].items():
            assert torch.equal(g, d2[node][name][0]) and torch.equal(b, d2[node][name][1])
    for node in SHARED:  # their readers' weights moved: so did their deltas
        g1, g2 = next(iter(d1[node].values()))[0], next(iter(d2[node].values()))[0]
        assert (g1 - g2).abs().max() > 1e-4
    # the paper's input, (r, c) for every node, moves them all
    plain = model_reading("preference").weight_hypernet
    p1, p2 = plain(r1, c, None, TREE), plain(r2, c, None, TREE)
    g1, g2 = next(iter(p1[(4, 2)].values()))[0], next(iter(p2[(4, 2)].values()))[0]
    assert (g1 - g2).abs().max() > 1e-4
    with pytest.raises(ValueError, match="needs the tree"):
        readers(r1, c)


@torch.no_grad()
def test_the_folded_tree_computes_the_unfolded_one():
    model = model_reading("readers", seed=3)
    x = torch.randn(2, 3, 24, 32)
    for seed, (r, c) in enumerate([([0.5, 0.3, 0.2], 0.0), ([0.1, 0.0, 0.9], 1.0)]):
        arch = TREE if seed == 0 else Architecture.random(3, model.n_layers, seed=seed)
        folded = model.materialize(r, c, architecture=arch)(x)
        unfolded = model.materialize(r, c, architecture=arch, fold_bn=False)(x)
        deltas = model.weight_hypernet(torch.tensor(r), torch.tensor(c), None, arch)
        direct = model.anchor.forward_tree(x, arch, deltas)
        for task in model.tasks:
            torch.testing.assert_close(folded[task], unfolded[task], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(folded[task], direct[task], atol=1e-4, rtol=1e-4)
        # a task subset keeps its nodes' deltas: the same outputs as in the whole tree
        alone = model.materialize(r, c, ["depth"], architecture=arch)(x)
        torch.testing.assert_close(alone["depth"], folded["depth"], atol=1e-5, rtol=1e-5)
    # the deltas matter: without them the outputs differ
    plain = model.materialize([0.5, 0.3, 0.2], 0.0, architecture=TREE, adapt=False)(x)
    assert (
        plain["depth"] - model.materialize([0.5, 0.3, 0.2], 0.0, architecture=TREE)(x)["depth"]
    ).abs().max() > 1e-4


def test_the_input_is_saved_with_the_model(tmp_path):
    model = model_reading("readers", seed=5)
    dymu.store.save(model, tmp_path / "store", version="v1")
    loaded = dymu.load(tmp_path / "store" / "v1")
    assert loaded.config.hypernet.weight_input == "readers"
    assert loaded.weight_hypernet.inputs == "readers"
    x = torch.randn(1, 3, 24, 32)
    with torch.no_grad():
        a = model.materialize([0.2, 0.5, 0.3], 0.5)(x)
        b = loaded.materialize([0.2, 0.5, 0.3], 0.5)(x)
    for task in model.tasks:
        torch.testing.assert_close(a[task], b[task])
