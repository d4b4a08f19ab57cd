"""The prediction flow shared by ``/predict`` (service/routers/predict.py) and the Open
Inference Protocol's infer (service/routers/oip.py).

:func:`deadline` holds a request to the deadline the gate set (arrival +
``request_timeout_s``): past it the request is answered 504 and whatever it still waits on is
cancelled. :func:`run_images` finds or builds the preference's sub-network for a task subset
and queues the request's images on the batcher as one group (they batch together).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import Request

import dymu

from .errors import RequestTimeoutError
from .runtime import LoadedModel, Output, PreferenceEntry, TaskSubset
from .state import Service


@dataclass
class Ran:
    """What the model produced for one request's images."""

    entry: PreferenceEntry
    computed: bool  # the sub-network was built for this request (a cache miss)
    outs: list[Output]  # one per image, in order
    queue_s: float  # the longest wait of an image for its batch


@contextlib.asynccontextmanager
async def deadline(request: Request, svc: Service) -> AsyncIterator[float]:
    """Run the body within the request's deadline (504 past it); yields the arrival time."""
    state = request.scope.get("state", {})
    t0 = state.get("t0", time.perf_counter())
    end = state.get("deadline", t0 + svc.settings.request_timeout_s)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout_at(loop.time() + (end - time.perf_counter())):
            yield t0
    except TimeoutError:
        svc.metrics.timeouts.inc()
        raise RequestTimeoutError(
            f"the request took longer than {svc.settings.request_timeout_s:g} s"
        ) from None


async def run_images(
    svc: Service,
    lm: LoadedModel,
    key: Any,
    pref: dymu.Preference,
    subset: TaskSubset,
    xs: list[torch.Tensor],
    queue_limit: int | None = None,
) -> Ran:
    """The outputs of ``xs`` (normalized (3, H, W) tensors of one size) under the sub-network
    of ``pref`` restricted to ``subset`` (``queue_limit``: the batcher's bound for them)."""
    entry, computed = await svc.entry(lm, key, pref)
    runner = await svc.runner(lm, entry, subset)
    assert svc.batcher is not None
    hw = (int(xs[0].shape[-2]), int(xs[0].shape[-1]))
    group = (svc.generation, key, subset.indices, hw)
    jobs = []
    inline_s = await svc.inline_model_s(len(xs))
    try:
        for x in xs:
            jobs.append(svc.batcher.submit(group, (lm, runner, x), queue_limit, inline_s))
        # Cancelling the wait (the deadline) cancels the jobs' futures: the batcher skips them.
        futures = [job.future for job in jobs]
        one = len(futures) == 1  # a lone image needs no gather
        outs: list[Output] = [await futures[0]] if one else await asyncio.gather(*futures)
    except BaseException:
        for job in jobs:
            job.future.cancel()
        raise
    queue_s = max((job.started or job.enqueued) - job.enqueued for job in jobs)
    return Ran(entry, computed, outs, queue_s)
