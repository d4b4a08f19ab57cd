"""Budgets in the core (dymu/budget.py): the c segments of a preference against a dense scan,
the lowest c that fits, the refusals, and ``materialize(r, budget=...)``."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch

import dymu
from benchmarks.frugal import DEFAULT_THRESHOLDS, c_ratio, frugal_model
from dymu.budget import Budget, parse_budget
from dymu.errors import BudgetError, BudgetInfeasibleError, PreferenceError
from dymu.preference import KEY_SCALE, Preference

from .conftest import randomize_, tiny_config

RS = ([1, 1, 1], [0.6, 0.3, 0.1], [0, 0, 1], [0.2, 0.7, 0.1])
SCAN_STEP = 500  # canonical units: a scan every 5 x 10^-4 of c


@pytest.fixture(scope="module")
def random_model() -> dymu.ControllableModel:
    torch.manual_seed(0)
    return randomize_(dymu.create_model(tiny_config()))


def scan(model, r, tasks=None) -> list[tuple[int, str, int]]:
    """(c units, tree id, FLOPs) every SCAN_STEP units of c, each tree as materialize finds it."""
    units = list(range(0, KEY_SCALE + 1, SCAN_STEP))
    pref = model.preference(r, 0.0)
    archs = [model.architecture(Preference(pref.r, u / KEY_SCALE)) for u in units]
    idx = dymu.preference.resolve_tasks(tasks, model.tasks)
    return [
        (u, a.id, model.cost_model.architecture_cost(a, None, idx).flops)
        for u, a in zip(units, archs, strict=True)
    ]


@pytest.mark.parametrize("r", RS)
def test_segments_agree_with_a_dense_scan(random_model, r):
    segments = random_model.c_segments(r)
    assert segments[0].c_lo == 0 and segments[-1].c_hi == KEY_SCALE
    assert all(a.c_hi + 1 == b.c_lo for a, b in pairwise(segments))
    assert all(a.architecture.id != b.architecture.id for a, b in pairwise(segments))
    for units, tree, _ in scan(random_model, r):
        seg = next(s for s in segments if s.c_lo <= units <= s.c_hi)
        assert seg.architecture.id == tree, (r, units)
    # each segment starts exactly where the tree changes: one unit lower is the previous tree
    pref = random_model.preference(r, 0.0)
    for prev, seg in pairwise(segments):
        below = random_model.architecture(Preference(pref.r, (seg.c_lo - 1) / KEY_SCALE))
        assert below.id == prev.architecture.id
    assert len(segments) > 1  # the fixture's c does move the tree


@pytest.mark.parametrize("r", RS)
@pytest.mark.parametrize("tasks", [None, ["depth"], ["segmentation", "normals"]])
def test_the_chosen_c_is_the_lowest_that_fits(random_model, r, tasks):
    points = scan(random_model, r, tasks)
    for flops in sorted({f for _, _, f in points}):
        choice = random_model.within_budget(r, {"max_gflops": flops / 1e9}, tasks)
        assert choice.cost.flops <= flops
        first_fit = min(u for u, _, f in points if f <= flops)
        assert round(choice.c * KEY_SCALE) <= first_fit  # no scanned c below it fits ...
        assert not any(f <= flops for u, _, f in points if u < round(choice.c * KEY_SCALE))
        net = random_model.materialize(choice.preference, None, tasks)  # ... and it is served
        assert net.architecture.id == choice.architecture.id
        assert net.cost().flops == choice.cost.flops


def test_the_frugal_model_changes_tree_exactly_at_its_thresholds():
    model = frugal_model(tiny_config(), seed=3)
    starts = [s.c_lo for s in model.c_segments([0.2, 0.3, 0.5])]
    assert starts == [0] + [math.ceil(t * KEY_SCALE) for t in DEFAULT_THRESHOLDS]
    assert c_ratio(model) <= 0.8
    costs = [model.cost(s.architecture).flops for s in model.c_segments([1, 1, 1])]
    assert costs == sorted(costs, reverse=True) and len(set(costs)) == len(costs)


def test_fraction_budgets_are_of_the_full_anchor():
    model = frugal_model(tiny_config(), seed=3)
    anchor = model.anchor_cost().flops
    choice = model.within_budget([1, 1, 1], {"max_fraction": 0.8})
    assert choice.cost.flops <= 0.8 * anchor and choice.limit_flops == 0.8 * anchor
    higher = model.within_budget([1, 1, 1], Budget(max_fraction=1.0))
    assert higher.c == 0.0 and higher.cost.flops == anchor


def test_a_budget_below_the_cheapest_tree_names_the_cheapest_cost():
    model = frugal_model(tiny_config(), seed=3)
    cheapest = min(model.cost(s.architecture).flops for s in model.c_segments([1, 1, 1]))
    with pytest.raises(BudgetInfeasibleError) as err:
        model.within_budget([1, 1, 1], {"max_gflops": (cheapest - 1) / 1e9})
    assert err.value.cheapest_flops == cheapest and str(cheapest) in str(err.value)
    assert err.value.cheapest_c == pytest.approx(DEFAULT_THRESHOLDS[-1], abs=1e-6)


@pytest.mark.parametrize(
    "bad, reason",
    [
        ({}, "exactly one"),
        ({"max_gflops": 1, "max_fraction": 0.5}, "exactly one"),
        ({"max_flops": 1}, "unknown budget field"),
        ({"max_gflops": 0}, "> 0"),
        ({"max_fraction": -0.5}, "> 0"),
        ({"max_gflops": True}, "must be a number"),
        ({"max_gflops": "1"}, "must be a number"),
        ({"max_gflops": float("nan")}, "finite"),
        (0.5, "a budget is"),
    ],
)
def test_bad_budgets_are_refused_with_the_reason(bad, reason):
    with pytest.raises(BudgetError, match=reason):
        parse_budget(bad)


def test_materialize_takes_a_budget_instead_of_c():
    model = frugal_model(tiny_config(), seed=3)
    net = model.materialize([1, 1, 1], budget={"max_fraction": 0.9})
    choice = model.within_budget([1, 1, 1], {"max_fraction": 0.9})
    assert net.preference.c == choice.c and net.architecture.id == choice.architecture.id
    with pytest.raises(BudgetError, match="not both"):
        model.materialize([1, 1, 1], 0.5, budget={"max_fraction": 0.9})
    assert isinstance(BudgetError("x"), PreferenceError)  # a 422 wherever preferences are
