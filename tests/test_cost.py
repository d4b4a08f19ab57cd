"""The analytic cost model agrees with torch's FlopCounterMode and with hand-made trees."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import dymu
from dymu.architecture import Architecture
from dymu.cost import CostModel
from dymu.shared import HardSharedNet, shared_cost

from .conftest import randomize_, tiny_config

MODEL = randomize_(dymu.create_model(tiny_config(n_tasks=3)), seed=5)


def counted_flops(module, x) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(x)
    return counter.get_total_flops()


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    subset=st.sets(st.sampled_from(MODEL.tasks), min_size=1),
    hw=st.tuples(st.integers(8, 48), st.integers(8, 48)),
    fold=st.booleans(),
)
def test_flops_equal_flop_counter_mode(seed, subset, hw, fold):
    arch = Architecture.random(3, MODEL.n_layers, seed=seed)
    net = MODEL.materialize([1, 1, 1], 0.5, tasks=sorted(subset), architecture=arch, fold_bn=fold)
    x = torch.randn(1, 3, *hw)
    assert net.cost(hw).flops == counted_flops(net, x)


def test_params_count_the_unfolded_used_nodes():
    for seed in range(5):
        arch = Architecture.random(3, MODEL.n_layers, seed=seed)
        for tasks in (None, ["depth"], ["segmentation", "normals"]):
            net = MODEL.materialize([1, 1, 1], 0.5, tasks=tasks, architecture=arch, fold_bn=False)
            assert net.cost().params == sum(p.numel() for p in net.parameters())


def test_full_anchor_cost_is_n_streams():
    hw = MODEL.input_size
    anchor = MODEL.anchor_cost()
    assert anchor.flops == counted_flops(MODEL.anchor, torch.randn(1, 3, *hw))
    assert anchor.params == sum(p.numel() for p in MODEL.anchor.parameters())
    branched = MODEL.cost(Architecture.fully_branched(3, MODEL.n_layers))
    assert branched == anchor


def test_hand_made_trees_cost_what_their_used_nodes_cost():
    table = MODEL.cost_model.node_costs()
    L = MODEL.n_layers
    shared = MODEL.cost(Architecture.fully_shared(3, L, stream=2))
    expected = sum(table.node_flops[l][2] for l in range(L - 1))
    expected += sum(table.node_flops[L - 1][j] + table.head_flops[j] for j in range(3))
    assert shared.flops == expected
    # the streams are identical recipes, so a shared tree saves exactly (N-1) nodes per layer
    one_stream = sum(table.node_flops[l][0] for l in range(L - 1))
    assert MODEL.anchor_cost().flops - shared.flops == 2 * one_stream
    # a task subset of a fully branched tree costs that many streams
    single = MODEL.cost(Architecture.fully_branched(3, L), tasks=["depth"])
    assert single.flops == sum(table.node_flops[l][1] for l in range(L)) + table.head_flops[1]


def test_flops_scale_with_input_size_and_batch_is_per_image():
    small, big = MODEL.anchor_cost((24, 32)), MODEL.anchor_cost((48, 64))
    assert big.flops == pytest.approx(4 * small.flops, rel=0.01)
    assert big.params == small.params
    net = MODEL.materialize([1, 1, 1], 0.0)
    assert counted_flops(net, torch.randn(3, 3, 24, 32)) == 3 * net.cost((24, 32)).flops


def test_cost_model_needs_no_weights():
    """Cost depends on the configuration only; building it allocates no real tensors."""
    cm = CostModel(tiny_config(n_tasks=2))
    assert cm.anchor_cost((24, 32)).flops > 0
    with pytest.raises(ValueError):
        cm.node_costs((0, 32))
    with pytest.raises(ValueError):
        cm.architecture_cost(Architecture.fully_branched(3, 5))


def test_cost_fraction_and_units():
    anchor = MODEL.anchor_cost()
    shared = MODEL.cost(Architecture.fully_shared(3, MODEL.n_layers))
    assert 0 < shared.fraction_of(anchor) < 1
    assert anchor.gflops == anchor.flops / 1e9
    assert (shared + anchor).flops == shared.flops + anchor.flops


@pytest.mark.parametrize("tasks", [None, ["depth"], ["normals", "segmentation"]])
@pytest.mark.parametrize("hw", [(24, 32), (17, 40)])
def test_hard_shared_cost_is_what_the_network_counts(tasks, hw):
    """The cost model's hard-shared figure (one stream + the heads) equals FlopCounterMode and
    the parameter count of a real :class:`HardSharedNet` (unfolded), for any head subset."""
    net = HardSharedNet(MODEL.config, tasks).eval()
    cost = net.cost(hw)
    assert cost.flops == counted_flops(net, torch.randn(1, 3, *hw))
    assert cost.params == sum(p.numel() for p in net.parameters())
    streams = None if tasks is None else [MODEL.tasks.index(t) for t in tasks]
    assert (
        cost
        == MODEL.cost_model.hard_shared_cost(hw, streams)
        == shared_cost(MODEL.config, tasks, hw)
    )
    # one shared node per layer: with two heads or more, cheaper than the fully shared tree
    # (whose top layer has a node per task); for one head the two are the same network
    tree = MODEL.cost(Architecture.fully_shared(3, MODEL.n_layers), hw, tasks)
    assert cost.flops < tree.flops if tasks is None or len(tasks) > 1 else cost == tree


def test_hard_shared_net_from_anchor_is_stream_with_every_head():
    """Copied from the anchor with BN folded, the network's task-j output for j = stream is that
    single-task stream's output, and the other heads read the same shared features."""
    x = torch.randn(2, 3, 24, 32)
    for stream in (0, 2):
        net = HardSharedNet.from_anchor(MODEL.anchor, stream=stream)
        assert not net.training and not any(p.requires_grad for p in net.parameters())
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
        with torch.no_grad():
            out = net(x)
            own = MODEL.anchor.eval()(x, tasks=[stream])[MODEL.tasks[stream]]
        assert set(out) == set(MODEL.tasks)
        torch.testing.assert_close(out[MODEL.tasks[stream]], own, rtol=1e-4, atol=1e-5)
    with pytest.raises(dymu.TaskError, match="unknown task"):
        HardSharedNet(MODEL.config, ["depth", "colour"])
    with pytest.raises(dymu.TaskError, match="unknown task"):
        shared_cost(MODEL.config, ["colour"])
