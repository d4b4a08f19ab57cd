import pytest
import torch

from dymu.architecture import Architecture
from dymu.errors import ArchitectureError


def test_fully_shared_uses_one_node_per_layer_below_the_top():
    arch = Architecture.fully_shared(3, 5, stream=1)
    used = arch.used_nodes()
    assert used == ((1,), (1,), (1,), (1,), (0, 1, 2))
    assert arch.num_used_nodes() == 4 + 3


def test_fully_branched_uses_every_node():
    arch = Architecture.fully_branched(4, 3)
    assert arch.used_nodes() == ((0, 1, 2, 3),) * 3
    assert arch.num_used_nodes() == 12


def test_task_subset_drops_nodes_only_other_tasks_use():
    # layer 0 -> 1: streams 0,1 read 0; stream 2 reads 2.  layer 1 -> 2: identity.
    arch = Architecture.from_parents([[0, 0, 2], [0, 1, 2]])
    assert arch.used_nodes() == ((0, 2), (0, 1, 2), (0, 1, 2))
    assert arch.used_nodes([1]) == ((0,), (1,), (1,))
    assert arch.used_nodes([0, 1]) == ((0,), (0, 1), (0, 1))
    assert arch.used_nodes([2]) == ((2,), (2,), (2,))


def test_ancestor_follows_the_path_to_the_head():
    arch = Architecture.from_parents([[0, 0, 2], [1, 1, 0]])
    assert [arch.ancestor(2, j) for j in range(3)] == [0, 1, 2]
    assert [arch.ancestor(1, j) for j in range(3)] == [1, 1, 0]
    assert [arch.ancestor(0, j) for j in range(3)] == [0, 0, 0]
    assert arch.is_shared(0, 0) and not arch.is_shared(2, 0)


def test_json_round_trip_and_stable_id():
    arch = Architecture.random(3, 6, seed=7)
    again = Architecture.from_json(arch.to_json())
    assert again == arch and again.id == arch.id
    assert (
        Architecture.from_parents([[0, 0], [1, 1]]).id
        != Architecture.from_parents([[0, 0], [1, 0]]).id
    )
    # the id is a pure function of the tree
    assert (
        Architecture.from_parents([[0, 0], [1, 1]]).id
        == Architecture.from_parents(((0, 0), (1, 1))).id
    )


def test_from_logits_takes_the_arg_max_parent():
    logits = torch.zeros(2, 3, 3)
    logits[0, :, 2] = 1.0  # every child at layer 1 picks parent 2
    logits[1] = torch.eye(3)
    arch = Architecture.from_logits(logits)
    assert arch.parents == ((2, 2, 2), (0, 1, 2))


@pytest.mark.parametrize(
    ("parents", "n", "layers", "reason"),
    [
        ([[0, 1]], 3, 2, "needs 3 entries"),
        ([[0, 3, 1]], 3, 2, r"in \[0, 3\)"),
        ([[0, -1, 1]], 3, 2, r"in \[0, 3\)"),
        ([[0, 1, 2]], 3, 3, "needs 2 rows"),
    ],
)
def test_invalid_trees_are_refused(parents, n, layers, reason):
    with pytest.raises(ArchitectureError, match=reason):
        Architecture(n, layers, tuple(tuple(r) for r in parents))


def test_invalid_json_and_used_nodes_args():
    with pytest.raises(ArchitectureError):
        Architecture.from_json("{")
    with pytest.raises(ArchitectureError):
        Architecture.from_dict({"parents": []})
    with pytest.raises(ArchitectureError):
        Architecture.fully_branched(2, 2).used_nodes([5])
    with pytest.raises(ArchitectureError):
        Architecture.from_logits(torch.zeros(2, 3, 2))
