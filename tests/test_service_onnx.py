"""The ONNX Runtime backend: export per tree, torch while the session builds, one session shared
by every preference with the same tree, and the same outputs as torch."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import dymu
from dymu.preference import canonicalize
from service import prefid
from service.client import DymuClient
from service.server import BackgroundServer

from .test_service import TASKS, metric_samples, metric_value, random_image, reference, running
from .test_service import save_tiny as _save_tiny

pytest.importorskip("onnxruntime")
# The export runs on a server thread; its tracer warnings (silenced there) can race with
# pytest's per-test warning capture.
pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")

WAIT = 60.0


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("onnx"))


@pytest.fixture(scope="module")
def model(store):
    return dymu.load(store, device="cpu")


@pytest.fixture(scope="module")
def server(store) -> Iterator[BackgroundServer]:
    with running(store, backend="onnx", max_batch_size=4, max_wait_ms=1) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> Iterator[DymuClient]:
    with DymuClient(server.url, timeout=60) as c:
        yield c


def wait_onnx(client: DymuClient, pid: str) -> None:
    deadline = time.monotonic() + WAIT
    while (state := client.get_preference(pid).backends["onnx"]) != "ready":
        assert state in ("building", "ready"), state
        assert time.monotonic() < deadline, "the ONNX session was not built in time"
        time.sleep(0.02)


def test_default_preference_is_served_by_onnx_after_warm_up(client, model):
    info = client.model()
    assert info.backend == "onnx"
    default = client.get_preference(info.default_preference_id)
    assert default.backends == {"torch": "ready", "onnx": "ready"}  # warm-up waited for it
    rgb = random_image(20)
    res = client.predict(rgb, format="npz")
    assert res.metrics.backend == "onnx" and res.headers["x-dymu-backend"] == "onnx"
    ref = reference(model, default, rgb, info)
    for t in TASKS:
        np.testing.assert_allclose(res.outputs[t], ref[t], atol=1e-4, rtol=1e-4)


def test_torch_and_onnx_give_the_same_outputs(client, model):
    info = client.model()
    rec = client.create_preference([0.1, 0.6, 0.3], 0.65)
    rgb = random_image(21, (40, 56))  # another size: the graph has dynamic H, W
    first = client.predict(rgb, preference_id=rec.preference_id, format="npz")
    assert first.metrics.backend in ("torch", "onnx")  # torch while the session builds
    wait_onnx(client, rec.preference_id)
    by_onnx = client.predict(rgb, preference_id=rec.preference_id, format="npz")
    assert by_onnx.metrics.backend == "onnx"
    ref = reference(model, rec, rgb, info)  # eager torch, here
    for t in TASKS:
        np.testing.assert_allclose(by_onnx.outputs[t], ref[t], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(first.outputs[t], ref[t], atol=1e-4, rtol=1e-4)
    # a task subset is its own (smaller) graph
    sub = client.predict(rgb, preference_id=rec.preference_id, tasks=["depth"], format="npz")
    np.testing.assert_allclose(sub.outputs["depth"], ref["depth"], atol=1e-4, rtol=1e-4)


def test_preferences_with_the_same_tree_share_one_session(client, model):
    info = client.model()
    by_tree: dict[str, list] = {}
    for k in range(60):
        r = [(k * 7) % 5 + 0.5, (k * 3) % 4 + 0.5, k % 3 + 0.5]
        pref, key = canonicalize(r, (k % 10) / 9, TASKS)
        by_tree.setdefault(model.architecture(pref).id, []).append(key)
    key_a, key_b = next(keys for keys in by_tree.values() if len(keys) >= 2)[:2]
    pid_a = prefid.encode(key_a, info.name, info.version)
    pid_b = prefid.encode(key_b, info.name, info.version)
    wait_onnx(client, pid_a)
    b = client.get_preference(pid_b)
    assert b.backends["onnx"] == "ready"  # no export: the tree's session already exists
    a = client.get_preference(pid_a)
    assert a.architecture.id == b.architecture.id
    rgb = random_image(22)
    out_a = client.predict(rgb, preference_id=pid_a, format="npz")
    out_b = client.predict(rgb, preference_id=pid_b, format="npz")
    assert out_a.metrics.backend == out_b.metrics.backend == "onnx"
    ref_b = reference(model, b, rgb, info)
    for t in TASKS:  # the session ran b's own BN-adapted weights, not a's
        np.testing.assert_allclose(out_b.outputs[t], ref_b[t], atol=1e-4, rtol=1e-4)
    assert max(np.abs(out_a.outputs[t] - out_b.outputs[t]).max() for t in TASKS) > 1e-3
    samples = metric_samples(client.metrics())
    assert metric_value(samples, "dymu_onnx_export_seconds_count") >= 2
    assert metric_value(samples, "dymu_model_inference_seconds_count", backend="onnx") >= 2


def test_backend_auto_serves_the_fastest_measured_backend(store):
    """--backend auto times eager torch, channels-last torch and ONNX Runtime on the default
    tree at warm-up (batch max_batch_size) and serves the fastest; /v1/model shows both."""
    with running(store, backend="auto", max_batch_size=2) as srv, DymuClient(srv.url) as client:
        info = client.model()
        times = info.backend_times_ms
        assert times is not None and set(times) == {"torch", "torch-cl", "onnx"}
        assert all(t > 0 for t in times.values())
        assert info.backend == min(times, key=times.__getitem__)
        res = client.predict(random_image(5), format="npz")
        assert res.metrics.backend == info.backend
    with running(store, backend="torch") as srv, DymuClient(srv.url) as client:
        assert client.model().backend_times_ms is None  # a fixed backend is not measured


def test_an_unfolded_tree_exports_with_its_batchnorm_and_matches_torch(model):
    # In eval mode the exporter would fuse Conv+BN into tensors no module parameter can feed;
    # the unfolded tree keeps its BatchNormalization nodes, fed by the module's own BN tensors.
    import onnx
    import torch

    from service.backends import OnnxSession, export_onnx

    x = torch.rand(2, 3, 24, 32, generator=torch.Generator().manual_seed(0))
    for fold in (True, False):
        net = model.materialize([0.5, 0.2, 0.3], 0.4, fold_bn=fold)
        data = export_onnx(net, (24, 32))
        ops = {node.op_type for node in onnx.load_from_string(data).graph.node}
        assert ("BatchNormalization" in ops) is not fold
        session = OnnxSession(data, torch.device("cpu"), 1)
        out = session.run(x.numpy(), session.weights(net))
        with torch.no_grad():
            ref = net(x)
        for name, got in zip(session.output_names, out, strict=True):
            np.testing.assert_allclose(got, ref[name].numpy(), rtol=1e-4, atol=1e-4)
