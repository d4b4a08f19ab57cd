"""The model runtime: one loaded artifact and everything derived from it.

:class:`LoadedModel` holds the verified model, its preference cache (entries are
:class:`PreferenceEntry`: the tree, the cost and one :class:`~service.backends.Runner` per task
subset), the ONNX session pool and the input normalization. Its methods are blocking and run
on worker threads; the event loop only awaits them. A reload builds a new ``LoadedModel`` and
swaps it in: requests that started on the old one finish on it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

import dymu
from dymu.architecture import Architecture
from dymu.budget import BudgetChoice, Segment, at_c
from dymu.cost import Cost
from dymu.errors import BudgetInfeasibleError
from dymu.preference import (
    KEY_SCALE,
    Preference,
    canonical_key,
    normalize_c,
    resolve_tasks,
    simplex_grid,
    simplex_grid_size,
)

from . import prefid
from .backends import OnnxPool, Runner, measure_backends, resolve_backend
from .errors import BadRequestError
from .imaging import normalization_for, to_tensor
from .metrics import Metrics
from .schemas import ArchitectureOut, BudgetOut, CostMap, CostMapPoint, CostOut
from .settings import Settings

log = logging.getLogger("dymu.service")

#: Grid points one cost map may have: resolution 100 for 3 tasks (a few hundred ms on a CPU).
MAX_COST_MAP_POINTS = 5151
#: The c segments (dymu.budget) kept, one list per canonical r (LRU).
MAX_SEGMENT_LISTS = 1024
#: (tree, input size, task subset) costs a model keeps (:meth:`LoadedModel.cost`).
MAX_COSTS = 4096


@dataclass
class PreferenceEntry:
    """One cached preference: its canonical (r, c), tree, cost and runners per task subset."""

    preference: Preference
    key: prefid.CanonicalKey
    preference_id: str
    architecture: Architecture
    cost: Cost
    compute_s: float
    runners: dict[tuple[int, ...], Runner] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in list(self.runners.values()))


@dataclass
class Output:
    """One image's result from a batch."""

    arrays: dict[str, np.ndarray]
    backend: str
    model_s: float
    batch_size: int


class TaskSubset(NamedTuple):
    """A request's task subset, resolved once: stream indices (ascending) and their names."""

    indices: tuple[int, ...]
    names: tuple[str, ...]


def cost_out(cost: Cost, anchor: Cost, hw: tuple[int, int]) -> CostOut:
    return CostOut(
        input_size=list(hw),
        flops=cost.flops,
        gflops=cost.gflops,
        params=cost.params,
        anchor_flops=anchor.flops,
        anchor_params=anchor.params,
        fraction_of_anchor_flops=cost.flops / anchor.flops if anchor.flops else 0.0,
        fraction_of_anchor_params=cost.params / anchor.params if anchor.params else 0.0,
    )


class LoadedModel:
    """A verified artifact on its device, with its cache and backend state."""

    def __init__(self, model: dymu.ControllableModel, settings: Settings, metrics: Metrics):
        self.model = model
        self.settings = settings
        self.metrics = metrics
        m = model.manifest
        self.manifest = m
        self.name: str | None = m.get("name")
        self.version: str | None = m.get("version")
        self.checksum: str | None = m.get("manifest_sha256")
        self.tasks = model.tasks
        self.task_specs = {t.name: t for t in model.config.tasks}
        self.device = model.device
        self.backend = resolve_backend(settings.backend)
        #: seconds of one batch per candidate backend, when ``--backend auto`` measured them
        self.backend_times: dict[str, float] | None = None
        self.mean, self.std, self.norm_source = normalization_for(
            m, settings.input_mean, settings.input_std
        )
        self.input_size: tuple[int, int] = tuple(model.input_size)
        self.anchor_cost = model.anchor_cost()
        self._costs: dict[tuple[str, tuple[int, int], tuple[int, ...]], Cost] = {}
        self.all_tasks = self.subset(None)
        self.pool = (
            OnnxPool(
                self.device,
                self.input_size,
                settings.onnx_threads,
                settings.onnx_max_sessions,
                metrics,
            )
            if self.backend == "onnx"
            else None
        )
        from .cache import PreferenceCache

        self.cache: PreferenceCache[PreferenceEntry] = PreferenceCache(
            settings.cache_max_entries, settings.cache_max_bytes, metrics
        )
        self.ids = prefid.PreferenceIds.create(
            self.tasks, self.name, self.version, settings.default_r, settings.default_c
        )
        self.default_preference, self.default_key = (
            self.ids.default_preference,
            self.ids.default_key,
        )
        self.default_id = self.ids.default_id
        self._segments: OrderedDict[tuple[int, ...], list[Segment]] = OrderedDict()
        self._segments_lock = threading.Lock()

    @classmethod
    def load(cls, settings: Settings, metrics: Metrics) -> LoadedModel:
        # A served model's weights never change (/admin/reload loads a new one): frozen, a
        # preference switch skips re-reading every weight's version counter.
        model = dymu.load(settings.model_dir, device=settings.device).freeze()
        return cls(model, settings, metrics)

    # -- ids and validation (delegated to dymu.preference through prefid) -----------------------
    def encode_id(self, key: prefid.CanonicalKey) -> str:
        return self.ids.encode(key)

    def parse(self, r: Any, c: Any) -> tuple[Preference, prefid.CanonicalKey]:
        return self.ids.parse(r, c)

    def decode_id(self, pref_id: str) -> tuple[Preference, prefid.CanonicalKey]:
        return self.ids.decode(pref_id)

    def subset(self, tasks: Any) -> TaskSubset:
        """Resolve a task subset (names; None = all) once; the request carries the result."""
        idx = resolve_tasks(tasks, self.tasks)
        return TaskSubset(idx, tuple(self.tasks[i] for i in idx))

    def cost(self, arch: Architecture, hw: tuple[int, int], subset: TaskSubset) -> Cost:
        """The cost model's cost of a tree for a task subset at an input size, kept per
        (tree, size, subset): a reply reports it, and summing it again took ~30 µs."""
        key = (arch.id, hw, subset.indices)
        cost = self._costs.get(key)
        if cost is None:
            if len(self._costs) >= MAX_COSTS:  # request sizes vary: keep it bounded
                self._costs.clear()
            cost = self._costs[key] = self.model.cost_model.architecture_cost(
                arch, hw, subset.indices
            )
        return cost

    # -- building (blocking; called on worker threads) ------------------------------------------
    def build_entry(self, pref: Preference, key: prefid.CanonicalKey) -> PreferenceEntry:
        """Hypernets -> tree -> BN deltas -> materialized, folded sub-network (all tasks)."""
        t0 = time.perf_counter()
        with torch.no_grad():
            net = self.model.materialize(pref, None)
        runner = Runner(net, self.device, self.backend, self.pool)
        dt = time.perf_counter() - t0
        self.metrics.materialize_seconds.observe(dt)
        return PreferenceEntry(
            preference=pref,
            key=key,
            preference_id=self.encode_id(key),
            architecture=net.architecture,
            cost=net.cost(),
            compute_s=dt,
            runners={self.all_tasks.indices: runner},
        )

    def runner(self, entry: PreferenceEntry, subset: TaskSubset) -> Runner:
        """The entry's runner for a task subset (materialized on first use: only its paths)."""
        found = entry.runners.get(subset.indices)
        if found is not None:
            return found
        with entry.lock:
            found = entry.runners.get(subset.indices)
            if found is None:
                t0 = time.perf_counter()
                with torch.no_grad():
                    net = self.model.materialize(
                        entry.preference, None, subset.names, architecture=entry.architecture
                    )
                found = Runner(net, self.device, self.backend, self.pool)
                self.metrics.materialize_seconds.observe(time.perf_counter() - t0)
                entry.runners[subset.indices] = found
        return found

    # -- budgets and degrading (blocking; worker threads) ---------------------------------------
    def segments(self, pref: Preference) -> list[Segment]:
        """The c segments of ``pref``'s r (:meth:`dymu.ControllableModel.c_segments`), kept
        per canonical r: a budget or a degraded request for a known r costs no search."""
        rkey = canonical_key(pref)[0]
        with self._segments_lock:
            found = self._segments.get(rkey)
            if found is not None:
                self._segments.move_to_end(rkey)
                return found
        made = self.model.c_segments(pref)
        with self._segments_lock:
            self._segments[rkey] = made
            while len(self._segments) > MAX_SEGMENT_LISTS:
                self._segments.popitem(last=False)
        return made

    def within_budget(self, pref: Preference, budget: Any, subset: TaskSubset) -> BudgetChoice:
        """The lowest c of the canonical ``pref``'s r whose tree fits ``budget`` for ``subset``
        at the model's input size (422 ``budget_infeasible_error`` naming the cheapest)."""
        return self.model.within_budget(
            pref, budget, subset.names, self.input_size, self.segments(pref)
        )

    def degraded(self, pref: Preference, subset: TaskSubset) -> Preference:
        """``pref``'s r at the degrade c, or at the lowest c that fits the degrade budget (the
        cheapest tree's c when none does): what a degraded request runs (canonical)."""
        budget = self.settings.degrade_budget
        if budget is None:
            return at_c(pref, round(self.settings.degrade_c * KEY_SCALE))
        try:
            return self.within_budget(pref, budget, subset).preference
        except BudgetInfeasibleError as exc:
            return at_c(pref, round(exc.cheapest_c * KEY_SCALE))

    def budget_out(self, choice: BudgetChoice, subset: TaskSubset, search_s: float) -> BudgetOut:
        return BudgetOut(
            max_gflops=choice.budget.max_gflops,
            max_fraction=choice.budget.max_fraction,
            limit_flops=choice.limit_flops,
            c=choice.c,
            tasks=list(subset.names),
            cost=cost_out(choice.cost, self.anchor_cost, self.input_size),
            n_trees=choice.segments,
            search_ms=round(search_s * 1e3, 3),
        )

    def cost_map(self, c: Any, resolution: int, tasks: Any = None) -> CostMap:
        """The paper's Figure 5 for one ``c``: the cost of the arg-max tree at every point of
        :func:`~dymu.preference.simplex_grid` (edge hypernet and cost model only, no image).

        Every grid point goes through the same validation and canonical rounding as
        ``POST /preference``, so a point's tree and cost are that preference's.
        """
        t0 = time.perf_counter()
        normalize_c(c)  # the reason for a bad c, before the grid is built
        subset = self.subset(tasks)
        n = len(self.tasks)
        size = simplex_grid_size(n, resolution)
        if size > MAX_COST_MAP_POINTS:
            raise BadRequestError(
                f"resolution {resolution} gives {size:,} points on the {n}-task simplex; the"
                f" limit is {MAX_COST_MAP_POINTS:,} (use a smaller resolution)"
            )
        prefs = [self.parse(r, c)[0] for r in simplex_grid(n, resolution)]
        archs = self.model.architectures(prefs)
        costs: dict[str, Cost] = {}
        points = []
        for pref, arch in zip(prefs, archs):
            if arch.id not in costs:
                costs[arch.id] = self.cost(arch, self.input_size, subset)
            cost = costs[arch.id]
            points.append(
                CostMapPoint(
                    r=list(pref.r),
                    flops=cost.flops,
                    gflops=cost.gflops,
                    params=cost.params,
                    fraction_of_anchor_flops=cost.flops / self.anchor_cost.flops,
                    architecture_id=arch.id,
                    n_used_nodes=arch.num_used_nodes(subset.indices),
                )
            )
        gflops = [p.gflops for p in points]
        return CostMap(
            model=self.name,
            model_version=self.version,
            c=prefs[0].c,
            resolution=resolution,
            tasks=list(self.tasks),
            subset=list(subset.names),
            input_size=list(self.input_size),
            anchor_flops=self.anchor_cost.flops,
            anchor_params=self.anchor_cost.params,
            n_points=len(points),
            n_architectures=len(costs),
            min_gflops=min(gflops),
            max_gflops=max(gflops),
            compute_ms=round((time.perf_counter() - t0) * 1e3, 3),
            points=points,
        )

    def image_tensor(self, rgb: np.ndarray) -> torch.Tensor:
        return to_tensor(rgb, self.mean, self.std)

    # -- inference (blocking; called by the batcher on an inference thread) --------------------
    def run_batch(self, payloads: list[tuple[Runner, torch.Tensor]]) -> list[Output]:
        runner = payloads[0][0]
        # one image: a view with a batch axis (no copy of the image)
        x = payloads[0][1][None] if len(payloads) == 1 else torch.stack([p[1] for p in payloads])
        arrays, backend, dt = runner.run(x)
        n = len(payloads)
        self.metrics.model_seconds.labels(backend).observe(dt)
        self.metrics.images.labels(backend).inc(n)
        self.metrics.batch_size.observe(n)
        return [Output({k: v[i] for k, v in arrays.items()}, backend, dt, n) for i in range(n)]

    def warm_up(self, entry: PreferenceEntry) -> dict[str, float]:
        """Run the default sub-network on every backend it may use (seconds per backend).

        With ``--backend auto`` this is where the backend is chosen: each candidate is timed on
        the default tree at the largest batch the server forms and the model's input size, and
        the fastest serves from now on (:attr:`backend_times` keeps the measurement)."""
        runner = entry.runners[self.all_tasks.indices]
        if self.settings.backend == "auto":
            self.select_backend(entry)
            return dict(self.backend_times or {})
        x = torch.zeros(1, self.model.config.in_channels, *self.input_size)
        times = {}
        _, backend, dt = runner.run(x)
        times[backend] = dt
        if self.backend == "onnx" and runner.wait_onnx(timeout=300):
            _, backend, dt = runner.run(x)
            times[backend] = dt
        return times

    def select_backend(self, entry: PreferenceEntry) -> str:
        """Time the candidates (:func:`~service.backends.measure_backends`), keep the fastest
        and rebuild the entry's runner for it."""
        net = entry.runners[self.all_tasks.indices].net
        batch = self.settings.max_batch_size
        x = torch.zeros(batch, self.model.config.in_channels, *self.input_size)
        self.backend_times = measure_backends(net, x, self.device, self.pool)
        self.backend = min(self.backend_times, key=self.backend_times.__getitem__)
        log.info(
            "backend auto: %s (batch %d at %s: %s)",
            self.backend,
            batch,
            "x".join(map(str, self.input_size)),
            {k: f"{v * 1e3:.1f} ms" for k, v in self.backend_times.items()},
        )
        entry.runners = {self.all_tasks.indices: Runner(net, self.device, self.backend, self.pool)}
        return self.backend

    # -- descriptions ---------------------------------------------------------------------------
    def architecture_out(self, arch: Architecture) -> ArchitectureOut:
        used = arch.used_nodes()
        return ArchitectureOut(
            id=arch.id,
            n_tasks=arch.n_tasks,
            n_layers=arch.n_layers,
            parents=[list(row) for row in arch.parents],
            used_nodes=[list(u) for u in used],
            n_used_nodes=sum(len(u) for u in used),
            n_nodes=arch.n_tasks * arch.n_layers,
        )

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
