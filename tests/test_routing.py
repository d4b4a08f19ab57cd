"""The prediction routes without FastAPI's per-request machinery (service/routing.py), the ONNX
weights bound once per preference (service.backends.Feed) and the costs a served model keeps
(service.runtime.LoadedModel.cost)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import fastapi.routing
import httpx
import numpy as np
import pytest
import torch
import uvicorn
from fastapi import Depends, FastAPI, Request, Response

import dymu
from benchmarks.lean_http import oip_call
from service.client import DymuClient
from service.metrics import Metrics
from service.routing import LeanRoute
from service.runtime import LoadedModel
from service.settings import Settings

from .test_service import HW, random_image, running
from .test_service import save_tiny as _save_tiny


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("routing"))


# ------------------------------------------------------------------------------ LeanRoute
@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """``app`` on a real uvicorn server on a free loopback port; yields its URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


async def _dep() -> int:
    return 1


def test_a_lean_route_refuses_an_endpoint_that_asks_for_more_than_it_would_get():
    async def with_dependency(request: Request, x: int = Depends(_dep)) -> Response:
        return Response()

    async def with_query(request: Request, q: str) -> Response:
        return Response()

    async def without_request(model: str) -> Response:
        return Response()

    async def typed_path(request: Request, n: int) -> Response:
        return Response()

    for path, endpoint in [
        ("/a", with_dependency),
        ("/b", with_query),
        ("/c/{model}", without_request),
        ("/d/{n}", typed_path),
    ]:
        with pytest.raises(TypeError, match=endpoint.__name__):
            LeanRoute(path, endpoint, methods=["POST"])


def test_a_lean_route_calls_its_endpoint_with_the_request_and_path_parameters():
    app = FastAPI()
    seen: list = []

    async def endpoint(request: Request, model: str, version: str) -> Response:
        seen.append((request.method, model, version, await request.body()))
        return Response(b"ok")

    app.router.add_api_route(
        "/m/{model}/v/{version}", endpoint, methods=["POST"], route_class_override=LeanRoute
    )
    with serving(app) as url:
        reply = httpx.post(f"{url}/m/abc/v/7", content=b"body")
        schema = httpx.get(f"{url}/openapi.json").json()
    assert reply.status_code == 200 and reply.content == b"ok"
    assert seen == [("POST", "abc", "7", b"body")]
    params = schema["paths"]["/m/{model}/v/{version}"]["post"]["parameters"]
    assert {p["name"] for p in params} == {"model", "version"}  # still documented


def test_predictions_are_served_without_fastapis_dependency_solving(store, monkeypatch):
    calls: list[str] = []
    solve = fastapi.routing.solve_dependencies

    async def counted(*args, **kwargs):
        calls.append(kwargs["request"].url.path)
        return await solve(*args, **kwargs)

    with running(store) as server, DymuClient(server.url) as client:
        info = client.model()
        monkeypatch.setattr(fastapi.routing, "solve_dependencies", counted)
        rgb = random_image(3)
        res = client.predict(rgb, format="npz")
        call = oip_call(info.name, rgb, info.default_preference_id)
        oip = httpx.post(server.url + call.path, content=call.body, headers=call.headers)
        client.model()  # an ordinary route still goes through FastAPI's solver
    assert res.outputs and oip.status_code == 200
    assert calls == ["/v1/model"]


# ----------------------------------------------------------------------------------- Feed
def test_onnx_weights_are_bound_once_and_outputs_written_in_place(store, monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    from service.backends import OnnxSession, export_onnx

    model = dymu.load(store, device="cpu")
    net = model.materialize([0.5, 0.2, 0.3], 0.4)
    session = OnnxSession(export_onnx(net, HW), torch.device("cpu"), 1)
    feed = session.weights(net)
    bound: list[str] = []
    bind = ort.IOBinding.bind_ortvalue_input
    monkeypatch.setattr(
        ort.IOBinding,
        "bind_ortvalue_input",
        lambda self, name, value: (bound.append(name), bind(self, name, value))[1],
    )
    gen = torch.Generator().manual_seed(0)
    for hw in [HW, (16, 40), HW]:  # a new size learns its output shapes, then writes in place
        xs = [torch.rand(2, 3, *hw, generator=gen) for _ in range(3)]
        outs = [session.run(x.numpy(), feed) for x in xs]
        for x, out in zip(xs, outs, strict=True):  # each run's arrays are its own
            with torch.no_grad():
                ref = net(x)
            for name, got in zip(session.output_names, out, strict=True):
                np.testing.assert_allclose(got, ref[name].numpy(), rtol=1e-4, atol=1e-4)
    assert bound == []  # the weights went in when the feed was made, not per run


def test_concurrent_runs_of_one_feed_each_get_their_own_outputs(store):
    pytest.importorskip("onnxruntime")
    from service.backends import OnnxSession, export_onnx

    model = dymu.load(store, device="cpu")
    net = model.materialize([0.2, 0.2, 0.6], 0.8)
    session = OnnxSession(export_onnx(net, HW), torch.device("cpu"), 1)
    feed = session.weights(net)
    xs = [torch.rand(1, 3, *HW, generator=torch.Generator().manual_seed(k)) for k in range(4)]
    with torch.no_grad():
        refs = [net(x) for x in xs]
    errors: list[str] = []

    def worker(k: int) -> None:
        for _ in range(25):
            out = session.run(xs[k].numpy(), feed)
            for name, got in zip(session.output_names, out, strict=True):
                if not np.allclose(got, refs[k][name].numpy(), rtol=1e-4, atol=1e-4):
                    errors.append(f"thread {k}: {name}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# ----------------------------------------------------------------------------------- cost
def test_a_served_models_costs_are_kept_per_tree_size_and_subset(store):
    model = dymu.load(store, device="cpu")
    lm = LoadedModel(model, Settings(backend="torch"), Metrics())
    arch = model.architecture(dymu.Preference((0.6, 0.3, 0.1), 0.5))
    other = model.architecture(dymu.Preference((0.1, 0.1, 0.8), 1.0))
    cm = model.cost_model
    for a in (arch, other, arch):
        for hw in [HW, (48, 64), HW]:
            for subset in [lm.all_tasks, lm.subset(["depth"]), lm.all_tasks]:
                want = cm.architecture_cost(a, hw, subset.indices)
                assert lm.cost(a, hw, subset) == want
    assert lm.cost(arch, (48, 64), lm.all_tasks).flops > lm.cost(arch, HW, lm.all_tasks).flops
