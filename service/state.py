"""The state of one server and its lifecycle: load, warm up, serve, reload, drain, stop.

:class:`Service` owns the settings, the metrics, the loaded model, the executors and the
batcher. Start-up (the lifespan) schedules the load in the background, so ``/healthz`` answers
at once and ``/readyz`` says 503 until the artifact is verified, the default preference is
materialized and a warm-up prediction has run. Nothing blocking runs on the event loop:
loading, materialization, image decoding and encoding run on worker threads and inference on
the batcher's threads. Routers reach it through :func:`service_of`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch
from fastapi import FastAPI, Request

import dymu
from dymu.errors import DymuError

from .batching import Batcher
from .errors import NotReadyError, OverloadedError
from .metrics import Metrics
from .runtime import LoadedModel, Output, PreferenceEntry, TaskSubset, cost_out
from .schemas import PreferenceRecord
from .settings import Settings

log = logging.getLogger("dymu.service")
T = TypeVar("T")


def gil_switch_interval(ms: float) -> tuple[float, float] | None:
    """Set the interpreter's switch interval to ``ms`` (0: leave it); returns (the previous
    interval, the one set) for :func:`restore_switch_interval`.

    Why: an inference thread back from the model (which runs without the GIL) waits for the
    event loop to hand the GIL over, and Python asks for it only after the switch interval,
    5 ms; under load the loop runs Python most of the time, so every batch paid up to that
    wait on each side. At 0.5 ms the model thread was busy 93-94 % of the wall time under 16
    clients instead of 86-87 % (docs/benchmarks.md, "Issue 15, item 4: the GIL's switch
    interval"). It is process-wide, like torch's thread count.
    """
    if ms <= 0:
        return None
    previous = sys.getswitchinterval()
    sys.setswitchinterval(ms / 1000.0)
    return previous, sys.getswitchinterval()


def restore_switch_interval(saved: tuple[float, float] | None) -> None:
    """Undo :func:`gil_switch_interval`, unless someone has set another interval since."""
    if saved is not None and sys.getswitchinterval() == saved[1]:
        sys.setswitchinterval(saved[0])


class Service:
    """State of one server: settings, metrics, the loaded model, executors and the batcher."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.current: LoadedModel | None = None
        self.status = "starting"
        self.detail: str | None = "the model has not been loaded yet"
        self.generation = 0
        self.batcher: Batcher | None = None
        self.in_flight = 0  # /predict and OIP infer requests admitted and not yet answered
        self._control: ThreadPoolExecutor | None = None
        self._io: ThreadPoolExecutor | None = None
        self._inference: ThreadPoolExecutor | None = None
        self._load_task: asyncio.Task | None = None
        self._reload_lock: asyncio.Lock | None = None
        self._switch_interval: tuple[float, float] | None = None

    @property
    def ready(self) -> bool:
        return self.status == "ready" and self.current is not None

    @property
    def max_in_flight(self) -> int:
        """Predictions admitted at once: the queue plus what the workers run."""
        s = self.settings
        return s.max_queue + s.max_batch_size * s.inference_workers

    # -- lifecycle ------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    async def start(self) -> None:
        s = self.settings
        if s.torch_threads:
            torch.set_num_threads(s.torch_threads)
        self._switch_interval = gil_switch_interval(s.gil_switch_interval_ms)
        self._control = ThreadPoolExecutor(2, thread_name_prefix="dymu-control")
        self._io = ThreadPoolExecutor(
            min(8, max(2, os.cpu_count() or 2)), thread_name_prefix="dymu-io"
        )
        self._inference = ThreadPoolExecutor(s.inference_workers, thread_name_prefix="dymu-infer")
        self._reload_lock = asyncio.Lock()
        self.batcher = Batcher(
            self._run_batch,
            self._inference,
            workers=s.inference_workers,
            max_batch=s.max_batch_size,
            max_wait_s=s.max_wait_ms / 1000.0,
            max_queue=s.max_queue,
            retry_after_s=s.retry_after_s,
            metrics=self.metrics,
        )
        self.batcher.start()
        self._load_task = asyncio.get_running_loop().create_task(self._initial_load())

    def drain(self) -> None:
        """Stop admitting (SIGTERM): /readyz and new /predict calls answer 503 from now on;
        requests already admitted run to completion (the server waits for them)."""
        if self.status != "stopped":
            self.status, self.detail = "draining", "the server is shutting down"
            self.metrics.ready.set(0)

    async def stop(self) -> None:
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._load_task
        if self.batcher is not None:
            await self.batcher.stop()
        if self.current is not None:
            self.current.close()
        for ex in (self._control, self._io, self._inference):
            if ex is not None:
                ex.shutdown(wait=False, cancel_futures=True)
        restore_switch_interval(self._switch_interval)
        self._switch_interval = None
        self.status, self.detail = "stopped", "the server is shutting down"
        self.metrics.ready.set(0)

    async def _initial_load(self) -> None:
        try:
            lm = await self._prepare()
        except Exception as exc:
            if isinstance(exc, DymuError):  # a bad artifact: the reason is the message
                log.error("loading %s failed: %s", self.settings.model_dir, exc)
            else:
                log.exception("loading %s failed", self.settings.model_dir)
            self.status, self.detail = "failed", f"loading the model failed: {exc}"
            return
        self._install(lm)

    async def _prepare(self, initial: bool = True) -> LoadedModel:
        """Load and verify the artifact, materialize the default preference, warm up.

        On the initial load the steps show in /readyz; a reload keeps serving meanwhile.
        """

        def step(status: str, detail: str) -> None:
            if initial:
                self.status, self.detail = status, detail

        step("loading", f"loading and verifying {self.settings.model_dir}")
        lm = await self.control(LoadedModel.load, self.settings, self.metrics)
        step("warming up", "materializing the default preference")
        entry, _ = await self.entry(lm, lm.default_key, lm.default_preference, pin=True)
        if self.settings.warmup:
            step("warming up", "running the warm-up prediction")
            times = await self.control(lm.warm_up, entry)
            log.info("warm-up: %s", {k: f"{v * 1e3:.1f} ms" for k, v in times.items()})
        return lm

    def _install(self, lm: LoadedModel) -> None:
        old, self.current = self.current, lm
        self.generation += 1
        if self.status != "draining":
            self.status, self.detail = "ready", None
            self.metrics.ready.set(1)
        self.metrics.model_info.info(
            {
                "name": str(lm.name),
                "version": str(lm.version),
                "artifact_sha256": str(lm.checksum),
                "tasks": ",".join(lm.tasks),
                "device": str(lm.device),
                "backend": lm.backend,
            }
        )
        if old is not None:
            old.close()

    # -- executors ------------------------------------------------------------------------------
    async def control(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the control threads (loading, materializing, cost maps)."""
        return await asyncio.get_running_loop().run_in_executor(self._control, fn, *args)

    async def io(
        self,
        fn: Callable[..., T],
        *args: Any,
        data_bytes: int | None = None,
        side_by_side: bool = False,
    ) -> T:
        """``fn(*args)`` on the I/O threads (parsing, decoding and encoding images), or at once
        on the event loop when the step's image data is small enough: a hop to a thread and back
        costs ~0.1-0.2 ms (docs/service.md, "Where the time goes").

        Small: at most ``inline_io_bytes``, where the hop costs more than the work; or at most
        ``idle_inline_bytes`` while this request is the only prediction in flight, where there
        is nothing else for the loop to do. ``side_by_side`` marks a step gathered with others
        (they hop, to run in parallel on the I/O threads)."""
        if data_bytes is not None and self._inline(data_bytes, side_by_side):
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    def _inline(self, data_bytes: int, side_by_side: bool) -> bool:
        s = self.settings
        if data_bytes <= s.inline_io_bytes:
            return True
        alone = self.in_flight <= 1 and not side_by_side
        return alone and data_bytes <= s.idle_inline_bytes

    async def inline_model_s(self, images: int) -> float:
        """How quick (seconds) a request's batch must have been last time to run its image on
        the event loop (:meth:`Batcher.submit`): :attr:`Settings.inline_model_ms` for the only
        prediction in flight with one image, else 0 (never).

        Requests that arrived with this one but whose tasks have not started yet are not in
        flight yet: the loop runs them up to the gate first. Without that, a burst arriving
        while a request ran inline would run one by one on the loop, each seeing itself alone,
        and never batch (a 16-client load did exactly that once its groups' batches of 8 took
        less than the bound)."""
        bound_ms = self.settings.inline_model_ms
        if bound_ms == 0 or not self._alone(images):
            return 0.0
        await asyncio.sleep(0)
        return bound_ms / 1000.0 if self._alone(images) else 0.0

    def _alone(self, images: int) -> bool:
        return self.in_flight <= 1 and images == 1

    # -- admission ------------------------------------------------------------------------------
    def _not_ready(self) -> NotReadyError:
        return NotReadyError(
            f"the model is not ready ({self.status}: {self.detail})",
            headers={"Retry-After": str(self.settings.retry_after_s)},
        )

    def require_ready(self) -> LoadedModel:
        """The model, for a request being handled; while draining, requests that arrived
        before SIGTERM still get it (new ones are refused by :meth:`admit` and uvicorn)."""
        lm = self.current
        if lm is None or self.status not in ("ready", "draining"):
            raise self._not_ready()
        return lm

    @property
    def degrading(self) -> bool:
        """Whether requests that allow it are degraded under load (``DYMU_OVERLOAD=degrade``)."""
        return self.settings.overload == "degrade"

    def admit(self, allow_degrade: bool = False) -> bool:
        """Admit one prediction request before its body is read, or refuse at once (503).

        With ``DYMU_OVERLOAD=degrade``, a full server still admits a request that allows
        degrading (by its header: the body is not read yet), up to ``max_queue`` past the
        limit; it will run degraded. Returns whether it was admitted that way."""
        if self.current is None or self.status != "ready":
            raise self._not_ready()
        if self.in_flight >= self.max_in_flight:
            headroom = self.max_in_flight + self.settings.max_queue
            if allow_degrade and self.degrading and self.in_flight < headroom:
                self.in_flight += 1
                return True
            self.metrics.queue_rejections.inc()
            raise OverloadedError(
                f"the server is full ({self.in_flight} predictions in flight, the limit is "
                f"{self.max_in_flight}); retry later",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )
        self.in_flight += 1
        return False

    def release(self) -> None:
        self.in_flight -= 1

    # -- preferences ----------------------------------------------------------------------------
    async def entry(
        self, lm: LoadedModel, key: Any, pref: dymu.Preference, pin: bool = False
    ) -> tuple[PreferenceEntry, bool]:
        async def create() -> PreferenceEntry:
            return await self.control(lm.build_entry, pref, key)

        return await lm.cache.get_or_create(key, create, pin=pin)

    async def runner(self, lm: LoadedModel, entry: PreferenceEntry, subset: TaskSubset) -> Any:
        runner = entry.runners.get(subset.indices)
        if runner is None:
            runner = await self.control(lm.runner, entry, subset)
            lm.cache.enforce(keep=entry.key)
        return runner

    def record(
        self, lm: LoadedModel, entry: PreferenceEntry, cached: bool, t0: float
    ) -> PreferenceRecord:
        full = entry.runners.get(lm.all_tasks.indices)
        return PreferenceRecord(
            preference_id=entry.preference_id,
            model=str(lm.name),
            model_version=str(lm.version),
            r=list(entry.preference.r),
            r_by_task=dict(zip(lm.tasks, entry.preference.r)),
            c=entry.preference.c,
            architecture=lm.architecture_out(entry.architecture),
            cost=cost_out(entry.cost, lm.anchor_cost, lm.input_size),
            cached=cached,
            compute_ms=round(entry.compute_s * 1e3, 3),
            elapsed_ms=round((time.perf_counter() - t0) * 1e3, 3),
            backends={
                "torch": "ready",
                "onnx": full.onnx_status if full is not None else "disabled",
            },
        )

    # -- inference ------------------------------------------------------------------------------
    def _run_batch(self, payloads: list[tuple[LoadedModel, Any, torch.Tensor]]) -> list[Output]:
        lm = payloads[0][0]
        return lm.run_batch([(runner, x) for _, runner, x in payloads])

    # -- admin ----------------------------------------------------------------------------------
    async def reload(self) -> tuple[LoadedModel, LoadedModel | None]:
        assert self._reload_lock is not None
        async with self._reload_lock:
            previous = self.current
            try:
                lm = await self._prepare(initial=previous is None)
            except Exception as exc:
                if previous is None:
                    self.status, self.detail = "failed", f"loading the model failed: {exc}"
                raise
            self._install(lm)
            return lm, previous


def service_from(request: Request) -> Service:
    """The :class:`Service` of the app serving ``request``."""
    return request.app.state.service


async def service_of(request: Request) -> Service:
    """The router dependency: :func:`service_from`. A coroutine because FastAPI runs a
    plain-function dependency on its thread pool: a hop per request."""
    return service_from(request)
