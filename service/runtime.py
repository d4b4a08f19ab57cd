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
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import dymu
from dymu.architecture import Architecture
from dymu.cost import Cost
from dymu.preference import Preference, resolve_tasks

from . import prefid
from .backends import OnnxPool, Runner, resolve_backend
from .imaging import normalization_for, to_tensor
from .metrics import Metrics
from .schemas import ArchitectureOut, CostOut
from .settings import Settings

log = logging.getLogger("dymu.service")


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
        self.mean, self.std, self.norm_source = normalization_for(
            m, settings.input_mean, settings.input_std
        )
        self.input_size: tuple[int, int] = tuple(model.input_size)
        self.anchor_cost = model.anchor_cost()
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

    @classmethod
    def load(cls, settings: Settings, metrics: Metrics) -> LoadedModel:
        model = dymu.load(settings.model_dir, device=settings.device)
        return cls(model, settings, metrics)

    # -- ids and validation (delegated to dymu.preference through prefid) -----------------------
    def encode_id(self, key: prefid.CanonicalKey) -> str:
        return self.ids.encode(key)

    def parse(self, r: Any, c: Any) -> tuple[Preference, prefid.CanonicalKey]:
        return self.ids.parse(r, c)

    def decode_id(self, pref_id: str) -> tuple[Preference, prefid.CanonicalKey]:
        return self.ids.decode(pref_id)

    def task_indices(self, tasks: Any) -> tuple[int, ...]:
        return resolve_tasks(tasks, self.tasks)

    # -- building (blocking; called on worker threads) ------------------------------------------
    def build_entry(self, pref: Preference, key: prefid.CanonicalKey) -> PreferenceEntry:
        """Hypernets -> tree -> BN deltas -> materialized, folded sub-network (all tasks)."""
        t0 = time.perf_counter()
        with torch.no_grad():
            net = self.model.materialize(pref, None)
        runner = Runner(net, self.device, self.backend, self.pool)
        dt = time.perf_counter() - t0
        self.metrics.materialize_seconds.observe(dt)
        all_tasks = tuple(range(len(self.tasks)))
        return PreferenceEntry(
            preference=pref,
            key=key,
            preference_id=self.encode_id(key),
            architecture=net.architecture,
            cost=net.cost(),
            compute_s=dt,
            runners={all_tasks: runner},
        )

    def runner(self, entry: PreferenceEntry, task_idx: tuple[int, ...]) -> Runner:
        """The entry's runner for a task subset (materialized on first use: only its paths)."""
        found = entry.runners.get(task_idx)
        if found is not None:
            return found
        with entry.lock:
            found = entry.runners.get(task_idx)
            if found is None:
                t0 = time.perf_counter()
                names = [self.tasks[i] for i in task_idx]
                with torch.no_grad():
                    net = self.model.materialize(
                        entry.preference, None, names, architecture=entry.architecture
                    )
                found = Runner(net, self.device, self.backend, self.pool)
                self.metrics.materialize_seconds.observe(time.perf_counter() - t0)
                entry.runners[task_idx] = found
        return found

    def image_tensor(self, rgb: np.ndarray) -> torch.Tensor:
        return to_tensor(rgb, self.mean, self.std)

    # -- inference (blocking; called by the batcher on an inference thread) --------------------
    def run_batch(self, payloads: list[tuple[Runner, torch.Tensor]]) -> list[Output]:
        runner = payloads[0][0]
        x = torch.stack([p[1] for p in payloads])
        arrays, backend, dt = runner.run(x)
        n = len(payloads)
        self.metrics.model_seconds.labels(backend).observe(dt)
        self.metrics.images.labels(backend).inc(n)
        self.metrics.batch_size.observe(n)
        return [Output({k: v[i] for k, v in arrays.items()}, backend, dt, n) for i in range(n)]

    def warm_up(self, entry: PreferenceEntry) -> dict[str, float]:
        """Run the default sub-network once per backend at the model's input size."""
        runner = entry.runners[tuple(range(len(self.tasks)))]
        x = torch.zeros(1, self.model.config.in_channels, *self.input_size)
        times = {}
        _, backend, dt = runner.run(x)
        times[backend] = dt
        if self.backend == "onnx" and runner.wait_onnx(timeout=300):
            _, backend, dt = runner.run(x)
            times[backend] = dt
        return times

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
