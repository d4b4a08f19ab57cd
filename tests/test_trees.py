"""The tree-table estimator (training/trees.py): every hard tree, its objective, the fit."""

import csv
import itertools

import pytest
import torch
from pydantic import ValidationError

import dymu
from dymu.architecture import Architecture
from dymu.errors import ConfigError
from dymu.hypernets import EdgeHypernet
from dymu.preference import sample_preferences, sample_simplex
from training.branching import RegularizerSwitches
from training.config import load_config
from training.data import build_dataset
from training.paths import all_paths, batched_regularizer, expected_task_losses
from training.pipeline import run_training
from training.stages import EdgeObjective, edge_trees_loss
from training.trees import (
    MAX_TREES,
    TooManyTreesError,
    TreeTable,
    full_sharing_pull,
    hard_trees,
    tree_parents,
)

from .test_paths import path_of


def consistent_path_tuples(n: int, layers: int) -> set[tuple[tuple[int, ...], ...]]:
    """Brute force: tuples of one path per task in which two paths that meet on a node agree
    on every layer below it (a node has one parent)."""
    out = set()
    for combo in itertools.product(all_paths(n, layers), repeat=n):
        ok = all(
            combo[i][:b] == combo[j][:b]
            for i, j in itertools.combinations(range(n), 2)
            for b in range(layers - 1)
            if combo[i][b] == combo[j][b]
        )
        if ok:
            out.add(combo)
    return out


def paths_of(arch: Architecture) -> tuple[tuple[int, ...], ...]:
    return tuple(path_of(arch, j) for j in range(arch.n_tasks))


@pytest.mark.parametrize(("n", "layers"), [(2, 3), (2, 5), (3, 3), (3, 4)])
def test_hard_trees_are_exactly_the_consistent_path_tuples(n, layers):
    trees = hard_trees(n, layers)
    got = [tuple(tuple(p) for p in tree.tolist()) for tree in trees]
    assert len(got) == len(set(got))  # no tree twice
    assert set(got) == consistent_path_tuples(n, layers)


def test_the_count_for_the_shipped_shapes():
    assert len(hard_trees(3, 5)) == 26_325
    assert len(hard_trees(2, 5)) == 80


def test_too_many_trees_is_refused_with_the_alternatives():
    with pytest.raises(TooManyTreesError, match=f"more than {MAX_TREES}.*paths"):
        hard_trees(5, 6)


def test_a_run_with_too_many_trees_stops_before_training(tmp_path, monkeypatch):
    """The tree space is checked when the run starts, not after hours of stage 0."""
    import training.trees

    monkeypatch.setattr(training.trees, "MAX_TREES", 100)  # scenes-tiny has 26,325
    base = load_config("scenes-tiny")
    config = base.model_copy(update={"edge": base.edge.model_copy(update={"estimator": "trees"})})
    with pytest.raises(ConfigError, match="more than 100 hard trees"):
        run_training(config, tmp_path / "s" / "m", run_dir=tmp_path / "r", device="cpu",
                     progress=False)  # fmt: skip
    assert not (tmp_path / "r" / "train_log.csv").exists()
    assert not (tmp_path / "s" / "m").exists()


def test_parents_rebuild_each_tree_and_mark_only_its_nodes():
    trees = hard_trees(3, 4)
    parents, used = tree_parents(trees)
    for k in range(0, len(trees), 97):
        arch = Architecture(
            n_tasks=3, n_layers=4, parents=tuple(tuple(row) for row in parents[k].tolist())
        )
        assert paths_of(arch) == tuple(tuple(p) for p in trees[k].tolist())
        nodes = arch.used_nodes()
        for b in range(3):
            assert {s for s in range(3) if used[k, b, s]} == set(nodes[b + 1])


def one_hot_probs(parents: torch.Tensor, n: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(parents, n).double()


@pytest.mark.parametrize("switches", [RegularizerSwitches(), RegularizerSwitches(False, False)])
def test_tree_objective_equals_the_relaxed_objective_on_one_hot_trees(switches):
    """On a hard tree the path estimator's exact objective (expected loss + batched Omega) and
    the tree table's must agree for every preference: two independent computations."""
    n, layers, lam_a, lam_i, tau = 3, 4, 0.7, 0.3, 0.2
    g = torch.Generator().manual_seed(0)
    table = torch.rand(n, n ** (layers - 1), generator=g, dtype=torch.float64)
    aff = torch.rand(n, n, generator=g, dtype=torch.float64)
    tt = TreeTable.build(table, layers, aff, tau, switches)
    r = torch.tensor([[1 / 3] * 3, [0.7, 0.25, 0.05], [1.0, 0, 0], [0.1, 0.1, 0.8]]).double()
    c = torch.tensor([0.0, 0.4, 1.0, 0.9]).double()
    got = tt.objective(r, c, lam_a, lam_i)
    for k in range(0, tt.parents.shape[0], 41):
        probs = one_hot_probs(tt.parents[k], n).expand(len(r), -1, -1, -1)
        task = (r * expected_task_losses(probs, table)).sum(-1)
        omega, _, _ = batched_regularizer(probs, r, c, aff, tau, lam_a, lam_i, switches)
        assert torch.allclose(got[:, k], task + omega, atol=1e-9)


def test_best_trees_follow_r_and_c():
    """Own paths cheapest, every foreign path 10 % worse: at c = 0 with every task active the
    best tree is the anchor; at c = 1 with a strong lambda_A it shares everything; one-hot
    preferences merge the inactive tasks into the active one's path."""
    n, layers = 3, 4
    table = torch.full((n, n ** (layers - 1)), 1.1, dtype=torch.float64)
    for j in range(n):
        table[j, sum(j * n**k for k in range(layers - 1))] = 1.0
    tt = TreeTable.build(table, layers, None, 0.2, RegularizerSwitches())
    uniform = torch.full((1, n), 1 / n, dtype=torch.float64)
    zero, one = torch.zeros(1), torch.ones(1)

    def tree(r, c, lam_a):
        k = int(tt.best(r, c, lam_a, 0.1))
        return Architecture(
            n_tasks=n, n_layers=layers, parents=tuple(map(tuple, tt.parents[k].tolist()))
        )

    assert tree(uniform, zero, 1.0) == Architecture.fully_branched(n, layers)
    shared = tree(uniform, one, 1.0)
    assert len({paths_of(shared)[j] for j in range(n)}) == 1
    assert tree(uniform, one, 0.001) == Architecture.fully_branched(n, layers)  # too weak
    corner = paths_of(tree(torch.tensor([[0.0, 1.0, 0.0]]).double(), zero, 1.0))
    assert corner == ((1, 1, 1),) * 3


def _random_table(seed: int) -> TreeTable:
    n, layers = 3, 3
    g = torch.Generator().manual_seed(seed)
    table = 1 + 0.5 * torch.rand(n, n ** (layers - 1), generator=g, dtype=torch.float64)
    aff = torch.rand(n, n, generator=g, dtype=torch.float64)
    return TreeTable.build(table, layers, aff, 0.2, RegularizerSwitches())


def _active_terms(tt: TreeTable, r: torch.Tensor) -> torch.Tensor:
    """(B, K) L_active of every tree, read off the objective (its c-linear part)."""
    ones = torch.ones(len(r), dtype=torch.float64)
    return tt.objective(r, ones, 1.0, 0.1) - tt.objective(r, 0 * ones, 1.0, 0.1)


def _most_shared(tt: TreeTable, r: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    l_act = _active_terms(tt, r)
    return l_act[torch.arange(len(r)), best] <= l_act.min(-1).values + 1e-12


def test_the_sharing_pull_is_where_a_most_shared_tree_starts_to_win():
    tt = _random_table(3)
    r = sample_simplex(3, 1.0, torch.Generator().manual_seed(4), count=64).double()
    pull = tt.sharing_pull(r, 0.1)
    # just above its pull every preference's best tree is one of its most shared
    assert _most_shared(tt, r, tt.best(r, pull * 1.001 + 1e-12, 1.0, 0.1)).all()
    # just below it, a less shared tree still wins
    pos = pull > 0
    assert pos.sum() > 10 and (~pos).any()  # one active task: nothing to pull, pull 0
    below = tt.best(r[pos], pull[pos] * 0.999, 1.0, 0.1)
    assert not _most_shared(tt, r[pos], below).any()


def test_the_full_sharing_pull_makes_c_1_share_at_every_dense_preference():
    tt = _random_table(5)
    pull = full_sharing_pull(tt, 0.1, seed=7, count=256)
    r = torch.tensor([r for r, _ in sample_preferences(3, 256, 7)], dtype=torch.float64)
    ones = torch.ones(len(r), dtype=torch.float64)
    assert _most_shared(tt, r, tt.best(r, ones, pull * 1.001, 0.1)).all()
    assert not _most_shared(tt, r, tt.best(r, ones, pull * 0.99, 0.1)).all()
    assert pull == pytest.approx(float(tt.sharing_pull(r, 0.1).max()))


def test_the_table_pull_needs_the_tree_estimator():
    edge = load_config("scenes-tiny").edge
    with pytest.raises(ValidationError, match='needs estimator = "trees"'):
        type(edge).model_validate({**edge.model_dump(), "pull_scale": "table"})
    table = {**edge.model_dump(), "pull_scale": "table", "estimator": "trees"}
    assert type(edge).model_validate(table).pull_scale == "table"


def test_edge_trees_loss_fits_the_hypernet_to_the_best_trees():
    n, layers = 2, 4
    g = torch.Generator().manual_seed(1)
    table = 1 + 0.3 * torch.rand(n, n ** (layers - 1), generator=g)
    cfg = load_config("scenes-tiny").edge.model_copy(
        update={"estimator": "trees", "preferences": 64, "lambda_active": 0.5, "eta": 1.0}
    )
    tasks = build_dataset("scenes", "train", n=1).tasks[:n]
    objective = EdgeObjective.build(cfg, tasks, None, torch.device("cpu"))
    tt = TreeTable.build(table, layers, None, objective.tau, objective.switches)
    torch.manual_seed(0)
    hyper = EdgeHypernet(n, layers, embed_dim=8, hidden=(32, 32))
    opt = torch.optim.Adam(hyper.parameters(), lr=1e-2)
    first = None
    for step in range(300):
        loss, stats = edge_trees_loss(hyper, objective, tt, torch.Generator().manual_seed(step))
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first and stats["tree_agreement"] > 0.8
    # fresh preferences: the hypernet's arg-max tree has the best tree's objective value
    fresh = torch.Generator().manual_seed(12345)
    r = sample_simplex(n, 1.0, fresh, count=200)
    c = torch.rand(200, generator=fresh)
    best = tt.objective(r, c, cfg.lambda_active, cfg.lambda_inactive)
    chosen = torch.tensor(
        [
            paths_index(Architecture.from_logits(hyper(ri, ci).detach()), tt)
            for ri, ci in zip(r, c, strict=True)
        ]
    )
    served = best[torch.arange(200), chosen]
    assert (served <= best.min(-1).values + 1e-9).float().mean() >= 0.9


def paths_index(arch: Architecture, tt: TreeTable) -> int:
    """Row of ``arch`` in the tree table (by its parents on used nodes)."""
    parents = torch.tensor(arch.parents)
    match = ((tt.parents == parents) | ~tt.used).flatten(1).all(-1)
    return int(match.nonzero()[0])


@pytest.mark.slow  # a whole CLI run (~25-30 s): make test-slow
def test_a_run_with_the_tree_estimator_logs_the_fit(tmp_path):
    base = load_config("scenes-tiny")
    config = base.model_copy(
        update={
            "check_preferences": 0,
            "edge": base.edge.model_copy(
                update={"estimator": "trees", "path_images": 4, "preferences": 8,
                        "path_scale": "single-task", "steps": 6, "pull_scale": "table",
                        "lambda_active": 0.5}
            ),
        }
    )  # fmt: skip
    vdir = run_training(
        config, tmp_path / "s" / "m", run_dir=tmp_path / "r", device="cpu", progress=False
    )
    model = dymu.load(vdir)
    assert model.manifest["training"]["config"]["edge"]["estimator"] == "trees"
    # the table's unit of lambda_A, measured and applied, is in the artifact's record
    edge = model.manifest["training"]["stages"]["edge"]
    assert edge["sharing_pull"] > 0
    assert edge["lambda_active_applied"] == pytest.approx(0.5 * edge["sharing_pull"])
    with open(tmp_path / "r" / "train_log.csv") as fh:
        rows = [row for row in csv.DictReader(fh) if row["stage"] == "edge"]
    assert rows and all(0.0 <= float(row["tree_agreement"]) <= 1.0 for row in rows)
    assert all(float(row["loss"]) > 0 for row in rows)
