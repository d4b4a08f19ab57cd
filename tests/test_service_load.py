"""The service under load: concurrency, batching, the bounded queue, timeouts, eviction, and
readiness during start-up. Timing-sensitive situations are made deterministic by holding the
inference worker at a gate (the server runs in this process), never by sleeping."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import dymu
from service.client import AsyncDymuClient, DymuAPIError, DymuClient
from service.runtime import LoadedModel
from service.server import BackgroundServer

from .test_service import (
    HW,
    TASKS,
    metric_samples,
    metric_value,
    png,
    random_image,
    reference,
    running,
    save_tiny,
)

WAIT = 30.0  # generous bound for anything that must happen "soon"


class WorkerGate:
    """Holds every model batch until released; records batch sizes."""

    def __init__(self, server: BackgroundServer) -> None:
        self.batcher = server.service.batcher
        self.inner = self.batcher._run
        self.open = threading.Event()
        self.entered = threading.Event()
        self.sizes: list[int] = []
        self.batcher._run = self

    def __call__(self, payloads):
        self.sizes.append(len(payloads))
        self.entered.set()
        self.open.wait(WAIT)
        return self.inner(payloads)

    def release(self) -> None:
        self.open.set()  # stays installed, open: later batches pass (and are recorded)

    async def until(self, predicate) -> None:
        deadline = time.monotonic() + WAIT
        while not predicate():
            assert time.monotonic() < deadline, "timed out waiting for the server"
            await asyncio.sleep(0.002)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("load"))


@pytest.fixture(scope="module")
def model(store):
    return dymu.load(store, device="cpu")


@pytest.fixture(scope="module")
def busy(store) -> Iterator[BackgroundServer]:
    """Batching on, a cache of only 3 preferences (so 8 preferences keep evicting)."""
    with running(store, max_batch_size=8, max_wait_ms=5, max_queue=256, cache_max_entries=3) as srv:
        yield srv


@pytest.fixture(scope="module")
def gated(store) -> Iterator[BackgroundServer]:
    """A small queue (3 images) and batches of up to 4, no waiting to fill."""
    with running(store, max_batch_size=4, max_wait_ms=0, max_queue=3) as srv:
        yield srv


PREFS = [
    ([1, 0, 0], 0.0),
    ([0, 1, 0], 0.2),
    ([0, 0, 1], 0.4),
    ([1, 1, 1], 0.6),
    ([3, 1, 0], 0.8),
    ([0, 2, 1], 1.0),
    ([1, 0, 4], 0.1),
    ([2, 2, 1], 0.9),
]


def test_100_concurrent_predictions_over_8_preferences(busy, model):
    images = [random_image(100 + i) for i in range(4)]

    async def main():
        async with AsyncDymuClient(busy.url, timeout=60) as client:
            info = await client.model()
            records = await asyncio.gather(*(client.create_preference(r, c) for r, c in PREFS))
            jobs = [(k % 8, (k // 8) % 4) for k in range(100)]
            # half by id, half inline; every request its own preference
            results = await asyncio.gather(
                *(
                    client.predict(
                        images[i],
                        format="npz",
                        **(
                            {"preference_id": records[p].preference_id}
                            if k % 2
                            else {"r": PREFS[p][0], "c": PREFS[p][1]}
                        ),
                    )
                    for k, (p, i) in enumerate(jobs)
                )
            )
            return info, records, jobs, results

    info, records, jobs, results = asyncio.run(main())
    refs = {
        (p, i): reference(model, records[p], images[i], info) for p in range(8) for i in range(4)
    }
    # the preferences really give different outputs, so a mix-up could not pass
    for i in range(4):
        for a, b in itertools.combinations(range(8), 2):
            gap = max(np.abs(refs[a, i][t] - refs[b, i][t]).max() for t in TASKS)
            assert gap > 1e-3, (a, b, gap)
    batch_sizes = []
    for (p, i), res in zip(jobs, results):
        assert res.metrics.preference_id == records[p].preference_id
        assert res.metrics.architecture_id == records[p].architecture.id
        assert res.metrics.flops == records[p].cost.flops
        for t in TASKS:
            assert res.outputs[t].flags.writeable  # the async client's own buffer, as numpy.load
            np.testing.assert_allclose(res.outputs[t], refs[p, i][t], atol=1e-4, rtol=1e-4)
        batch_sizes.append(res.metrics.batch_size)
    assert all(1 <= b <= 8 for b in batch_sizes)
    samples = metric_samples(DymuClient(busy.url).metrics())
    assert metric_value(samples, "dymu_preference_cache_evictions_total") >= 5
    assert metric_value(samples, "dymu_preference_cache_entries") <= 4  # 3 + the pinned default
    assert metric_value(samples, "dymu_batch_size_sum") >= 100


def test_concurrent_posts_of_a_new_preference_compute_once(busy):
    async def main():
        async with AsyncDymuClient(busy.url) as client:
            before = metric_samples(await client.metrics())
            recs = await asyncio.gather(
                *(client.create_preference([0.123, 0.456, 0.421], 0.777) for _ in range(8))
            )
            after = metric_samples(await client.metrics())
            return before, recs, after

    before, recs, after = asyncio.run(main())
    assert len({r.preference_id for r in recs}) == 1
    assert sum(not r.cached for r in recs) == 1
    misses = "dymu_preference_cache_misses_total"
    assert metric_value(after, misses) - metric_value(before, misses) == 1
    mat = "dymu_materialization_seconds_count"
    assert metric_value(after, mat) - metric_value(before, mat) == 1


def test_evicted_ids_are_rebuilt_on_demand(busy, model):
    with DymuClient(busy.url) as client:
        first = client.create_preference([5, 1, 1], 0.35)
        for k in range(4):  # evict it (cache of 3)
            client.create_preference([1, k + 1, 1], 0.5)
        again = client.get_preference(first.preference_id)
        assert again.cached is False  # rebuilt from the id alone
        assert again.model_dump(exclude={"cached", "elapsed_ms", "compute_ms"}) == (
            first.model_dump(exclude={"cached", "elapsed_ms", "compute_ms"})
        )
        rgb = random_image(7)
        res = client.predict(rgb, preference_id=first.preference_id, format="npz")
        ref = reference(model, first, rgb, client.model())
        np.testing.assert_allclose(res.outputs["normals"], ref["normals"], atol=1e-4)


def test_batching_groups_a_preference_and_the_queue_is_bounded(gated):
    gate = WorkerGate(gated)

    async def main():
        async with AsyncDymuClient(gated.url) as client:
            img = png(random_image(8))
            first = asyncio.create_task(client.predict(img, format="npz"))
            await gate.until(gate.entered.is_set)  # the worker is busy with it
            queued = [asyncio.create_task(client.predict(img, format="npz")) for _ in range(3)]
            await gate.until(lambda: gate.batcher.depth == 3)
            t0 = time.monotonic()
            with pytest.raises(DymuAPIError) as err:
                await client.predict(img, format="npz")
            refused_in = time.monotonic() - t0
            gate.release()
            done = await asyncio.gather(first, *queued)
            metrics = metric_samples(await client.metrics())
            return err.value, refused_in, done, metrics

    err, refused_in, done, metrics = asyncio.run(main())
    assert err.status == 503 and err.error == "overloaded" and err.retry_after == 1
    assert refused_in < WAIT  # answered while the worker was still held: it never hangs
    assert gate.sizes == [1, 3]
    assert [r.metrics.batch_size for r in done] == [1, 3, 3, 3]
    assert len({r.metrics.model_ms for r in done[1:]}) == 1  # one forward for the three
    assert metric_value(metrics, "dymu_queue_rejections_total") == 1
    assert metric_value(metrics, "dymu_queue_depth") == 0


def test_per_request_timeout_is_504(store):
    with running(store, request_timeout_s=0.5) as srv:
        gate = WorkerGate(srv)
        try:
            with DymuClient(srv.url) as client, pytest.raises(DymuAPIError) as err:
                client.predict(random_image(9))
        finally:
            gate.release()
        assert err.value.status == 504 and "0.5 s" in err.value.detail
        with DymuClient(srv.url) as client:
            assert client.predict(random_image(9)).metrics.batch_size == 1  # still serving
            samples = metric_samples(client.metrics())
            assert metric_value(samples, "dymu_request_timeouts_total") == 1


def test_eviction_never_breaks_an_in_flight_request(store, model):
    with running(store, cache_max_entries=1, max_wait_ms=0) as srv:
        gate = WorkerGate(srv)

        async def main():
            async with AsyncDymuClient(srv.url) as client:
                info = await client.model()
                rec = await client.create_preference([1, 5, 2], 0.45)
                rgb = random_image(10)
                task = asyncio.create_task(
                    client.predict(rgb, preference_id=rec.preference_id, format="npz")
                )
                await gate.until(gate.entered.is_set)
                for k in range(3):  # each new preference evicts the previous one
                    await client.create_preference([k + 1, 1, 1], 0.9)
                lm = srv.service.current
                cached = {e.preference_id for e in lm.cache._entries.values()}
                assert rec.preference_id not in cached
                gate.release()
                return info, rec, rgb, await task

        info, rec, rgb, res = asyncio.run(main())
        ref = reference(model, rec, rgb, info)
        assert res.metrics.preference_id == rec.preference_id
        for t in TASKS:
            np.testing.assert_allclose(res.outputs[t], ref[t], atol=1e-4, rtol=1e-4)


def test_readiness_before_and_after_warm_up(store, monkeypatch):
    release = threading.Event()
    warm_up = LoadedModel.warm_up

    def gated_warm_up(self, entry):
        release.wait(WAIT)
        return warm_up(self, entry)

    monkeypatch.setattr(LoadedModel, "warm_up", gated_warm_up)
    with running(store, wait=False) as srv, DymuClient(srv.url) as client:
        try:
            http = client.http
            deadline = time.monotonic() + WAIT
            while "warm-up" not in (client.ready().detail or ""):
                assert time.monotonic() < deadline
                time.sleep(0.005)
            assert http.get("/healthz").status_code == 200
            assert http.get("/v2/health/live").status_code == 200
            res = http.get("/readyz")
            assert res.status_code == 503 and res.headers["retry-after"] == "1"
            assert res.json()["ready"] is False and res.json()["status"] == "warming up"
            assert http.get("/v2/health/ready").status_code == 503
            for call in (
                lambda: http.post("/predict", files={"image": ("i", png(random_image(1)))}),
                lambda: http.post("/preference", json={"r": [1, 1, 1], "c": 0}),
                lambda: http.get("/v1/model"),
            ):
                res = call()
                assert res.status_code == 503 and res.json()["error"] == "not_ready"
            samples = metric_samples(client.metrics())
            assert metric_value(samples, "dymu_ready") == 0
        finally:
            release.set()
        assert client.wait_ready(WAIT).ready
        assert client.http.get("/v2/health/ready").json() == {"ready": True}
        assert client.predict(random_image(1)).metrics.input_size == list(HW)


def test_a_broken_artifact_never_becomes_ready(tmp_path):
    bad = save_tiny(tmp_path, "broken")
    (bad / "v1" / "anchor.safetensors").write_bytes(b"tampered")
    # exit_on_load_error=False: stay up, live but not ready (the default exits: that is
    # tests/test_service_strict.py's test_a_corrupt_artifact_stops_dymu_serve_with_one_line)
    with running(bad, wait=False, exit_on_load_error=False) as srv, DymuClient(srv.url) as client:
        deadline = time.monotonic() + WAIT
        while (state := client.ready()).status != "failed":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert "anchor.safetensors" in state.detail
        assert client.http.get("/readyz").status_code == 503
        assert client.http.get("/healthz").status_code == 200
