"""The service on Ray Serve: a local Ray (2 CPUs), 2 replicas, driven over HTTP on loopback.

Needs the ``ray`` extra (``make test-scale`` installs it); marked ``scale``.
"""

from __future__ import annotations

import asyncio
import io
import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

import dymu
from dymu.preference import canonicalize
from service.settings import Settings

from .test_service import TASKS, png, random_image, reference, save_tiny

ray = pytest.importorskip("ray", reason="Ray Serve tests need the ray extra (make test-scale)")
serve = pytest.importorskip("ray.serve")

pytestmark = pytest.mark.scale

REPLICAS = 2
PREFERENCES = [([0.7, 0.2, 0.1], 0.0), ([0.1, 0.8, 0.1], 0.5), ([0.2, 0.2, 0.6], 1.0),
               ([1 / 3, 1 / 3, 1 / 3], 0.25)]  # fmt: skip
# Preferences no other test asks for: their first request must build their sub-network.
FRESH = [([0.5, 0.4, 0.1], 0.1), ([0.3, 0.3, 0.4], 0.6), ([0.05, 0.15, 0.8], 0.9),
         ([0.45, 0.1, 0.45], 0.3)]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("ray"))


@pytest.fixture(scope="module")
def url(store) -> Iterator[str]:
    """A local Ray with 2 CPUs, the dymu application with 2 replicas, its HTTP URL."""
    from service.ray_app import build_app

    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = Settings(model_dir=store, backend="torch", max_wait_ms=2)
        serve.run(build_app(settings, REPLICAS), name="dymu", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def predict(client: httpx.Client, r, c, fmt: str = "json", seed: int = 0) -> httpx.Response:
    data = {"r": ",".join(str(v) for v in r), "c": str(c), "format": fmt}
    return client.post("/predict", files={"image": png(random_image(seed))}, data=data)


def test_each_preference_gets_its_own_sub_network(url, store):
    """Outputs for 4 preferences equal a direct materialize of the same model for that
    preference (and not for the others)."""
    model = dymu.load(store, device="cpu")
    with httpx.Client(base_url=url, timeout=60) as client:
        info = client.get("/v1/model").json()
        norm = type("Info", (), {"input_normalization": info["input_normalization"]})
        rgb = random_image(7)
        refs, outs = [], []
        for r, c in PREFERENCES:
            pref, _ = canonicalize(r, c, TASKS)
            record = type("Record", (), {"r": pref.r, "c": pref.c})
            refs.append(reference(model, record, rgb, norm))
            resp = predict(client, r, c, fmt="npz", seed=7)
            assert resp.status_code == 200, resp.text
            assert resp.headers["x-dymu-replica"]
            outs.append(dict(np.load(io.BytesIO(resp.content))))
    for i, out in enumerate(outs):
        for j, ref in enumerate(refs):
            same = all(np.allclose(out[t], ref[t], atol=1e-4, rtol=1e-4) for t in TASKS)
            assert same == (i == j), (i, j)


def test_repeat_requests_are_routed_to_the_replica_that_cached_them(url):
    with httpx.Client(base_url=url, timeout=60) as client:
        first = {}
        for k, (r, c) in enumerate(FRESH):
            resp = predict(client, r, c, seed=k)
            assert resp.status_code == 200, resp.text
            assert resp.headers["x-dymu-cache"] == "miss"
            first[k] = resp.headers["x-dymu-replica"]
        time.sleep(1.0)  # a replica reports its loaded ids to the router asynchronously
        cache, served = Counter(), Counter()
        for rep in range(6):
            for r, c in FRESH:
                resp = predict(client, r, c, seed=rep)
                assert resp.status_code == 200, resp.text
                cache[resp.headers["x-dymu-cache"]] += 1
                served[resp.headers["x-dymu-replica"]] += 1
    total = sum(cache.values())
    assert cache["hit"] >= 0.8 * total, (cache, served, first)
    assert len(served) <= REPLICAS


def _replica_actor(replica_id: str):
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if "DymuReplica" in actor["name"] and actor["name"].endswith(replica_id):
            return ray.get_actor(actor["name"], namespace=actor["namespace"])
    raise LookupError(replica_id)


async def _load(url: str, clients: int, requests: int, kill_after: int, kill) -> list:
    """``clients`` concurrent clients send ``requests`` in all; after ``kill_after`` answers,
    ``kill()`` runs. Returns (status, body, in_flight_at_kill) per request."""
    done, in_flight, results = 0, 0, []
    killed = asyncio.Event()
    queue = list(range(requests))

    async def one_client(client: httpx.AsyncClient) -> None:
        nonlocal done, in_flight
        while queue:
            k = queue.pop()
            r, c = PREFERENCES[k % len(PREFERENCES)]
            data = {"r": ",".join(map(str, r)), "c": str(c)}
            in_flight += 1
            try:
                resp = await client.post(
                    "/predict", files={"image": png(random_image(k))}, data=data
                )
            finally:
                in_flight -= 1
            results.append((resp.status_code, resp.content, killed.is_set()))
            done += 1
            if done == kill_after and not killed.is_set():
                kill(in_flight)
                killed.set()

    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        await asyncio.gather(*(one_client(client) for _ in range(clients)))
    return results


def test_a_killed_replica_fails_only_its_in_flight_requests_and_the_service_recovers(url):
    with httpx.Client(base_url=url, timeout=60) as client:
        victim = predict(client, *PREFERENCES[0]).headers["x-dymu-replica"]
    actor = _replica_actor(victim)
    at_kill = {}

    def kill(in_flight: int) -> None:
        at_kill["in_flight"] = in_flight
        ray.kill(actor, no_restart=True)

    clients = 8
    results = asyncio.run(_load(url, clients, requests=96, kill_after=24, kill=kill))
    assert len(results) == 96  # every request was answered: none hung (60 s client timeout)
    failed = [(s, body) for s, body, _ in results if s != 200]
    for status, body in failed:
        assert status == 503, (status, body)
        assert b'"replica_failed"' in body and b"detail" in body, body
    # Only requests that were in flight on the killed replica (at most all the in-flight ones,
    # plus those the router had already sent to it) fail.
    assert len(failed) <= clients, (len(failed), at_kill)
    # Recovery: Ray replaces the replica; both replicas serve again and nothing fails.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = serve.status().applications["dymu"].deployments["DymuReplica"]
        if status.replica_states.get("RUNNING", 0) == REPLICAS:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"the killed replica was not replaced: {status}")
    with httpx.Client(base_url=url, timeout=60) as client:
        replicas = set()
        for k in range(16):
            resp = predict(client, *PREFERENCES[k % 4], seed=k)
            assert resp.status_code == 200, resp.text
            replicas.add(resp.headers["x-dymu-replica"])
    assert victim not in replicas
