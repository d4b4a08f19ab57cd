"""The service over real HTTP: a uvicorn server on a free loopback port, driven by the client.

Also unit tests of the pieces that need no server (preference ids, the cache, image decoding).
The helpers at the top are shared by the other tests/test_service_*.py modules.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

import dymu
from dymu.preference import Preference, canonicalize
from service import prefid
from service.cache import PreferenceCache
from service.client import DymuAPIError, DymuClient, image_bytes
from service.errors import (
    BadImageError,
    MalformedPreferenceIdError,
    PayloadTooLargeError,
    UnknownPreferenceIdError,
    UnsupportedMediaTypeError,
)
from service.imaging import decode_image, to_tensor
from service.server import BackgroundServer
from service.settings import Settings

from .conftest import randomize_, tiny_config

TASKS = ("segmentation", "depth", "normals")
HW = (24, 32)


# ------------------------------------------------------------------------------ helpers
def save_tiny(root: Path, name: str = "tiny", seed: int = 0) -> Path:
    """A tiny random model (3 dense tasks, 24x32) saved as ``root/name/v1``; large BN deltas,
    so that different preferences give clearly different outputs."""
    torch.manual_seed(seed)
    model = randomize_(dymu.create_model(tiny_config(input_size=HW)), seed=seed, delta_scale=1.0)
    dymu.save(model, root / name)
    return root / name


@contextmanager
def running(model_dir: Path, wait: bool = True, **overrides) -> Iterator[BackgroundServer]:
    settings = Settings(model_dir=model_dir, backend=overrides.pop("backend", "torch"), **overrides)
    with BackgroundServer(settings) as server:
        if wait:
            with DymuClient(server.url) as client:
                client.wait_ready(timeout=60)
        yield server


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def random_image(seed: int, hw: tuple[int, int] = HW) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)


def reference(model, record, rgb: np.ndarray, info, tasks=None) -> dict[str, np.ndarray]:
    """What the server must answer: the canonical preference's sub-network, run here."""
    pref = Preference(tuple(record.r), record.c)
    net = model.materialize(pref, None, tasks)
    norm = info.input_normalization
    x = to_tensor(rgb, norm["mean"], norm["std"])[None]
    with torch.no_grad():
        out = net(x)
    return {k: v[0].numpy() for k, v in out.items()}


def metric_samples(text: str) -> dict[str, list]:
    """{sample name: [(labels, value), ...]} from the exposition, parsed by prometheus_client."""
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def metric_value(samples: dict[str, list], name: str, **labels) -> float:
    found = samples.get(name, [])
    return sum(v for lab, v in found if all(lab.get(k) == w for k, w in labels.items()))


# ------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("svc"))


@pytest.fixture(scope="module")
def model(store):
    return dymu.load(store, device="cpu")


@pytest.fixture(scope="module")
def server(store) -> Iterator[BackgroundServer]:
    with running(
        store, max_body_bytes=300_000, max_pixels=100_000, max_batch_size=8, max_wait_ms=2
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> Iterator[DymuClient]:
    with DymuClient(server.url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def info(client):
    return client.model()


# ------------------------------------------------------------------- units: preference ids
def test_preference_id_is_canonical_reversible_and_checked():
    for i, (r, c) in enumerate(
        [([1, 1, 1], 0), ([0.6, 0.3, 0.1], 0.5), ([1e-9, 1, 0], 1.0), ({"depth": 2}, 0.25)]
    ):
        pref, key = canonicalize(r, c, TASKS)
        pid = prefid.encode(key, "tiny", "v1")
        back, key2 = prefid.decode(pid, TASKS, "tiny", "v1")
        assert key2 == key and back == pref, i
        assert prefid.encode(key2, "tiny", "v1") == pid  # a fixed point: no drift
        assert abs(sum(back.r) - 1) <= 3e-6
    # scaling r does not change the id; the dict form counts missing tasks as 0
    ids = {prefid.encode(canonicalize(r, 0.3, TASKS)[1], "m", "v1") for r in
           ([2, 4, 6], [1, 2, 3], {"segmentation": 1, "depth": 2, "normals": 3})}  # fmt: skip
    assert len(ids) == 1
    pid = prefid.encode(canonicalize([1, 2, 3], 0.3, TASKS)[1], "m", "v1")
    with pytest.raises(UnknownPreferenceIdError, match="v2"):
        prefid.decode(prefid.encode(canonicalize([1, 2, 3], 0.3, TASKS)[1], "m", "v2"),
                      TASKS, "m", "v1")  # fmt: skip
    with pytest.raises(MalformedPreferenceIdError, match="checksum"):
        prefid.decode(pid, TASKS, "other-model", "v1")
    tampered = pid.replace("_300000_", "_300001_")
    with pytest.raises(MalformedPreferenceIdError, match="checksum"):
        prefid.decode(tampered, TASKS, "m", "v1")
    for bad in ("", "garbage", "v1_1-2_3", "v1_1-2-3_4_XYZ", pid + "0", "../" + pid):
        with pytest.raises(MalformedPreferenceIdError, match="malformed"):
            prefid.decode(bad, TASKS, "m", "v1")


def test_preference_id_values_are_validated_by_the_core():
    def forge(r_units, c_units):
        return prefid.encode((tuple(r_units), c_units), "m", "v1")

    with pytest.raises(dymu.PreferenceError, match="entries"):
        prefid.decode(forge([500000, 500000], 0), TASKS, "m", "v1")
    with pytest.raises(dymu.PreferenceError, match="c must be in"):
        prefid.decode(forge([1000000, 0, 0], 1000001), TASKS, "m", "v1")
    with pytest.raises(dymu.PreferenceError, match="positive sum"):
        prefid.decode(forge([0, 0, 0], 0), TASKS, "m", "v1")
    with pytest.raises(MalformedPreferenceIdError, match="not canonical"):
        prefid.decode(forge([1, 1, 1], 0), TASKS, "m", "v1")
    with pytest.raises(dymu.PreferenceError, match="too large"):
        canonicalize([1e308, 1e308, 1e308], 0, TASKS)


# ------------------------------------------------------------------------ units: the cache
class _Entry:
    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes


def test_cache_is_an_lru_bounded_in_entries_and_bytes():
    cache = PreferenceCache(max_entries=3, max_bytes=100)
    cache.put("default", _Entry(10), pin=True)
    for k in "abc":
        cache.put(k, _Entry(10))
    assert "default" in cache and "a" not in cache and len(cache) == 3  # pinned stays
    assert cache.get("b") is not None  # b becomes most recent
    cache.put("d", _Entry(10))
    assert "c" not in cache and "b" in cache
    cache.put("big", _Entry(95))  # over the byte bound: everything but pinned and newest goes
    assert set(cache._entries) == {"default", "big"}
    assert cache.evictions == 4
    assert cache.clear() == 1 and set(cache._entries) == {"default"}


def test_cache_single_flight_computes_a_new_key_once():
    cache = PreferenceCache(max_entries=8, max_bytes=10**6)
    calls = []

    async def create():
        calls.append(1)
        await asyncio.sleep(0.05)
        return _Entry(1)

    async def main():
        return await asyncio.gather(*(cache.get_or_create("k", create) for _ in range(10)))

    results = asyncio.run(main())
    assert len(calls) == 1
    assert sum(computed for _, computed in results) == 1
    assert len({id(e) for e, _ in results}) == 1
    assert (cache.hits, cache.misses) == (9, 1)


def test_cache_single_flight_propagates_failure_and_retries():
    cache = PreferenceCache(max_entries=8, max_bytes=10**6)

    async def boom():
        raise dymu.PreferenceError("nope")

    async def main():
        res = await asyncio.gather(*(cache.get_or_create("k", boom) for _ in range(3)),
                                   return_exceptions=True)  # fmt: skip
        assert all(isinstance(r, dymu.PreferenceError) for r in res)
        _, computed = await cache.get_or_create("k", _ok)
        assert computed

    async def _ok():
        return _Entry(1)

    asyncio.run(main())


# ---------------------------------------------------------------------- units: decoding
def test_decode_image_limits_and_formats():
    rgb = random_image(0)
    assert decode_image(png(rgb), 10_000).shape == (*HW, 3)
    assert np.array_equal(decode_image(png(rgb), 10_000), rgb)
    gray = decode_image(png(rgb[:, :, 0]), 10_000)
    assert gray.shape == (*HW, 3) and np.array_equal(gray[:, :, 1], rgb[:, :, 0])
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG")
    assert decode_image(buf.getvalue(), 10_000).shape == (*HW, 3)
    # a bomb: tiny file, huge declared size -> refused from the header, never inflated
    bomb = io.BytesIO()
    Image.new("L", (6000, 6000)).save(bomb, format="PNG", optimize=True)
    assert len(bomb.getvalue()) < 100_000
    with pytest.raises(PayloadTooLargeError, match="36,000,000 pixels"):
        decode_image(bomb.getvalue(), 1_000_000)
    gif = io.BytesIO()
    Image.fromarray(rgb).save(gif, format="GIF")
    for data in (gif.getvalue(), b"not an image", b"\x00" * 64):
        with pytest.raises(UnsupportedMediaTypeError):
            decode_image(data, 10_000)
    for data in (b"", png(rgb)[:60]):
        with pytest.raises(BadImageError):
            decode_image(data, 10_000)


def test_decode_image_reads_raw_pixels_from_npy():
    rgb = random_image(0)
    assert np.array_equal(decode_image(npy(rgb), 10_000), rgb)
    assert np.array_equal(decode_image(npy(np.asfortranarray(rgb)), 10_000), rgb)
    gray = decode_image(npy(rgb[:, :, 1]), 10_000)
    assert gray.shape == (*HW, 3)
    assert all(np.array_equal(gray[..., k], rgb[..., 1]) for k in range(3))
    with pytest.raises(PayloadTooLargeError, match="pixels; the limit is 100"):
        decode_image(npy(rgb), 100)
    header = b"{'descr': '|O', 'fortran_order': False, 'shape': (2, 2, 3), }".ljust(117) + b"\n"
    object_header = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header
    bad = {
        "must be uint8; got float32": npy(rgb.astype(np.float32)),
        "must be uint8; got object": object_header + b"\x00" * 12,
        r"shape \(H, W, 3\) or \(H, W\); got \(24, 32, 2\)": npy(rgb[:, :, :2].copy()),
        r"got \(32,\)": npy(rgb[0, :, 0].copy()),
        "holds 2,299": npy(rgb)[:-5],
        "holds 2,305": npy(rgb) + b"x",
        "cannot read the NPY header": npy(rgb)[:12],
    }
    for reason, data in bad.items():
        with pytest.raises(BadImageError, match=reason):
            decode_image(data, 10_000)


def test_the_client_sends_raw_pixels_as_npy():
    rgb = random_image(5)
    assert np.array_equal(np.load(io.BytesIO(image_bytes(rgb, "npy"))), rgb)
    rgba = Image.fromarray(np.dstack([rgb, np.full(HW, 7, np.uint8)]))
    sent = np.load(io.BytesIO(image_bytes(rgba, "npy")))
    assert np.array_equal(sent, rgb)  # alpha dropped, as the server does with an RGBA PNG
    assert np.array_equal(decode_image(image_bytes(rgba), 10_000), rgb)
    assert image_bytes(b"\x89PNG...", "npy") == b"\x89PNG..."  # bytes go as they are
    with pytest.raises(ValueError, match="image_format must be 'png' or 'npy'"):
        image_bytes(rgb, "tiff")


# ------------------------------------------------------------------------ server: basics
def test_health_and_readiness(server, client):
    http = client.http
    assert http.get("/healthz").json()["status"] == "alive"
    assert http.get("/v2/health/live").json() == {"live": True}
    ready = http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert http.get("/v2/health/ready").json() == {"ready": True}
    assert http.get("/docs").status_code == 200
    schema = http.get("/openapi.json").json()
    assert {"/preference", "/preference/{preference_id}", "/predict", "/v1/model"} <= set(
        schema["paths"]
    )
    assert "/admin/reload" not in schema["paths"]  # no token: no admin surface


def test_model_info(client, model, info):
    assert [t.name for t in info.tasks] == list(TASKS)
    assert (info.n_tasks, info.n_layers, info.input_size) == (3, model.n_layers, list(HW))
    assert info.version == "v1" and info.name == "tiny"
    assert info.artifact_sha256 == model.manifest["manifest_sha256"]
    anchor = model.anchor_cost(HW)
    assert (info.anchor_cost.flops, info.anchor_cost.params) == (anchor.flops, anchor.params)
    assert info.control_params == model.control_params
    assert info.device == "cpu" and info.backend == "torch"
    assert info.input_normalization["source"] == "ImageNet (default)"
    assert info.default_preference_id.startswith("v1_333333-333333-333333_0_")


# -------------------------------------------------------------------- server: preferences
def test_preference_create_get_and_cache_hit(client, model):
    rec = client.create_preference([2, 1, 1], c=0.4)
    assert rec.r == [0.5, 0.25, 0.25] and rec.c == 0.4
    assert rec.r_by_task == {"segmentation": 0.5, "depth": 0.25, "normals": 0.25}
    assert rec.cached is False and rec.compute_ms > 0
    arch = model.architecture(rec.r, rec.c)
    assert rec.architecture.id == arch.id
    assert rec.architecture.parents == [list(p) for p in arch.parents]
    assert rec.architecture.used_nodes == [list(u) for u in arch.used_nodes()]
    cost = model.cost(arch, HW)
    assert (rec.cost.flops, rec.cost.params) == (cost.flops, cost.params)
    assert math.isclose(rec.cost.fraction_of_anchor_flops, cost.flops / model.anchor_cost().flops)
    assert rec.cost.input_size == list(HW)
    # the same preference in another scale, and in the {task: weight} form: a cache hit
    again = client.create_preference({"segmentation": 4, "depth": 2, "normals": 2}, c=0.4)
    assert again.cached is True and again.preference_id == rec.preference_id
    assert again.compute_ms == rec.compute_ms
    got = client.get_preference(rec.preference_id)
    assert got.cached is True
    assert got.model_dump(exclude={"cached", "elapsed_ms"}) == rec.model_dump(
        exclude={"cached", "elapsed_ms"}
    )
    # missing tasks count 0
    depth_only = client.create_preference({"depth": 3}, c=1)
    assert depth_only.r == [0.0, 1.0, 0.0] and depth_only.c == 1.0


@pytest.mark.parametrize(
    "body, reason",
    [
        ({"r": [1, -1, 1], "c": 0}, "non-negative"),
        ({"r": [0, 0, 0], "c": 0}, "positive sum"),
        ({"r": [1, 1], "c": 0}, "2 entries"),
        ({"r": {"sky": 1}, "c": 0}, "unknown task"),
        ({"r": [1, 1, 1], "c": 1.5}, "c must be in"),
        ({"r": [1, 1, 1], "c": -0.1}, "c must be in"),
        ({"r": [1e308, 1e308, 1e308], "c": 0}, "too large"),
        ({"r": "abc", "c": 0}, "r"),
        ({"c": 0}, "r"),
    ],
)
def test_bad_preferences_are_422_with_the_reason(client, body, reason):
    res = client.http.post("/preference", json=body)
    assert res.status_code == 422, res.text
    assert reason in res.json()["detail"]


def test_bad_preference_json_is_422(client):
    res = client.http.post(
        "/preference", content=b'{"r": [NaN, 1, 1]}', headers={"content-type": "application/json"}
    )
    assert res.status_code == 422 and "finite" in res.json()["detail"]
    res = client.http.post(
        "/preference", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert res.status_code == 422


def test_preference_id_errors(client, info):
    assert client.http.get("/preference/garbage").status_code == 422
    rec = client.create_preference([1, 2, 3], c=0.2)
    tampered = rec.preference_id.replace("_200000_", "_200001_")
    res = client.http.get(f"/preference/{tampered}")
    assert res.status_code == 422 and "checksum" in res.json()["detail"]
    key = prefid.decode(rec.preference_id, TASKS, info.name, info.version)[1]
    other = prefid.encode(key, info.name, "v7")
    res = client.http.get(f"/preference/{other}")
    assert res.status_code == 404 and "v7" in res.json()["detail"]


# ----------------------------------------------------------------------- server: predict
def _check_metrics_match_headers(result) -> None:
    m, h = result.metrics, result.headers
    assert int(h["x-dymu-flops"]) == m.flops and int(h["x-dymu-params"]) == m.params
    assert int(h["x-dymu-batch-size"]) == m.batch_size >= 1
    assert h["x-dymu-architecture-id"] == m.architecture_id
    assert h["x-dymu-preference-id"] == m.preference_id
    assert h["x-dymu-device"] == m.device == "cpu"
    assert h["x-dymu-backend"] == m.backend
    assert float(h["x-dymu-model-time-ms"]) == pytest.approx(m.model_ms, abs=1e-3)
    assert float(h["x-dymu-total-time-ms"]) == pytest.approx(m.total_ms, abs=1e-3)
    assert 0 < m.model_ms <= m.total_ms
    assert "total;dur=" in h["server-timing"]


def test_predict_with_id_json_and_npz(client, model, info):
    rec = client.create_preference([0.7, 0.2, 0.1], c=0.3)
    rgb = random_image(1)
    ref = reference(model, rec, rgb, info)
    npz = client.predict(rgb, preference_id=rec.preference_id, format="npz")
    assert npz.format == "npz" and set(npz.outputs) == set(TASKS)
    for t in TASKS:
        assert npz.outputs[t].dtype == np.float32
        assert npz.outputs[t].flags.writeable  # as numpy.load gives them: the client's own buffer
        np.testing.assert_allclose(npz.outputs[t], ref[t], atol=1e-4, rtol=1e-4)
    m = npz.metrics
    assert m.preference_id == rec.preference_id and m.architecture_id == rec.architecture.id
    assert (m.flops, m.params) == (rec.cost.flops, rec.cost.params)
    assert m.tasks == list(TASKS) and m.input_size == list(HW)
    _check_metrics_match_headers(npz)

    js = client.predict(png(rgb), preference_id=rec.preference_id, transport="json")
    _check_metrics_match_headers(js)
    assert np.array_equal(js.outputs["segmentation"], ref["segmentation"].argmax(0))
    depth = js.encoded["depth"]
    assert js.outputs["depth"].shape == HW
    np.testing.assert_allclose(js.outputs["depth"], ref["depth"][0], atol=depth["scale"])
    np.testing.assert_allclose(
        js.outputs["normals"], ref["normals"].transpose(1, 2, 0), atol=1.01 / 255 * 2
    )
    assert js.encoded["segmentation"]["classes"] == 5

    # raw pixels in: the same outputs as the PNG, over multipart and JSON
    for transport in ("multipart", "json"):
        raw = client.predict(rgb, preference_id=rec.preference_id, format="npz",
                             transport=transport, image_format="npy")  # fmt: skip
        for t in TASKS:
            np.testing.assert_array_equal(raw.outputs[t], npz.outputs[t])


def test_predict_inline_default_and_task_subset(client, model, info):
    rgb = random_image(2, (20, 28))  # any size: the nets are fully convolutional
    inline = client.predict(rgb, r=[1, 3, 0], c=0.6, format="npz")
    rec = client.create_preference([1, 3, 0], c=0.6)
    assert rec.cached is True  # the inline preference went through the same cache
    assert inline.metrics.preference_id == rec.preference_id
    ref = reference(model, rec, rgb, info)
    for t in TASKS:
        np.testing.assert_allclose(inline.outputs[t], ref[t], atol=1e-4, rtol=1e-4)
    assert inline.metrics.flops == model.cost(model.architecture(rec.r, rec.c), (20, 28)).flops

    default = client.predict(rgb, format="npz", transport="json")
    assert default.metrics.preference_id == info.default_preference_id

    sub = client.predict(rgb, preference_id=rec.preference_id, tasks=["normals", "depth"],
                         format="npz")  # fmt: skip
    assert set(sub.outputs) == {"depth", "normals"} and sub.metrics.tasks == ["depth", "normals"]
    arch = model.architecture(rec.r, rec.c)
    sub_cost = model.cost(arch, (20, 28), ["depth", "normals"])
    assert (sub.metrics.flops, sub.metrics.params) == (sub_cost.flops, sub_cost.params)
    assert sub.metrics.flops < inline.metrics.flops
    for t in ("depth", "normals"):
        np.testing.assert_allclose(sub.outputs[t], ref[t], atol=1e-4, rtol=1e-4)
    one = client.predict(rgb, preference_id=rec.preference_id, tasks=["segmentation"])
    assert set(one.outputs) == {"segmentation"}
    # multipart with repeated or comma-separated tasks fields, r as comma-separated numbers
    res = client.http.post(
        "/predict",
        files={"image": ("x.png", png(rgb), "image/png")},
        data={"r": "1,3,0", "c": "0.6", "tasks": ["depth", "normals"]},
    )
    assert res.status_code == 200, res.text
    assert res.headers["x-dymu-preference-id"] == rec.preference_id
    assert res.headers["x-dymu-tasks"] == "depth,normals"


def _post_json(client, body) -> httpx.Response:
    return client.http.post("/predict", json=body)


def test_predict_bad_inputs_are_4xx(client, info):
    http = client.http
    img = png(random_image(3))
    b64 = base64.b64encode(img).decode()

    def multipart(data=None, image=img) -> httpx.Response:
        return http.post("/predict", files={"image": ("i", image, "image/png")}, data=data or {})

    cases = {
        # body and image size
        "body over the limit": (http.post("/predict", content=b"x" * 400_000,
                                          headers={"content-type": "application/json"}), 413),
        "chunked body over the limit": (http.post("/predict", content=iter([b"x" * 100_000] * 4),
                                                  headers={"content-type": "application/json"}),
                                        413),
        "pixels over the limit": (multipart(image=png(np.zeros((400, 400, 3), np.uint8))), 413),
        # undecodable
        "not an image": (multipart(image=b"hello world"), 415),
        "gif": (multipart(image=_gif()), 415),
        "truncated png": (multipart(image=img[: len(img) // 2]), 422),
        "empty image": (multipart(image=b""), 422),
        "npy of floats": (multipart(image=npy(random_image(3).astype(np.float32))), 422),
        "npy over the pixel limit": (multipart(image=npy(np.zeros((400, 400), np.uint8))), 413),
        "bad base64": (_post_json(client, {"image": "!!!"}), 422),
        "body type": (http.post("/predict", content=b"abc",
                                headers={"content-type": "text/plain"}), 415),
        "not json": (http.post("/predict", content=b"{x",
                               headers={"content-type": "application/json"}), 422),
        "no image field": (http.post("/predict", data={"c": "0"},
                                     files={"other": ("o", b"1")}), 422),
        "json without image": (_post_json(client, {"format": "npz"}), 422),
        # preference and tasks
        "wrong preference": (multipart({"r": "[1, -1, 0]"}), 422),
        "r of wrong length": (_post_json(client, {"image": b64, "r": [1, 2]}), 422),
        "c out of range": (multipart({"r": "[1, 1, 1]", "c": "2"}), 422),
        "c not a number": (multipart({"r": "[1, 1, 1]", "c": "abc"}), 422),
        "r not parseable": (multipart({"r": "[1, 2"}), 422),
        "c without r": (multipart({"c": "0.5"}), 422),
        "id and r": (multipart({"preference_id": info.default_preference_id, "r": "1,1,1"}),
                     422),
        "malformed id": (multipart({"preference_id": "v1_bad"}), 422),
        "unknown task": (multipart({"tasks": "segmentation,sky"}), 422),
        "duplicate task": (_post_json(client, {"image": b64, "tasks": ["depth", "depth"]}), 422),
        "empty task list": (_post_json(client, {"image": b64, "tasks": []}), 422),
        "bad format": (multipart({"format": "xml"}), 422),
    }  # fmt: skip
    for name, (res, status) in cases.items():
        assert res.status_code == status, (name, res.status_code, res.text)
        body = res.json()
        assert body["status"] == status and body["detail"], name
    ok = multipart({"tasks": "depth"})
    assert ok.status_code == 200


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(random_image(4)).save(buf, format="GIF")
    return buf.getvalue()


def test_client_errors_carry_status_and_reason(client):
    with pytest.raises(DymuAPIError) as err:
        client.predict(random_image(5), r=[1, 1], c=0)
    assert err.value.status == 422 and err.value.error == "preference_error"
    assert "3 tasks" in err.value.detail


# ----------------------------------------------------------------------- server: metrics
def test_metrics_exposition(client):
    client.predict(random_image(6), format="npz")
    text = client.metrics()
    samples = metric_samples(text)
    for name in (
        "dymu_http_requests_total",
        "dymu_http_request_duration_seconds_bucket",
        "dymu_model_inference_seconds_bucket",
        "dymu_images_total",
        "dymu_flops_total",
        "dymu_batch_size_bucket",
        "dymu_queue_depth",
        "dymu_preference_cache_hits_total",
        "dymu_preference_cache_misses_total",
        "dymu_preference_cache_evictions_total",
        "dymu_preference_cache_entries",
        "dymu_preference_cache_bytes",
        "dymu_materialization_seconds_count",
        "dymu_model_info",
        "dymu_ready",
    ):
        assert name in samples, name
    assert metric_value(samples, "dymu_http_requests_total", endpoint="/predict", status="200") >= 1
    assert metric_value(samples, "dymu_http_request_duration_seconds_count", endpoint="/predict",
                        status="200") >= 1  # fmt: skip
    assert metric_value(samples, "dymu_model_inference_seconds_count", backend="torch") >= 1
    assert metric_value(samples, "dymu_images_total", backend="torch") >= 1
    assert metric_value(samples, "dymu_flops_total") > 0
    assert metric_value(samples, "dymu_preference_cache_misses_total") >= 1
    assert metric_value(samples, "dymu_preference_cache_hits_total") >= 1
    assert metric_value(samples, "dymu_preference_cache_entries") >= 1
    assert metric_value(samples, "dymu_preference_cache_bytes") > 0
    assert metric_value(samples, "dymu_ready") == 1
    [(labels, _)] = samples["dymu_model_info"]
    assert labels["name"] == "tiny" and labels["version"] == "v1" and labels["backend"] == "torch"
    # route templates, not raw paths: ids do not blow up the label set
    endpoints = {lab["endpoint"] for lab, _ in samples["dymu_http_requests_total"]}
    assert not any(e.startswith("/preference/v1_") for e in endpoints)


def test_never_a_server_error(client):
    """Everything above, bad inputs included, answered without a 5xx (only the readiness
    probe said 503 while the server started)."""
    samples = metric_samples(client.metrics())
    statuses = {
        lab["status"]
        for lab, _ in samples["dymu_http_requests_total"]
        if lab["endpoint"] != "/readyz"
    }
    assert statuses and not any(s.startswith("5") for s in statuses), statuses
    assert {"200", "413", "415", "422", "404"} <= statuses


def test_openapi_documents_both_predict_bodies(client):
    schema = client.http.get("/openapi.json").json()
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)
    assert "image" in body["multipart/form-data"]["schema"]["required"]
    pref = schema["paths"]["/preference"]["post"]["requestBody"]["content"]["application/json"]
    assert pref["schema"].get("examples")
    # unknown fields are refused, and the schema says so
    assert pref["schema"]["additionalProperties"] is False
    assert body["multipart/form-data"]["schema"]["additionalProperties"] is False
    assert json.dumps(schema)  # serializable
