"""Compute budgets: the most accurate tree of a preference ``r`` that fits a FLOP budget.

A budget replaces ``c`` (docs/service.md, "Budgets"): ``{"max_gflops": x}`` or
``{"max_fraction": f}`` (a share of the full anchor's FLOPs), for an input size and a task
subset. For a fixed ``r`` the edge hypernet's arg-max tree is piecewise constant in ``c``.
:func:`c_segments` finds the pieces: it evaluates the tree on a coarse grid of ``c`` and bisects
every interval whose end trees differ down to one canonical unit of ``c`` (10^-6, the rounding
of :func:`dymu.preference.canonical_key`), so every segment starts at the lowest canonical ``c``
of its tree. :func:`choose` then takes the first segment (the lowest ``c``) whose tree fits;
lower ``c`` spends more on the tasks, so that is the most accurate tree that fits. The cost need
not be monotone in ``c`` on a trained model; "the lowest c that fits" is the rule all the same.

A change of tree that leaves and comes back between two grid points (``A -> B -> A`` within
1/64 of ``c``) is not seen; the grid is fine enough for the controllers dymu trains.

Only the validation of a budget and the search live here; the cost is dymu's one cost model
(:mod:`dymu.cost`) and the trees come from the model (``ControllableModel.c_segments``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from .architecture import Architecture
from .cost import Cost
from .errors import BudgetError, BudgetInfeasibleError, PreferenceError
from .preference import KEY_SCALE, Preference, as_number, normalize_c

#: The keys of a budget; exactly one is given.
BUDGET_KEYS = ("max_gflops", "max_fraction")
#: Intervals of the coarse grid of c (in canonical units: 1/64 = 15,625 units each).
GRID_INTERVALS = 64


@dataclass(frozen=True)
class Budget:
    """A compute budget: at most ``max_gflops`` GFLOPs, or ``max_fraction`` of the full
    anchor's FLOPs, per image at the input size it is checked for (one of the two is set)."""

    max_gflops: float | None = None
    max_fraction: float | None = None

    def limit_flops(self, anchor_flops: int) -> float:
        """The budget in FLOPs, given the full anchor's FLOPs at the same input size."""
        if self.max_gflops is not None:
            return self.max_gflops * 1e9
        assert self.max_fraction is not None
        return self.max_fraction * anchor_flops

    def describe(self, limit_flops: float | None = None) -> str:
        """``"0.25 GFLOPs"``, or ``"0.5 of the anchor's FLOPs"`` (``= x GFLOPs`` with the limit)."""
        if self.max_gflops is not None:
            return f"{self.max_gflops:g} GFLOPs"
        text = f"{self.max_fraction:g} of the anchor's FLOPs"
        return text if limit_flops is None else f"{text} = {limit_flops / 1e9:.6g} GFLOPs"

    def to_dict(self) -> dict[str, float]:
        pairs = (("max_gflops", self.max_gflops), ("max_fraction", self.max_fraction))
        return {k: v for k, v in pairs if v is not None}


def parse_budget(value: Any) -> Budget:
    """Validate a budget: a :class:`Budget`, or a mapping with exactly one of
    :data:`BUDGET_KEYS`, a finite number > 0 (``true`` and ``"1"`` are refused, as for ``c``).
    Raises :class:`~dymu.errors.BudgetError` with the reason."""
    if isinstance(value, Budget):
        value = value.to_dict()
    if not isinstance(value, Mapping):
        raise BudgetError(
            'a budget is {"max_gflops": <GFLOPs>} or {"max_fraction": <share of the anchor>}, '
            f"got {type(value).__name__}"
        )
    unknown = [str(k)[:40] for k in value if k not in BUDGET_KEYS]
    if unknown:
        raise BudgetError(f"unknown budget field(s) {unknown}; a budget has one of {BUDGET_KEYS}")
    given = [k for k in BUDGET_KEYS if value.get(k) is not None]
    if len(given) != 1:
        raise BudgetError(f"a budget needs exactly one of {BUDGET_KEYS}, got {given or 'none'}")
    key = given[0]
    try:
        number = as_number(value[key], f"budget.{key}")
    except PreferenceError as exc:
        raise BudgetError(str(exc)) from None
    if not number > 0:
        raise BudgetError(f"budget.{key} must be > 0, got {number:g}")
    return Budget(**{key: number})


def check_exclusive(c: Any, budget: Any) -> None:
    """A request gives ``c`` or a budget, never both (:class:`~dymu.errors.BudgetError`)."""
    if c is not None and budget is not None:
        raise BudgetError("give c or a budget, not both: a budget chooses c")


@dataclass(frozen=True)
class Segment:
    """The canonical ``c`` in ``[c_lo, c_hi]`` (units of 10^-6) all give ``architecture``."""

    c_lo: int
    c_hi: int
    architecture: Architecture

    @property
    def c(self) -> float:
        """The lowest c of the segment."""
        return self.c_lo / KEY_SCALE


#: ``trees_of(c_units) -> the arg-max tree at each c``.
TreesOf = Callable[[Sequence[int]], Sequence[Architecture]]


def c_segments(trees_of: TreesOf, grid: int = GRID_INTERVALS) -> list[Segment]:
    """The segments of ``[0, 1]`` (canonical units) on which the tree is constant, in order of
    ``c``: a coarse grid, then level-by-level bisection of every interval whose ends differ
    (one call of ``trees_of`` per level, about 15 levels)."""
    points = sorted({round(k * KEY_SCALE / grid) for k in range(grid + 1)})
    trees = dict(zip(points, trees_of(points), strict=True))
    brackets = [(a, b) for a, b in pairwise(points) if trees[a].id != trees[b].id]
    starts = [0]
    while brackets:
        starts += [b for a, b in brackets if b - a == 1]
        open_ = [(a, b) for a, b in brackets if b - a > 1]
        mids = [(a + b) // 2 for a, b in open_]
        if mids:
            trees.update(zip(mids, trees_of(mids), strict=True))
        brackets = []
        for (a, b), m in zip(open_, mids, strict=True):
            if trees[m].id != trees[a].id:
                brackets.append((a, m))
            if trees[m].id != trees[b].id:
                brackets.append((m, b))
    starts = sorted(set(starts))
    ends = [s - 1 for s in starts[1:]] + [KEY_SCALE]
    return [Segment(s, e, trees[s]) for s, e in zip(starts, ends, strict=True)]


@dataclass(frozen=True)
class BudgetChoice:
    """What a budget chose for one ``r``: the preference (its ``c`` is the chosen one), its
    tree and cost for the task subset and input size, and the FLOPs the budget allowed."""

    preference: Preference
    architecture: Architecture
    cost: Cost
    budget: Budget
    limit_flops: float
    segments: int  # distinct trees of r over c in [0, 1]

    @property
    def c(self) -> float:
        return self.preference.c


#: ``tree_at(preference) -> its arg-max tree`` computed as a prediction computes it.
TreeAt = Callable[[Preference], Architecture]
CostOf = Callable[[Architecture], Cost]


def choose(
    pref: Preference,
    segments: Sequence[Segment],
    tree_at: TreeAt,
    cost_of: CostOf,
    budget: Budget,
    limit_flops: float,
) -> BudgetChoice:
    """The lowest canonical ``c`` whose tree fits ``limit_flops``, for ``pref``'s r; else
    :class:`~dymu.errors.BudgetInfeasibleError` naming the cheapest tree's cost and ``c``."""
    costs = [cost_of(s.architecture) for s in segments]
    for seg, cost in zip(segments, costs, strict=True):
        if cost.flops <= limit_flops:
            found = confirm(pref, seg, tree_at, cost_of, limit_flops)
            if found is not None:
                return BudgetChoice(*found, budget, limit_flops, len(segments))
    i = min(range(len(costs)), key=lambda k: (costs[k].flops, segments[k].c_lo))
    cheapest, seg = costs[i], segments[i]
    raise BudgetInfeasibleError(
        f"the budget ({budget.describe(limit_flops)}) is below the "
        f"cheapest tree for this r: {cheapest.gflops:.6g} GFLOPs ({cheapest.flops} FLOPs) at "
        f"c = {seg.c:g}",
        cheapest.flops,
        seg.c,
    )


def at_c(pref: Preference, c_units: int) -> Preference:
    """``pref``'s r with the canonical ``c`` of ``c_units`` (validated like every c)."""
    return Preference(r=pref.r, c=normalize_c(c_units / KEY_SCALE))


def confirm(
    pref: Preference, seg: Segment, tree_at: TreeAt, cost_of: CostOf, limit_flops: float
) -> tuple[Preference, Architecture, Cost] | None:
    """The lowest c of ``seg`` whose tree, computed the way a prediction computes it (one
    unbatched pass), fits: a batched pass may round differently right at a change of tree, so
    the segment's start is checked and, if need be, c moves up within the segment (None when
    no c tried fits)."""
    step, units = 1, seg.c_lo
    while units <= seg.c_hi:
        candidate = at_c(pref, units)
        arch = tree_at(candidate)
        cost = cost_of(arch)
        if cost.flops <= limit_flops:
            return candidate, arch, cost
        units, step = units + step, step * 2
    return None
