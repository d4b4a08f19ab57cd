"""The path-table estimator (training/paths.py) and the common trunk (stage "trunk")."""

import pytest
import torch

import dymu
from dymu.architecture import Architecture
from dymu.hypernets import EdgeHypernet
from training.branching import RegularizerSwitches, branching_regularizer
from training.config import load_config
from training.data import build_dataset, collate
from training.paths import (
    all_paths,
    batched_regularizer,
    expected_task_losses,
    merge_probabilities,
    own_path_losses,
    path_losses,
    path_probabilities,
)
from training.pipeline import model_config, run_training
from training.stages import branched_init_
from training.tasks import task_loss

from .conftest import prepared_run


def random_probs(batch: int, n: int, layers: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(2 * torch.randn(batch, layers - 1, n, n, generator=g), dim=-1)


def path_of(arch: Architecture, task: int) -> tuple[int, ...]:
    """(a_0 .. a_{L-2}): the stream task ``task``'s path passes at each layer below the top."""
    return tuple(arch.ancestor(layer, task) for layer in range(arch.n_layers - 1))


@pytest.mark.parametrize(("n", "layers"), [(2, 4), (3, 5), (4, 3)])
def test_path_probabilities_are_the_products_of_parent_choices(n, layers):
    probs = random_probs(3, n, layers)
    got = path_probabilities(probs)
    assert got.shape == (3, n, n ** (layers - 1))
    torch.testing.assert_close(got.sum(-1), torch.ones(3, n))
    for index, path in enumerate(all_paths(n, layers)):
        for j in range(n):
            want = probs[:, layers - 2, j, path[-1]]
            for b in range(layers - 2):
                want = want * probs[:, b, path[b + 1], path[b]]
            torch.testing.assert_close(got[:, j, index], want)


def test_expected_loss_of_a_hard_tree_reads_each_task_s_own_path():
    n, layers = 3, 5
    table = torch.rand(n, n ** (layers - 1))
    arch = Architecture.random(n, layers, seed=4)
    probs = torch.stack(arch.one_hot_nu()).unsqueeze(0)
    got = expected_task_losses(probs, table)[0]
    index = {p: i for i, p in enumerate(all_paths(n, layers))}
    want = torch.stack([table[j, index[path_of(arch, j)]] for j in range(n)])
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize(("n", "layers"), [(2, 5), (3, 5), (4, 3)])
def test_own_path_losses_read_each_task_s_own_stream(n, layers):
    table = torch.rand(n, n ** (layers - 1))
    paths = all_paths(n, layers)
    want = torch.stack([table[j, paths.index((j,) * (layers - 1))] for j in range(n)])
    torch.testing.assert_close(own_path_losses(table), want)


@pytest.mark.parametrize(
    "switches",
    [
        RegularizerSwitches(),
        RegularizerSwitches(inactive_loss=False),
        RegularizerSwitches(layer_weighting=False),
        RegularizerSwitches(affinity=False),
        RegularizerSwitches(dichotomy=False),
    ],
)
def test_batched_regularizer_equals_the_per_preference_path_reading(switches):
    n, layers, batch = 3, 5, 6
    probs = random_probs(batch, n, layers, seed=1)
    g = torch.Generator().manual_seed(2)
    r = torch.stack(
        [torch.tensor([0.7, 0.25, 0.05]), torch.tensor([0.1, 0.1, 0.8]), torch.full((3,), 1 / 3)]
        + [torch.softmax(3 * torch.randn(n, generator=g), 0) for _ in range(batch - 3)]
    )
    c = torch.rand(batch, generator=g)
    affinity = torch.rand(n, n, generator=g)
    omega, l_act, l_inact = batched_regularizer(probs, r, c, affinity, 0.2, 1.5, 0.3, switches)
    for b in range(batch):
        want, stats = branching_regularizer(
            list(probs[b]), r[b], c[b], affinity, 0.2, 1.5, 0.3, switches, "path"
        )
        torch.testing.assert_close(omega[b], want)
        assert float(l_act[b]) == pytest.approx(stats["active_loss"], rel=1e-5, abs=1e-6)
        assert float(l_inact[b]) == pytest.approx(stats["inactive_loss"], rel=1e-5, abs=1e-6)


def test_merge_probability_is_one_on_the_fully_shared_tree_and_zero_when_branched():
    n, layers = 3, 4
    shared = torch.stack(Architecture.fully_shared(n, layers).one_hot_nu())
    branched = torch.stack(Architecture.fully_branched(n, layers).one_hot_nu())
    torch.testing.assert_close(merge_probabilities(shared), torch.ones(n, n, layers - 1))
    eye = torch.eye(n).unsqueeze(-1).expand(n, n, layers - 1)
    torch.testing.assert_close(merge_probabilities(branched), eye)


@pytest.fixture(scope="module")
def tiny():
    config = load_config("scenes-tiny")
    data = build_dataset("scenes", "train", n=6, seed=1, size=tuple(config.input_size))
    torch.manual_seed(0)
    model = dymu.create_model(model_config(config, tuple(data.tasks))).eval()
    return model, data


def test_path_table_matches_the_hard_forward_of_trees(tiny):
    model, data = tiny
    tasks = model.config.tasks
    batches = [collate([data[i] for i in range(0, 4)]), collate([data[i] for i in range(4, 6)])]
    table = path_losses(model.anchor, batches, tasks)
    n, layers = model.n_tasks, model.n_layers
    assert table.shape == (n, n ** (layers - 1))
    index = {p: i for i, p in enumerate(all_paths(n, layers))}
    with torch.no_grad():
        for seed in range(3):
            arch = Architecture.random(n, layers, seed=seed)
            for j, task in enumerate(tasks):
                total = 0.0
                for batch in batches:
                    out = model.anchor.forward_tree(batch["image"], arch)
                    total += float(task_loss(task, out[task.name], batch[task.name])) * len(
                        batch["image"]
                    )
                assert float(table[j, index[path_of(arch, j)]]) == pytest.approx(
                    total / 6, rel=1e-4
                )


def test_exact_expected_loss_trains_the_hypernet_to_each_task_s_best_path():
    """No regularizer: from the anchor, the controller must move to the paths the table ranks
    best (one tree's: the two lowest layers shared on stream 1), each a product of choices."""
    n, layers = 3, 5
    g = torch.Generator().manual_seed(5)
    target = Architecture.from_parents([(1, 1, 1), (1, 1, 1), (0, 1, 2), (0, 1, 2)])
    index = {p: i for i, p in enumerate(all_paths(n, layers))}
    table = 1 + torch.rand(n, n ** (layers - 1), generator=g)
    for j in range(n):
        table[j, index[path_of(target, j)]] = 0.0
    torch.manual_seed(0)
    hyper = EdgeHypernet(n, layers, embed_dim=8, hidden=(16,))
    branched_init_(hyper, 3.0)
    opt = torch.optim.Adam(hyper.parameters(), lr=1e-2)
    r, c = torch.full((4, n), 1 / n), torch.rand(4, generator=g)
    for _ in range(300):
        loss = (r * expected_task_losses(torch.softmax(hyper(r, c), -1), table)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    arch = Architecture.from_logits(hyper(r[0], c[0]).detach())
    assert [path_of(arch, j) for j in range(n)] == [path_of(target, j) for j in range(n)]
    assert path_of(target, 0) != (0,) * (layers - 1)  # the target is not the initial tree


def test_branched_init_starts_at_the_anchor():
    hyper = EdgeHypernet(3, 5)
    branched_init_(hyper, 4.0)
    for r in ([1, 0, 0], [0.2, 0.5, 0.3]):
        arch = Architecture.from_logits(
            hyper(torch.tensor(r, dtype=torch.float), torch.tensor(0.3))
        )
        assert arch == Architecture.fully_branched(3, 5)


def test_the_trunk_is_shared_then_copied_into_every_stream(tmp_path):
    base = load_config("scenes-tiny")
    config = base.model_copy(
        update={
            "check_preferences": 0,
            "trunk": base.trunk.model_copy(update={"steps": 4, "batch_size": 4}),
            "edge": base.edge.model_copy(
                update={"estimator": "paths", "path_images": 4, "preferences": 4,
                        "branched_init": 2.0, "dense_fraction": 0.5,
                        "path_scale": "single-task"}
            ),
        }
    )  # fmt: skip
    fresh = dymu.create_model(model_config(config, build_dataset("scenes", "train", n=1).tasks))
    vdir = run_training(
        config, tmp_path / "s" / "m", run_dir=tmp_path / "r", device="cpu", progress=False,
        stages=("trunk",),
    )  # fmt: skip
    anchor = dymu.load(vdir).anchor
    for layer in range(anchor.num_layers - 1):
        for j in range(1, anchor.n_tasks):
            for a, b in zip(
                anchor.node(layer, 0).state_dict().values(),
                anchor.node(layer, j).state_dict().values(),
                strict=True,
            ):
                assert torch.equal(a, b)
    # the trunk trained (stream 0 moved) and the top nodes stay each task's own
    assert not torch.equal(
        next(iter(anchor.node(0, 0).parameters())), next(iter(fresh.anchor.node(0, 0).parameters()))
    )
    top = anchor.num_layers - 1
    assert not torch.equal(
        next(iter(anchor.node(top, 0).parameters())), next(iter(anchor.node(top, 1).parameters()))
    )
    # the whole run with trunk and the paths estimator records every stage and the edge stats
    vdir = run_training(
        config, tmp_path / "s" / "m", run_dir=tmp_path / "r2", device="cpu", progress=False
    )
    model = dymu.load(vdir)
    assert set(model.manifest["training"]["stages"]) == {
        "trunk", "anchor", "affinity", "edge", "weight",
    }  # fmt: skip


def _calibrated_run(tmp_path, calibration, path_split="calibration"):
    base = load_config("scenes-tiny")
    edge = {"estimator": "trees", "path_images": 4, "path_scale": "loss-scale"}
    config = base.model_copy(
        update={
            "data": base.data.model_copy(update={"calibration_options": calibration}),
            "edge": base.edge.model_copy(update={**edge, "path_split": path_split}),
        }
    )
    return prepared_run(tmp_path, config, ("edge",))


def test_the_path_table_reads_the_calibration_split_not_the_training_images(tmp_path):
    from training.stages import path_table

    calibration = {"n": 4, "seed": 7}
    run = _calibrated_run(tmp_path / "a", calibration)
    data = build_dataset("scenes", "train", size=tuple(run.config.input_size), **calibration)
    assert len(run.calibration_set) == 4
    tasks = run.model.config.tasks
    expected = path_losses(run.model.anchor.eval(), [collate([data[i] for i in range(4)])], tasks)
    scales = torch.tensor([t.loss_scale for t in tasks]).unsqueeze(1)
    torch.testing.assert_close(path_table(run), expected * scales, rtol=1e-4, atol=1e-6)
    # without a calibration split the same run reads training images: another table
    plain = _calibrated_run(tmp_path / "b", None)
    plain.model.load_state_dict(run.model.state_dict())
    assert plain.calibration_set is None
    assert not torch.allclose(path_table(plain), path_table(run))


def test_path_split_training_reads_the_training_images_beside_a_calibration_split(tmp_path):
    from training.stages import path_table, table_split

    calibration = {"n": 4, "seed": 7}
    cal = _calibrated_run(tmp_path / "a", calibration)
    training = _calibrated_run(tmp_path / "b", calibration, path_split="training")
    plain = _calibrated_run(tmp_path / "c", None)
    for other in (training, plain):
        other.model.load_state_dict(cal.model.state_dict())
    assert training.calibration_set is not None  # stream selection may still read it
    # the same training images as a run without a calibration split (same seed, same draw)
    torch.testing.assert_close(path_table(training), path_table(plain))
    assert not torch.allclose(path_table(training), path_table(cal))
    assert [table_split(r) for r in (cal, training, plain)] == [
        "calibration", "training", "training",
    ]  # fmt: skip


def test_asking_for_a_calibration_split_the_config_lacks_is_a_config_error():
    from dymu.errors import ConfigError
    from training.data import split_dataset

    with pytest.raises(ConfigError, match="calibration_options"):
        split_dataset(load_config("scenes-tiny"), calibration=True)
