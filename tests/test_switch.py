"""The fast preference switch (dymu.materialize.Skeleton): a tree is folded once, a new
preference only recomputes its adapted weights. Same outputs as the unfolded reference forward,
no state leaking between preferences, and no stale weights after the model changes."""

from __future__ import annotations

import numpy as np
import torch

import dymu
from dymu.anchor import FoldedConv

from .conftest import randomize_, tiny_config


def reference(model, net, x) -> dict[str, torch.Tensor]:
    """The tree run node by node with BN unfolded and the deltas applied functionally."""
    pref = net.preference
    deltas = model.bn_deltas(pref, nodes=net.architecture.node_list(net.task_indices))
    with torch.no_grad():
        return model.anchor.forward_tree(x, net.architecture, deltas, net.task_indices)


def outputs(net, x) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return net(x)


def close(a, b, tol=1e-4) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=tol, rtol=tol) for k in a)


def preferences(n: int, count: int, seed: int = 0) -> list[tuple[list[float], float]]:
    rng = np.random.default_rng(seed)
    return [(list(rng.dirichlet(np.ones(n))), float(rng.uniform())) for _ in range(count)]


def test_switch_equals_the_unfolded_reference(tiny_model):
    x = torch.randn(2, 3, 24, 32, generator=torch.Generator().manual_seed(0))
    for tasks in (None, ["depth"], ["normals", "segmentation"]):
        for r, c in preferences(3, 6):
            net = tiny_model.materialize(r, c, tasks)
            assert close(outputs(net, x), reference(tiny_model, net, x))
            unfolded = tiny_model.materialize(r, c, tasks, fold_bn=False)
            assert close(outputs(net, x), outputs(unfolded, x))


def test_preferences_of_one_tree_share_the_skeleton_but_not_their_weights(tiny_model):
    arch = dymu.Architecture.fully_branched(3, tiny_model.n_layers)
    x = torch.randn(1, 3, 24, 32, generator=torch.Generator().manual_seed(1))
    a = tiny_model.materialize([1, 0, 0], 0.1, architecture=arch)
    before = outputs(a, x)
    b = tiny_model.materialize([0, 0, 1], 0.9, architecture=arch)
    assert not close(outputs(b, x), before)  # the deltas differ, so do the outputs
    assert close(outputs(a, x), before, tol=0)  # a is untouched by b's switch
    assert len(tiny_model._skeletons) == 1  # one tree, one skeleton
    a_params, b_params = dict(a.named_parameters()), dict(b.named_parameters())
    assert a_params.keys() == b_params.keys()
    shared = [k for k in a_params if a_params[k] is b_params[k]]
    own = [k for k in a_params if a_params[k] is not b_params[k]]
    assert any(k.startswith("heads.") for k in shared)  # unadapted weights are shared
    assert own and all(k.startswith("nodes.") for k in own)  # adapted convs are per preference
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in b.modules())
    # Each folded block is one module, so a preference copies exactly its adapted convs and
    # their ancestors: nothing inside a conv, no Sequential of (conv, Identity, activation).
    a_mods, b_mods = dict(a.named_modules()), dict(b.named_modules())
    copied = [k for k in a_mods if a_mods[k] is not b_mods[k]]
    convs = {k.rsplit(".", 1)[0] for k in own}
    assert all(isinstance(b_mods[k], FoldedConv) for k in convs)
    ancestors = {k.rsplit(".", i)[0] for k in convs for i in range(1, k.count(".") + 1)}
    assert set(copied) == convs | ancestors | {""}


def test_a_hook_on_a_switched_tree_does_not_reach_the_others(tiny_model):
    a = tiny_model.materialize([1, 1, 1], 0.5)
    b = tiny_model.materialize([1, 1, 1.5], 0.5)
    calls = []
    b.nodes[next(iter(b.nodes))].register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(1, 3, 24, 32)
    outputs(a, x)
    assert calls == []
    outputs(b, x)
    assert calls == [1]


def test_changed_weights_are_never_served_stale():
    torch.manual_seed(0)
    model = randomize_(dymu.create_model(tiny_config()), seed=3)
    x = torch.randn(1, 3, 24, 32, generator=torch.Generator().manual_seed(2))
    r, c = [0.5, 0.3, 0.2], 0.4
    model.materialize(r, c)  # builds the skeleton
    with torch.no_grad():  # an optimizer step would do this: in place
        for p in model.anchor.parameters():
            p.mul_(1.1)
        for p in model.weight_hypernet.parameters():
            p.add_(0.01)
    net = model.materialize(r, c)
    assert close(outputs(net, x), reference(model, net, x))
    other = randomize_(dymu.create_model(tiny_config()), seed=4)
    model.load_state_dict(other.state_dict())
    net = model.materialize(r, c)
    assert close(outputs(net, x), outputs(other.materialize(r, c), x))
    # a parameter replaced outright (not in place) is seen too
    conv = next(m for m in model.anchor.node(0, 0).modules() if isinstance(m, torch.nn.Conv2d))
    conv.weight = torch.nn.Parameter(conv.weight.detach() * 0.5)
    net = model.materialize(r, c)
    assert close(outputs(net, x), reference(model, net, x))


def test_without_adaptation_the_switch_uses_the_anchor_bn(tiny_model):
    x = torch.randn(1, 3, 24, 32)
    net = tiny_model.materialize([0.2, 0.3, 0.5], 0.7, adapt=False)
    with torch.no_grad():
        ref = tiny_model.anchor.forward_tree(x, net.architecture, None, net.task_indices)
    assert close(outputs(net, x), ref)


def test_the_skeleton_cache_is_bounded(tiny_model):
    from dymu.model import MAX_SKELETONS

    rows = [(a, b, c) for a in range(3) for b in range(3) for c in range(3)]
    trees, seen = [], set()
    for first in rows:  # distinct trees (ids), until two more than the cache keeps
        for second in rows:
            parents = [first, second] + [(0, 1, 2)] * (tiny_model.n_layers - 3)
            arch = dymu.Architecture.from_parents(parents)
            if arch.id not in seen and len(trees) < MAX_SKELETONS + 2:
                seen.add(arch.id)
                trees.append(arch)
    assert len(trees) == MAX_SKELETONS + 2
    x = torch.randn(1, 3, 24, 32)
    for arch in trees:
        net = tiny_model.materialize([1, 1, 1], 0.5, architecture=arch)
    assert close(outputs(net, x), reference(tiny_model, net, x))
    assert len(tiny_model._skeletons) == MAX_SKELETONS  # the oldest two trees were dropped
    assert (trees[0].id, (0, 1, 2)) not in tiny_model._skeletons
    assert (trees[-1].id, (0, 1, 2)) in tiny_model._skeletons


def test_trees_share_their_folded_nodes_and_heads_and_stay_exact(tiny_model):
    shared = dymu.Architecture.from_parents([(0, 0, 0)] * (tiny_model.n_layers - 1))
    branched = dymu.Architecture.fully_branched(3, tiny_model.n_layers)
    x = torch.randn(2, 3, 24, 32, generator=torch.Generator().manual_seed(5))
    a = tiny_model.materialize([0.7, 0.2, 0.1], 0.3, architecture=branched)
    before = outputs(a, x)
    b = tiny_model.materialize([0.1, 0.1, 0.8], 0.9, architecture=shared)
    assert close(outputs(b, x), reference(tiny_model, b, x))
    assert close(outputs(a, x), before, tol=0)  # b's tree left a's untouched
    assert all(a.heads[t] is b.heads[t] for t in a.heads)  # one folded copy of each head
    assert not any(m.training for net in (a, b) for m in net.modules())  # eval throughout
    skeletons = list(tiny_model._skeletons.values())
    first, second = skeletons[-2].template, skeletons[-1].template
    common = first.nodes.keys() & second.nodes.keys()  # l0_s0 at least: both trees use it
    assert common and all(first.nodes[k] is second.nodes[k] for k in common)
    # ... while each preference still gets its own adapted convs
    node = next(iter(common))
    assert a.nodes[node] is not b.nodes[node]
    assert a.nodes[node] is not first.nodes[node]


def test_a_converted_model_is_not_served_from_its_old_skeletons():
    model = randomize_(dymu.create_model(tiny_config()), seed=5)
    x = torch.randn(1, 3, 24, 32, generator=torch.Generator().manual_seed(3))
    r, c = [0.2, 0.5, 0.3], 0.6
    model.materialize(r, c)  # float32 skeleton
    model.double()  # new storage for every tensor: .to() / _apply
    net = model.materialize(r, c)
    out = outputs(net, x.double())
    assert all(v.dtype == torch.float64 for v in out.values())
    assert close(out, reference(model, net, x.double()))
    with torch.no_grad():  # only the weight hypernet's MLP: z is not cached with a skeleton
        model.weight_hypernet.mlp[0].bias.add_(0.5)
    net = model.materialize(r, c)
    assert close(outputs(net, x.double()), reference(model, net, x.double()))


def test_a_frozen_model_trusts_its_skeletons_until_its_weights_are_loaded_or_converted(
    monkeypatch,
):
    model = randomize_(dymu.create_model(tiny_config()), seed=6).eval()
    x = torch.randn(1, 3, 24, 32, generator=torch.Generator().manual_seed(4))
    r, c = [0.3, 0.3, 0.4], 0.2
    reads = []
    stamp = model._weights_stamp
    monkeypatch.setattr(model, "_weights_stamp", lambda: reads.append(1) or stamp())
    assert model.freeze() is model and model.frozen
    model.materialize(r, c)
    model.materialize([0.1, 0.1, 0.8], 0.9)
    assert len(reads) == 1  # the first build only: no version counters read per switch
    model.unfreeze()
    model.materialize(r, c)
    assert len(reads) == 2  # unfrozen: every switch checks the weights again
    model.freeze()
    # weights loaded through the model or through its anchor: not served from the old folds
    for target, seed in ((model, 7), (model.anchor, 8)):
        before = outputs(model.materialize(r, c), x)
        other = randomize_(dymu.create_model(tiny_config()), seed=seed)
        target.load_state_dict((other if target is model else other.anchor).state_dict())
        assert model.frozen
        net = model.materialize(r, c)
        assert not close(outputs(net, x), before)
        assert close(outputs(net, x), reference(model, net, x))
    model.double()  # a conversion rebuilds too
    net = model.materialize(r, c)
    assert close(outputs(net, x.double()), reference(model, net, x.double()))
    model.train()  # training changes weights: the model is no longer frozen
    assert not model.frozen
