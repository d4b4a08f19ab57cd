"""Budgets and degrading under load on real uvicorn servers on loopback (issue 18, item 5).

A budget's tree fits and is the lowest c that does (checked against a scan of c with the model
loaded here), its id reproduces the tree on another server, the 422s carry their reasons, and
a degrading server degrades only requests that allow it, only above its queue threshold (or
when full), and counts them. Timing is made deterministic by holding the inference worker
(``WorkerGate``), never by sleeping.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydantic import ValidationError

import dymu
from benchmarks.frugal import frugal_model
from dymu.preference import KEY_SCALE, Preference
from service.client import AsyncDymuClient, DymuClient
from service.server import BackgroundServer
from service.settings import Settings

from .conftest import tiny_config
from .test_service import HW, metric_samples, metric_value, png, random_image, running, save_tiny
from .test_service_load import WorkerGate

RS = ([1, 1, 1], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7])
SCAN_STEP = 1000  # canonical units of c


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("budget")
    dymu.save(frugal_model(tiny_config(input_size=HW), seed=5), root / "frugal")
    return {"frugal": root / "frugal", "random": save_tiny(root, "random", seed=2)}


@pytest.fixture(scope="module", params=["frugal", "random"])
def served(request, stores) -> Iterator[tuple[BackgroundServer, dymu.ControllableModel]]:
    with running(stores[request.param]) as srv:
        yield srv, dymu.load(stores[request.param], device="cpu")


def scan(model, r, tasks=None) -> list[tuple[int, int]]:
    """(c units, FLOPs of the tree at that c) for the subset, every SCAN_STEP units."""
    pref = model.preference(r, 0.0)
    pref = dymu.preference.canonicalize(list(pref.r), 0.0, model.tasks)[0]
    out = []
    for u in range(0, KEY_SCALE + 1, SCAN_STEP):
        arch = model.architecture(Preference(pref.r, u / KEY_SCALE))
        out.append((u, model.cost(arch, None, tasks).flops))
    return out


@pytest.mark.parametrize("tasks", [None, ["depth", "normals"]])
def test_the_budget_tree_fits_and_is_the_lowest_c_that_does(served, tasks):
    srv, model = served
    with DymuClient(srv.url) as client:
        for r in RS:
            points = scan(model, r, tasks)
            levels = sorted({f for _, f in points})
            for flops in levels[:: max(1, len(levels) // 4)]:
                rec = client.create_preference(r, budget={"max_gflops": flops / 1e9}, tasks=tasks)
                b = rec.budget
                assert b is not None and b.c == rec.c and b.tasks == list(tasks or model.tasks)
                assert b.cost.flops <= b.limit_flops == pytest.approx(flops)
                chosen = round(rec.c * KEY_SCALE)
                assert not any(f <= flops for u, f in points if u < chosen), (r, flops, rec.c)
                assert chosen <= min(u for u, f in points if f <= flops)
                arch = model.architecture(Preference(tuple(rec.r), rec.c))
                assert arch.id == rec.architecture.id  # the served tree is the one costed
                assert model.cost(arch, None, tasks).flops == b.cost.flops


def test_a_fraction_budget_is_of_the_full_anchor(served):
    srv, model = served
    anchor = model.anchor_cost().flops
    with DymuClient(srv.url) as client:
        rec = client.create_preference([1, 1, 1], budget={"max_fraction": 0.95})
    assert rec.budget.limit_flops == pytest.approx(0.95 * anchor)
    assert rec.budget.cost.flops <= 0.95 * anchor


def test_budget_ids_reproduce_the_tree_on_another_server(stores):
    with (
        running(stores["frugal"]) as a,
        running(stores["frugal"]) as b,
        DymuClient(a.url) as ca,
        DymuClient(b.url) as cb,
    ):
        rec = ca.create_preference([0.6, 0.3, 0.1], budget={"max_fraction": 0.8})
        again = cb.get_preference(rec.preference_id)  # b never saw the budget
        assert again.architecture == rec.architecture and again.c == rec.c
        assert again.cost.flops == rec.cost.flops and again.preference_id == rec.preference_id
        img = png(random_image(3))
        by_budget = ca.predict(img, r=[0.6, 0.3, 0.1], budget={"max_fraction": 0.8})
        by_id = cb.predict(img, preference_id=rec.preference_id)
    m = by_budget.metrics
    assert m.preference_id == rec.preference_id and m.c == rec.c and not m.degraded
    assert m.budget is not None and m.budget.c == rec.c and m.flops <= m.budget.limit_flops
    assert by_budget.headers["x-dymu-c"] == f"{rec.c:g}"
    assert by_id.metrics.flops == m.flops and by_id.metrics.architecture_id == m.architecture_id
    for task, out in by_budget.outputs.items():
        assert (out == by_id.outputs[task]).all(), task


def test_budget_predictions_in_a_form_and_for_a_subset(stores):
    model = dymu.load(stores["frugal"], device="cpu")
    with running(stores["frugal"]) as srv, httpx.Client(base_url=srv.url) as http:
        files = {"image": ("x.png", png(random_image(4)), "image/png")}
        data = {"r": "1,1,1", "budget": '{"max_fraction": 0.5}', "tasks": "depth"}
        res = http.post("/predict", files=files, data=data)
        assert res.status_code == 200, res.text
        metrics = res.json()["metrics"]
        choice = model.within_budget(
            dymu.preference.canonicalize([1, 1, 1], 0, model.tasks)[0], {"max_fraction": 0.5},
            ["depth"],
        )  # fmt: skip
        assert metrics["c"] == choice.c and metrics["flops"] == choice.cost.flops
        assert metrics["tasks"] == ["depth"]


def refused(res: httpx.Response, *needles: str) -> str:
    assert res.status_code == 422, res.text
    detail = res.json()["detail"]
    for needle in needles:
        assert needle in detail, detail
    return detail


def test_the_422s_say_why(stores):
    model = dymu.load(stores["frugal"], device="cpu")
    pref = dymu.preference.canonicalize([1, 1, 1], 0, model.tasks)[0]
    cheapest = min(model.cost(s.architecture).flops for s in model.c_segments(pref))
    img = {"image": ("x.png", png(random_image(4)), "image/png")}
    with running(stores["frugal"]) as srv, httpx.Client(base_url=srv.url) as http:
        post = http.post
        res = post("/preference", json={"r": [1, 1, 1], "budget": {"max_gflops": cheapest / 2e9}})
        detail = refused(res, "below the cheapest", str(cheapest))
        assert res.json()["error"] == "budget_infeasible_error", detail
        budget = {"max_fraction": 0.5}
        refused(post("/preference", json={"r": [1, 1, 1], "c": 0, "budget": budget}), "not both")
        refused(post("/preference", json={"r": [1, 1, 1], "budget": {"max_flops": 1}}), "max_flops")
        refused(post("/preference", json={"r": [1, 1, 1], "budget": {}}), "exactly one")
        refused(
            post("/preference", json={"r": [1, 1, 1], "budget": {"max_gflops": True}}), "number"
        )
        refused(post("/preference", json={"r": [1, 1, 1], "tasks": ["depth"]}), "with a budget")
        refused(
            post(
                "/predict",
                files=img,
                data={"r": "1,1,1", "c": "0.5", "budget": '{"max_fraction": 1}'},
            ),
            "not both",
        )
        refused(post("/predict", files=img, data={"budget": '{"max_fraction": 1}'}), "without r")
        pid = post("/preference", json={"r": [1, 1, 1]}).json()["preference_id"]
        refused(
            post(
                "/predict", files=img, data={"preference_id": pid, "budget": '{"max_fraction": 1}'}
            ),
            "preference_id",
        )
        refused(
            post("/predict", files=img, data={"r": "1,1,1", "budget": '{"max_gflops": -1}'}), "> 0"
        )
        assert http.get("/healthz").status_code == 200


# -------------------------------------------------------------------------------- degrading
def predict_raw(http: httpx.AsyncClient, c: float, allow: str | None) -> asyncio.Task:
    """A /predict with r uniform at ``c``; allow: None, "header" or "body"."""
    files = {"image": ("x.png", png(random_image(6)), "image/png")}
    data = {"r": "1,1,1", "c": str(c), "format": "npz"}
    headers = {"X-Dymu-Allow-Degrade": "1"} if allow == "header" else {}
    if allow == "body":
        data["allow_degrade"] = "true"
    return asyncio.create_task(http.post("/predict", files=files, data=data, headers=headers))


async def refusal(task: asyncio.Task) -> int | str:
    """The status of a request the gate refuses before reading its body: 503, or "reset" when
    the kernel's reset (the server closes with the body unread, docs/service.md) overtakes the
    answer on loopback. The server's rejection counter says whether it refused."""
    try:
        return (await task).status_code
    except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
        return "reset"


def test_degrading_happens_only_when_allowed_and_above_the_threshold(stores):
    model = dymu.load(stores["frugal"], device="cpu")
    settings = dict(overload="degrade", degrade_queue_depth=2, max_batch_size=1, max_wait_ms=0)
    with running(stores["frugal"], max_queue=16, **settings) as srv:
        gate = WorkerGate(srv)

        async def main():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as http:
                held = predict_raw(http, 0, "header")  # runs first, held in the worker
                await gate.until(gate.entered.is_set)
                plain = [predict_raw(http, 0, None) for _ in range(2)]
                await gate.until(lambda: gate.batcher.depth == 2)
                at_threshold = predict_raw(http, 0, "header")  # depth 2: not above
                await gate.until(lambda: gate.batcher.depth == 3)
                not_allowed = predict_raw(http, 0, None)  # above, but not allowed
                await gate.until(lambda: gate.batcher.depth == 4)
                by_body = predict_raw(http, 0, "body")  # above and allowed: degraded
                await gate.until(lambda: gate.batcher.depth == 5)
                by_header = predict_raw(http, 0, "header")
                already = predict_raw(http, 1, "header")  # asks for the degrade c itself
                await gate.until(lambda: gate.batcher.depth == 7)
                gate.release()
                done = await asyncio.gather(
                    held, *plain, at_threshold, not_allowed, by_body, by_header, already
                )
                return done, (await http.get("/metrics")).text

        done, text = asyncio.run(main())
    assert [r.status_code for r in done] == [200] * 8
    flags = [r.headers["x-dymu-degraded"] for r in done]
    assert flags == ["0", "0", "0", "0", "0", "1", "1", "0"]
    cheap = model.cost(model.architecture([1, 1, 1], 1.0)).flops
    full = model.cost(model.architecture([1, 1, 1], 0.0)).flops
    for r, degraded in zip(done, flags, strict=True):
        m = json.loads(np.load(io.BytesIO(r.content))["_metrics"].item())
        assert m["degraded"] == (degraded == "1")
        assert m["c"] == (1.0 if degraded == "1" or r is done[-1] else 0.0)
        assert m["flops"] == (cheap if m["c"] == 1.0 else full)
        assert m["requested_c"] == (1.0 if r is done[-1] else 0.0)
    samples = metric_samples(text)
    assert metric_value(samples, "dymu_degraded_requests_total", reason="queue") == 2
    assert metric_value(samples, "dymu_degraded_requests_total", reason="full") == 0
    assert cheap < full


def test_a_full_degrading_server_admits_what_allows_it_and_refuses_the_rest(stores):
    settings = dict(overload="degrade", max_batch_size=1, max_wait_ms=0, max_queue=1)
    with running(stores["frugal"], **settings) as srv:  # at most 2 in flight
        gate = WorkerGate(srv)

        async def main():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as http:
                first = predict_raw(http, 0, None)
                await gate.until(gate.entered.is_set)
                queued = predict_raw(http, 0, None)
                await gate.until(lambda: gate.batcher.depth == 1)
                refused_ = await refusal(predict_raw(http, 0, None))
                body_only = await refusal(predict_raw(http, 0, "body"))  # the gate cannot see it
                admitted = predict_raw(http, 0, "header")
                await gate.until(lambda: gate.batcher.depth == 2)
                gate.release()
                done = await asyncio.gather(first, queued, admitted)
                return refused_, body_only, done, (await http.get("/metrics")).text

        refused_, body_only, done, text = asyncio.run(main())
    assert refused_ in (503, "reset") and body_only in (503, "reset")
    assert [r.status_code for r in done] == [200, 200, 200]
    assert [r.headers["x-dymu-degraded"] for r in done] == ["0", "0", "1"]
    samples = metric_samples(text)
    assert metric_value(samples, "dymu_degraded_requests_total", reason="full") == 1
    assert metric_value(samples, "dymu_queue_rejections_total") == 2


def test_degrading_is_off_by_default_and_a_degrade_budget_is_obeyed(stores):
    model = dymu.load(stores["frugal"], device="cpu")
    pref = dymu.preference.canonicalize([1, 1, 1], 0, model.tasks)[0]
    expected = model.within_budget(pref, {"max_fraction": 0.85}).c
    for overload, flag, c in (("refuse", "0", 0.0), ("degrade", "1", expected)):
        extra = {"degrade_budget": {"max_fraction": 0.85}, "degrade_queue_depth": 0}
        with running(stores["frugal"], overload=overload, max_batch_size=1, **extra) as srv:
            gate = WorkerGate(srv)

            async def main(srv=srv, gate=gate):
                async with AsyncDymuClient(srv.url, timeout=60) as client:
                    img = png(random_image(1))

                    def call(allow: bool) -> asyncio.Task:
                        coro = client.predict(img, r=[1, 1, 1], c=0, allow_degrade=allow)
                        return asyncio.create_task(coro)

                    held = call(False)
                    await gate.until(gate.entered.is_set)
                    plain = call(False)
                    await gate.until(lambda: gate.batcher.depth == 1)
                    allowed = call(True)
                    await gate.until(lambda: gate.batcher.depth == 2)
                    gate.release()
                    return await asyncio.gather(held, plain, allowed)

            done = asyncio.run(main())
        assert [r.headers["x-dymu-degraded"] for r in done] == ["0", "0", flag], overload
        assert done[-1].metrics.c == c and done[-1].metrics.degraded == (flag == "1")
    assert 0 < expected < 1


def test_bad_degrade_settings_are_refused():
    with pytest.raises(ValidationError, match="exactly one"):
        Settings(degrade_budget={})
    with pytest.raises(ValidationError, match=r"\[0, 1\]"):
        Settings(degrade_c=1.5)
    with pytest.raises(ValidationError):
        Settings(overload="shed")
