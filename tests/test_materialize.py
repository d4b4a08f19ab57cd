"""The materialized tree computes what the soft forward computes with one-hot nu."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import dymu
from dymu.architecture import Architecture
from dymu.errors import ArchitectureError, InputError, PreferenceError, TaskError

from .conftest import randomize_, tiny_config


def one_hot_nu(arch: Architecture) -> list[torch.Tensor]:
    return arch.one_hot_nu()


def soft_reference(model, arch, r, c, x, tasks=None, adapt=True):
    """Soft forward with one-hot nu, deltas of the nodes the tree uses (as materialize does)."""
    idx = None if tasks is None else [model.tasks.index(t) for t in tasks]
    deltas = model.bn_deltas(r, c) if adapt else None
    with torch.no_grad():
        return model(x, one_hot_nu(arch), deltas, idx)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


MODELS = {n: randomize_(dymu.create_model(tiny_config(n_tasks=n)), seed=n) for n in (2, 3, 4)}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.sampled_from([2, 3, 4]), data=st.data())
def test_materialized_equals_soft_forward_with_one_hot_nu(n, data):
    model = MODELS[n]
    parents = data.draw(
        st.lists(
            st.lists(st.integers(0, n - 1), min_size=n, max_size=n),
            min_size=model.n_layers - 1,
            max_size=model.n_layers - 1,
        )
    )
    arch = Architecture.from_parents(parents)
    r = data.draw(st.lists(st.floats(0.01, 1.0), min_size=n, max_size=n))
    c = data.draw(st.floats(0.0, 1.0))
    subset = data.draw(
        st.one_of(
            st.none(), st.lists(st.sampled_from(model.tasks), min_size=1, max_size=n, unique=True)
        )
    )
    fold = data.draw(st.booleans())
    x = torch.randn(2, 3, 24, 32, generator=torch.Generator().manual_seed(len(parents[0])))
    net = model.materialize(r, c, tasks=subset, architecture=arch, fold_bn=fold)
    with torch.no_grad():
        out = net(x)
    ref = soft_reference(model, arch, r, c, x, subset)
    assert max_diff(out, ref) < 1e-4
    assert set(out) == set(subset or model.tasks)


def test_deltas_change_the_output(tiny_model):
    """Guard for the test above: adaptation is not a no-op on the randomized model."""
    x = torch.randn(1, 3, 24, 32)
    arch = Architecture.random(3, tiny_model.n_layers, seed=1)
    with torch.no_grad():
        adapted = tiny_model.materialize([1, 1, 1], 0.5, architecture=arch)(x)
        plain = tiny_model.materialize([1, 1, 1], 0.5, architecture=arch, adapt=False)(x)
    assert max_diff(adapted, plain) > 1e-2
    assert max_diff(plain, soft_reference(tiny_model, arch, [1, 1, 1], 0.5, x, adapt=False)) < 1e-4


def test_materialize_uses_the_arg_max_tree_and_runs_each_used_node_once(tiny_model):
    arch = tiny_model.architecture([0.7, 0.2, 0.1], 0.4)
    logits = tiny_model.edge_logits([0.7, 0.2, 0.1], 0.4)
    assert arch.parents == tuple(tuple(row) for row in logits.argmax(-1).tolist())
    net = tiny_model.materialize([0.7, 0.2, 0.1], 0.4)
    assert net.architecture == arch
    calls: list[str] = []
    for name, node in net.nodes.items():
        node.register_forward_hook(lambda m, i, o, name=name: calls.append(name))
    with torch.no_grad():
        net(torch.randn(1, 3, 24, 32))
    assert sorted(calls) == sorted(net.nodes.keys())
    assert len(calls) == arch.num_used_nodes() == net.num_nodes


def test_folded_model_has_no_batchnorm_and_no_grad(tiny_model):
    net = tiny_model.materialize([1, 0, 0], 1.0)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert not any(p.requires_grad for p in net.parameters())
    assert not net.training
    # the anchor itself is untouched by materialization
    assert any(isinstance(m, nn.BatchNorm2d) for m in tiny_model.anchor.modules())


def test_materialize_does_not_modify_the_anchor(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.anchor.state_dict().items()}
    tiny_model.materialize([0.2, 0.3, 0.5], 0.1)
    after = tiny_model.anchor.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_normals_are_unit_vectors(tiny_model):
    with torch.no_grad():
        out = tiny_model.materialize([1, 1, 1], 0)(torch.randn(2, 3, 24, 32))
    norms = out["normals"].norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    assert out["segmentation"].shape == (2, 5, 24, 32)
    assert out["depth"].shape == (2, 1, 24, 32)


def test_any_input_size_works(tiny_model):
    net = tiny_model.materialize([1, 1, 1], 0.5)
    with torch.no_grad():
        out = net(torch.randn(1, 3, 37, 50))
    assert out["segmentation"].shape[-2:] == (37, 50)


@pytest.mark.parametrize(
    ("x", "err", "reason"),
    [
        (torch.randn(1, 1, 24, 32), InputError, "1 channels"),
        (torch.randn(3, 24, 32), InputError, "shape"),
        (torch.zeros(1, 3, 24, 32, dtype=torch.uint8), InputError, "floating-point"),
        ("image", InputError, "tensor"),
    ],
)
def test_bad_inputs_are_refused_before_torch_runs(tiny_model, x, err, reason):
    net = tiny_model.materialize([1, 1, 1], 0.5)
    with pytest.raises(err, match=reason):
        net(x)
    with pytest.raises(err, match=reason):
        tiny_model.anchor(x)


def test_bad_preference_task_and_tree_are_refused(tiny_model):
    with pytest.raises(PreferenceError):
        tiny_model.materialize([1, 1], 0.5)
    with pytest.raises(PreferenceError):
        tiny_model.architecture([1, 1, 1], 2.0)
    with pytest.raises(TaskError, match="unknown"):
        tiny_model.materialize([1, 1, 1], 0.5, tasks=["edges"])
    with pytest.raises(ArchitectureError):
        tiny_model.materialize([1, 1, 1], 0.5, architecture=Architecture.fully_branched(3, 2))


def test_batched_nu_matches_per_sample_runs(tiny_model):
    """(B, N, N) nu mixes each sample with its own distribution."""
    x = torch.randn(2, 3, 24, 32)
    a, b = (Architecture.random(3, tiny_model.n_layers, seed=s) for s in (3, 4))
    nu = [torch.stack([p, q]) for p, q in zip(one_hot_nu(a), one_hot_nu(b), strict=True)]
    with torch.no_grad():
        both = tiny_model(x, nu)
        first = tiny_model(x[:1], one_hot_nu(a))
        second = tiny_model(x[1:], one_hot_nu(b))
    for k in both:
        assert torch.allclose(both[k][:1], first[k], atol=1e-5)
        assert torch.allclose(both[k][1:], second[k], atol=1e-5)


def test_forward_tree_matches_materialized_and_is_differentiable(tiny_model):
    x = torch.randn(2, 3, 24, 32)
    arch = Architecture.random(3, tiny_model.n_layers, seed=12)
    r, c = [0.5, 0.1, 0.4], 0.3
    net = tiny_model.materialize(r, c, architecture=arch, tasks=["depth", "normals"])
    rt, ct = torch.tensor([0.5, 0.1, 0.4]), torch.tensor(0.3)
    deltas = tiny_model.weight_hypernet(rt, ct)
    out = tiny_model.anchor.forward_tree(x, arch, deltas, tasks=[1, 2])
    with torch.no_grad():
        ref = net(x)
    assert max_diff({k: v.detach() for k, v in out.items()}, ref) < 1e-4
    sum(v.sum() for v in out.values()).backward()
    used = arch.used_nodes([1, 2])
    for (l, j), head in zip(
        tiny_model.weight_hypernet.layout, tiny_model.weight_hypernet.heads.values()
    ):
        grad = head.weight.grad
        if j in used[l]:
            assert grad is not None and grad.abs().sum() > 0, (l, j)
        else:
            assert grad is None or grad.abs().sum() == 0, (l, j)


def test_unit_normals_is_f_normalize_with_finite_gradients():
    """The normals head's normalization (faster than F.normalize on the CPU) is F.normalize."""
    import torch.nn.functional as F

    from dymu.anchor import unit_normals

    x = torch.randn(2, 3, 9, 7)
    x[0, :, 0, 0] = 0  # a zero vector: F.normalize gives 0 there, and so must this
    torch.testing.assert_close(unit_normals(x), F.normalize(x, dim=1), atol=1e-6, rtol=1e-6)
    x.requires_grad_(True)
    unit_normals(x).square().sum().backward()
    assert torch.isfinite(x.grad).all()
