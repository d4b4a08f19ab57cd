"""Dynamic batching of predictions that share a preference, task subset and image size.

A single dispatcher coroutine forms a batch whenever an inference worker is free: it takes the
group (same batch key) whose oldest image has waited longest, lets it fill for up to
``max_wait`` (unless it already holds ``max_batch`` images) and hands it to a worker thread.
While every worker is busy, images accumulate, so batches grow with load by themselves.

The queue is bounded: :meth:`Batcher.submit` refuses at once (``OverloadedError``, 503 +
Retry-After) when ``max_queue`` images wait. A job whose request timed out is skipped. A lone
image whose batch key ran quickly last time may run at once on the event loop instead
(:meth:`Batcher.submit`'s ``inline_s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from .errors import OverloadedError
from .metrics import Metrics


@dataclass
class Job:
    key: Hashable
    payload: Any
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    started: float | None = None


#: Keys whose last batch time is kept (each a few hundred bytes).
MAX_TIMED_KEYS = 1024

#: ``run(payloads) -> one result per payload`` (runs on a worker thread).
BatchFn = Callable[[Sequence[Any]], Sequence[Any]]


class Batcher:
    def __init__(
        self,
        run: BatchFn,
        executor: Executor,
        *,
        workers: int,
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        retry_after_s: int = 1,
        metrics: Metrics | None = None,
    ) -> None:
        self._run = run
        self._executor = executor
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self._metrics = metrics
        self._groups: OrderedDict[Hashable, deque[Job]] = OrderedDict()
        self._depth = 0
        self._arrived = asyncio.Event()
        self._free = asyncio.Semaphore(workers)
        self._dispatcher: asyncio.Task | None = None
        self._running = 0  # batches on the worker threads
        # How long the last batch of each key took (seconds, LRU-bounded): which lone images
        # are quick enough to run on the event loop (:meth:`submit`'s ``inline_s``).
        self._seconds: OrderedDict[Hashable, float] = OrderedDict()

    @property
    def depth(self) -> int:
        """Images waiting for a batch."""
        return self._depth

    def start(self) -> None:
        if self._dispatcher is None:
            self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch())

    async def stop(self) -> None:
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
            self._dispatcher = None
        for group in self._groups.values():
            for job in group:
                if not job.future.done():
                    job.future.cancel()
        self._groups.clear()
        self._set_depth(0)

    def submit(
        self, key: Hashable, payload: Any, limit: int | None = None, inline_s: float = 0.0
    ) -> Job:
        """Queue one image; raises :class:`OverloadedError` at once when the queue is full
        (``limit`` images waiting; ``max_queue`` by default).

        ``inline_s`` > 0 (a lone request, docs/service.md "Where the time goes"): when no batch
        waits or runs and the last batch of ``key`` took at most ``inline_s`` seconds, the
        image runs at once on the calling thread, the event loop, and the job comes back done.
        A hop to a worker thread and back costs ~0.2-0.3 ms, and a batch window would only
        wait for images that are not coming."""
        if inline_s > 0 and self._idle() and self._seconds.get(key, math.inf) <= inline_s:
            return self._run_inline(key, payload)
        if self._depth >= (self.max_queue if limit is None else limit):
            if self._metrics is not None:
                self._metrics.queue_rejections.inc()
            raise OverloadedError(
                f"the inference queue is full ({self.max_queue} images waiting); retry later",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        job = Job(key, payload, asyncio.get_running_loop().create_future())
        self._groups.setdefault(key, deque()).append(job)
        self._set_depth(self._depth + 1)
        self._arrived.set()
        return job

    def _idle(self) -> bool:
        return self._running == 0 and not self._groups

    def _run_inline(self, key: Hashable, payload: Any) -> Job:
        job = Job(key, payload, asyncio.get_running_loop().create_future())
        job.started = job.enqueued
        try:
            job.future.set_result(self._run([payload])[0])
        except Exception as exc:
            job.future.set_exception(exc)
        self._took(key, time.perf_counter() - job.started)
        return job

    def _took(self, key: Hashable, seconds: float) -> None:
        self._seconds[key] = seconds
        self._seconds.move_to_end(key)
        if len(self._seconds) > MAX_TIMED_KEYS:
            self._seconds.popitem(last=False)

    def _set_depth(self, depth: int) -> None:
        self._depth = depth
        if self._metrics is not None:
            self._metrics.queue_depth.set(depth)

    # -- dispatcher -----------------------------------------------------------------------------
    async def _dispatch(self) -> None:
        while True:
            await self._free.acquire()
            try:
                batch = await self._next_batch()
            except BaseException:
                self._free.release()
                raise
            if not batch:
                self._free.release()
                continue
            self._execute(batch)

    async def _next_batch(self) -> list[Job]:
        while not self._groups:
            self._arrived.clear()
            await self._arrived.wait()
        key = min(self._groups, key=lambda k: self._groups[k][0].enqueued)
        group = self._groups[key]
        deadline = group[0].enqueued + self.max_wait_s
        while len(group) < self.max_batch:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                break
        batch: list[Job] = []
        taken = 0
        while group and len(batch) < self.max_batch:
            job = group.popleft()
            taken += 1
            if not job.future.done():  # a timed-out request cancelled its future
                batch.append(job)
        if not group:
            del self._groups[key]
        self._set_depth(self._depth - taken)
        return batch

    def _execute(self, batch: list[Job]) -> None:
        """Hand ``batch`` to a worker thread; :meth:`_finish` hands out its results. A callback
        rather than a task per batch: one loop iteration less on each side of the thread."""
        now = time.perf_counter()
        for job in batch:
            job.started = now
        self._running += 1
        loop = asyncio.get_running_loop()
        try:
            running = loop.run_in_executor(self._executor, self._run, [j.payload for j in batch])
        except RuntimeError as exc:  # the executor is shut down
            running = loop.create_future()
            running.set_exception(exc)
        running.add_done_callback(functools.partial(self._finish, batch))

    def _finish(self, batch: list[Job], running: asyncio.Future) -> None:
        # The worker is free before the results go out: the dispatcher's wake-up is queued
        # ahead of the requests' continuations, so the next batch starts without waiting
        # for them (docs/benchmarks.md, "Issue 15, item 4").
        self._free.release()
        self._running -= 1
        # A batch of several images overstates one image's time: the bound errs on the thread.
        self._took(batch[0].key, time.perf_counter() - (batch[0].started or 0.0))
        if running.cancelled():
            outcome: BaseException | list[Any] = asyncio.CancelledError()
        else:
            outcome = running.exception() or running.result()
        if isinstance(outcome, BaseException):
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(outcome)
            return
        for job, result in zip(batch, outcome, strict=True):
            if not job.future.done():
                job.future.set_result(result)
