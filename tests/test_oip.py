"""The Open Inference Protocol (KServe v2) on `dymu serve`, driven by the stock client.

A real uvicorn server on loopback serves the shipped model (model_store/scenes-small) and
`tritonclient.http` talks to it: metadata, readiness, infer with JSON and with binary tensor
data, a batch of 4, a task subset, a preference id, encoded files, and every bad input gets its
4xx in the protocol's `{"error": ...}` body. The outputs are checked against /predict's npz reply
for the same image and preference.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from service.prefid import PreferenceIds
from service.server import BackgroundServer
from service.settings import Settings

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "model_store" / "scenes-small"
PHOTO = ROOT / "service" / "example.png"
TASKS = ["segmentation", "depth", "normals"]
R, C = [0.6, 0.3, 0.1], 0.5


@pytest.fixture(scope="module")
def server() -> Iterator[BackgroundServer]:
    settings = Settings(model_dir=MODEL, backend="torch", device="cpu", max_body_bytes=2**21)
    with BackgroundServer(settings) as srv:
        deadline = time.monotonic() + 120
        while httpx.get(srv.url + "/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.1)
        yield srv


@pytest.fixture(scope="module")
def client(server) -> Iterator[httpclient.InferenceServerClient]:
    with httpclient.InferenceServerClient(server.url.removeprefix("http://")) as c:
        yield c


@pytest.fixture(scope="module")
def model(server) -> dict:
    return httpx.get(server.url + "/v1/model").json()


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return np.asarray(Image.open(PHOTO).convert("RGB"))


def npz_predict(server, rgb: np.ndarray, **fields) -> dict[str, np.ndarray]:
    """/predict's npz reply for one image."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    data = {k: ",".join(map(str, v)) if isinstance(v, list) else str(v) for k, v in fields.items()}
    reply = httpx.post(
        server.url + "/predict",
        files={"image": ("x.png", buf.getvalue(), "image/png")},
        data={**data, "format": "npz"},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    with np.load(io.BytesIO(reply.content)) as z:
        return {k: z[k] for k in z.files if k != "_metrics"}


def image_input(batch: np.ndarray, binary: bool) -> httpclient.InferInput:
    tensor = httpclient.InferInput("image", list(batch.shape), "UINT8")
    tensor.set_data_from_numpy(batch, binary_data=binary)
    return tensor


def outputs(names: list[str], binary: bool) -> list[httpclient.InferRequestedOutput]:
    return [httpclient.InferRequestedOutput(n, binary_data=binary) for n in names]


def preference(r: list[float] = R, c: float = C) -> dict[str, str | float]:
    return {"r": ",".join(map(str, r)), "c": c}


# ------------------------------------------------------------------------ metadata, readiness
def test_server_and_model_metadata(client, model):
    meta = client.get_server_metadata()
    assert meta["name"] == "dymu" and "binary_tensor_data" in meta["extensions"]
    m = client.get_model_metadata(model["name"])
    assert m["name"] == "scenes-small" and m["versions"] == [model["version"]]
    assert m["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, -1, -1, 3]}]
    channels = {t["name"]: t["classes"] or {"depth": 1, "normals": 3}[t["kind"]]
                for t in model["tasks"]}  # fmt: skip
    assert [o["name"] for o in m["outputs"]] == TASKS
    for o in m["outputs"]:
        assert o["datatype"] == "FP32" and o["shape"] == [-1, channels[o["name"]], -1, -1]
    assert m["parameters"]["default_preference_id"] == model["default_preference_id"]
    assert client.get_model_metadata("scenes-small", model["version"]) == m
    for name, version in (("nope", ""), ("scenes-small", "v0")):
        with pytest.raises(InferenceServerException) as err:
            client.get_model_metadata(name, version)
        assert err.value.status() == "404" and "scenes-small" in err.value.message()


def test_readiness(client, server, model):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("scenes-small")
    assert client.is_model_ready("scenes-small", model["version"])
    assert not client.is_model_ready("nope")
    assert not client.is_model_ready("scenes-small", "v0")
    reply = httpx.get(server.url + "/v2/models/nope/ready")
    assert reply.status_code == 404 and "unknown model 'nope'" in reply.json()["error"]


# ---------------------------------------------------------------------------------- infer
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_matches_predict(client, server, photo, binary):
    expected = npz_predict(server, photo, r=R, c=C)
    result = client.infer(
        "scenes-small",
        [image_input(photo[None], binary)],
        outputs=outputs(TASKS, binary),
        parameters=preference(),
    )
    for task in TASKS:
        got = result.as_numpy(task)
        assert got.dtype == np.float32 and got.shape == (1, *expected[task].shape)
        np.testing.assert_allclose(got[0], expected[task], rtol=1e-5, atol=1e-5)
    params = result.get_response()["parameters"]
    pref = httpx.post(server.url + "/preference", json={"r": R, "c": C}).json()
    assert params["preference_id"] == pref["preference_id"]
    assert params["architecture_id"] == pref["architecture"]["id"]
    assert params["flops"] == pref["cost"]["flops"] and params["params"] == pref["cost"]["params"]


def test_binary_reply_layout(server, photo):
    """The binary extension on the wire: a JSON header of the advertised length, then the
    tensors' bytes in output order."""
    request = {
        "inputs": [{"name": "image", "shape": [1, *photo.shape], "datatype": "UINT8",
                    "parameters": {"binary_data_size": photo.size}}],
        "outputs": [{"name": "depth", "parameters": {"binary_data": True}}],
        "parameters": {"tasks": "depth"},
    }  # fmt: skip
    head = json.dumps(request).encode()
    reply = httpx.post(
        server.url + "/v2/models/scenes-small/infer",
        content=head + photo.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
    assert reply.status_code == 200, reply.text
    n = int(reply.headers["Inference-Header-Content-Length"])
    header = json.loads(reply.content[:n])
    [out] = header["outputs"]
    assert out["shape"] == [1, 1, *photo.shape[:2]]
    assert out["parameters"]["binary_data_size"] == len(reply.content) - n == photo[..., 0].size * 4
    depth = np.frombuffer(reply.content[n:], "<f4").reshape(out["shape"])
    expected = npz_predict(server, photo, tasks="depth")["depth"]
    np.testing.assert_allclose(depth[0], expected, rtol=1e-5, atol=1e-5)


def test_a_batch_of_4(client, server, photo):
    batch = np.stack([photo, photo[::-1], photo[:, ::-1], 255 - photo])
    result = client.infer(
        "scenes-small", [image_input(batch, True)], outputs=outputs(TASKS, True),
        parameters=preference([1, 1, 1], 0.2),
    )  # fmt: skip
    assert result.get_response()["parameters"]["images"] == 4
    for i in (0, 3):
        expected = npz_predict(server, np.ascontiguousarray(batch[i]), r=[1, 1, 1], c=0.2)
        for task in TASKS:
            assert result.as_numpy(task).shape[0] == 4
            np.testing.assert_allclose(result.as_numpy(task)[i], expected[task], atol=1e-4)
    seg = result.as_numpy("segmentation")
    assert not np.allclose(seg[0], seg[3])  # four images, four answers


def test_a_task_subset_runs_and_costs_less(client, server, photo):
    full = client.infer("scenes-small", [image_input(photo[None], True)], parameters=preference())
    sub = client.infer(
        "scenes-small",
        [image_input(photo[None], True)],
        parameters={**preference(), "tasks": "depth,normals"},
    )
    assert {o["name"] for o in sub.get_response()["outputs"]} == {"depth", "normals"}
    assert sub.as_numpy("segmentation") is None
    fp, sp = full.get_response()["parameters"], sub.get_response()["parameters"]
    assert sp["tasks"] == "depth,normals" and fp["tasks"] == ",".join(TASKS)
    assert sp["flops"] < fp["flops"]
    expected = npz_predict(server, photo, r=R, c=C, tasks="depth,normals")
    np.testing.assert_allclose(sub.as_numpy("normals")[0], expected["normals"], atol=1e-5)
    # requested outputs alone pick the subset too
    only = client.infer(
        "scenes-small", [image_input(photo[None], True)], outputs=outputs(["depth"], True),
        parameters=preference(),
    )  # fmt: skip
    assert only.get_response()["parameters"]["tasks"] == "depth"
    np.testing.assert_allclose(only.as_numpy("depth"), sub.as_numpy("depth"), atol=1e-6)


def test_preference_id_default_and_version_path(client, server, photo, model):
    pid = httpx.post(server.url + "/preference", json={"r": R, "c": C}).json()["preference_id"]
    by_id = client.infer(
        "scenes-small", [image_input(photo[None], True)], model_version=model["version"],
        parameters={"preference_id": pid},
    )  # fmt: skip
    inline = client.infer("scenes-small", [image_input(photo[None], True)], parameters=preference())
    assert by_id.get_response()["parameters"]["preference_id"] == pid
    np.testing.assert_array_equal(by_id.as_numpy("depth"), inline.as_numpy("depth"))
    default = client.infer("scenes-small", [image_input(photo[None], True)])
    assert default.get_response()["parameters"]["preference_id"] == model["default_preference_id"]


def test_encoded_files_as_bytes(client, photo):
    png = PHOTO.read_bytes()
    buf = io.BytesIO()
    np.save(buf, photo, allow_pickle=False)  # raw pixels as an NPY file
    files = httpclient.InferInput("image", [2], "BYTES")
    files.set_data_from_numpy(np.array([png, buf.getvalue()], dtype=np.object_), binary_data=True)
    result = client.infer("scenes-small", [files], parameters=preference())
    pixels = client.infer("scenes-small", [image_input(photo[None], True)], parameters=preference())
    got = result.as_numpy("segmentation")
    assert got.shape[0] == 2
    for k in range(2):
        np.testing.assert_allclose(got[k], pixels.as_numpy("segmentation")[0], atol=1e-5)


def test_the_requests_are_counted_per_route(client, server, photo):
    client.infer("scenes-small", [image_input(photo[None], True)])
    text = httpx.get(server.url + "/metrics").text
    assert 'endpoint="/v2/models/{model}/infer",method="POST",status="200"' in text


# ----------------------------------------------------------------------------- bad inputs
def raw(server, request: dict | bytes, binary: bytes = b"", model: str = "scenes-small"):
    head = request if isinstance(request, bytes) else json.dumps(request).encode()
    headers = {"Inference-Header-Content-Length": str(len(head))} if binary else {}
    return httpx.post(
        f"{server.url}/v2/models/{model}/infer", content=head + binary, headers=headers, timeout=60
    )


def uint8(shape: list[int], **extra) -> dict:
    return {"name": "image", "shape": shape, "datatype": "UINT8",
            "data": np.zeros(int(np.prod(shape)), int).tolist(), **extra}  # fmt: skip


def files(*blobs: bytes) -> tuple[dict, bytes]:
    data = b"".join(struct.pack("<I", len(b)) + b for b in blobs)
    tensor = {"name": "image", "shape": [len(blobs)], "datatype": "BYTES",
              "parameters": {"binary_data_size": len(data)}}  # fmt: skip
    return {"inputs": [tensor]}, data


def png_of(hw: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", hw[::-1]).save(buf, format="PNG")
    return buf.getvalue()


def corrupt_png() -> bytes:
    data = bytearray(png_of((8, 8)))
    start = data.find(b"IDAT") + 4
    data[start : start + 10] = b"\xff" * 10  # a valid header, a broken data stream
    return bytes(data)


OK = uint8([1, 8, 8, 3])
BAD: dict[str, tuple[dict | bytes, bytes, int, str]] = {
    "not json": (b"{nope", b"", 422, "not valid JSON"),
    "no inputs": ({"inputs": []}, b"", 422, "non-empty list"),
    "unknown field": ({"inputs": [OK], "extra": 1}, b"", 422, "unknown fields"),
    "wrong input name": ({"inputs": [{**OK, "name": "x"}]}, b"", 422, "one input, 'image'"),
    "two inputs": ({"inputs": [OK, OK]}, b"", 422, "one input"),
    "fp32": ({"inputs": [{**OK, "datatype": "FP32"}]}, b"", 422, "datatype must be UINT8"),
    "4 channels": ({"inputs": [uint8([1, 8, 8, 4])]}, b"", 422, "[B, H, W, 3]"),
    "3 dims": ({"inputs": [uint8([8, 8, 3])]}, b"", 422, "[B, H, W, 3]"),
    "zero dim": ({"inputs": [{**OK, "shape": [0, 8, 8, 3]}]}, b"", 422, "positive"),
    "count": ({"inputs": [{**OK, "shape": [1, 8, 9, 3]}]}, b"", 422, "needs 216 values"),
    "value > 255": ({"inputs": [{**OK, "data": [256] * 192}]}, b"", 422, "[0, 255]"),
    "floats": ({"inputs": [{**OK, "data": [0.5] * 192}]}, b"", 422, "[0, 255]"),
    "no data": ({"inputs": [{k: v for k, v in OK.items() if k != "data"}]}, b"", 422, "no data"),
    "too many pixels": (
        {"inputs": [{**uint8([1, 1, 1, 3]), "shape": [1, 3000, 3000, 3]}]},
        b"",
        413,
        "pixels per image",
    ),
    "batch too large": ({"inputs": [{**OK, "shape": [65, 1, 1, 3]}]}, b"", 422, "limit is 64"),
    "binary size mismatch": (
        {
            "inputs": [
                {
                    **{k: v for k, v in OK.items() if k != "data"},
                    "parameters": {"binary_data_size": 192},
                }
            ]
        },
        b"\0" * 100,
        422,
        "binary_data_size is 192",
    ),
    "stray binary": ({"inputs": [OK]}, b"\0" * 10, 422, "no input has binary_data_size"),
    "r not numbers": ({"inputs": [OK], "parameters": {"r": "a,b,c"}}, b"", 422, "comma-separated"),
    "r length": ({"inputs": [OK], "parameters": {"r": "1,2"}}, b"", 422, "r"),
    "r negative": ({"inputs": [OK], "parameters": {"r": "-1,1,1"}}, b"", 422, "r"),
    "c out of range": ({"inputs": [OK], "parameters": {"r": "1,1,1", "c": 2}}, b"", 422, "c"),
    "c alone": ({"inputs": [OK], "parameters": {"c": 0.5}}, b"", 422, "without r"),
    "id and r": (
        {"inputs": [OK], "parameters": {"r": "1,1,1", "preference_id": "v1_x"}},
        b"",
        422,
        "not both",
    ),
    "malformed id": (
        {"inputs": [OK], "parameters": {"preference_id": "garbage"}},
        b"",
        422,
        "garbage",
    ),
    "unknown parameter": (
        {"inputs": [OK], "parameters": {"preferece_id": "x"}},
        b"",
        422,
        "unknown parameters",
    ),
    "unknown task": ({"inputs": [OK], "parameters": {"tasks": "depth,smell"}}, b"", 422, "smell"),
    "unknown output": ({"inputs": [OK], "outputs": [{"name": "smell"}]}, b"", 422, "smell"),
    "output outside tasks": (
        {"inputs": [OK], "outputs": [{"name": "depth"}], "parameters": {"tasks": "normals"}},
        b"",
        422,
        "not all in tasks",
    ),
    "not an image file": (*files(b"hello world"), 415, "not a PNG, JPEG or NPY"),
    "corrupt png": (*files(corrupt_png()), 422, "cannot decode"),
    "mixed sizes": (*files(png_of((8, 8)), png_of((8, 9))), 422, "one size"),
    "bytes json not base64": (
        {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["%%"]}]},
        b"",
        422,
        "base64",
    ),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_inputs_get_their_4xx(server, case):
    request, binary, status, reason = BAD[case]
    reply = raw(server, request, binary)
    assert reply.status_code == status, (reply.status_code, reply.text)
    body = reply.json()
    assert set(body) == {"error"} and reason in body["error"], body


def test_bad_header_length_and_model(server):
    head = json.dumps({"inputs": [OK]}).encode()
    for value in ("x", "0", str(len(head) + 10)):
        reply = httpx.post(
            server.url + "/v2/models/scenes-small/infer", content=head,
            headers={"Inference-Header-Content-Length": value},
        )  # fmt: skip
        assert (
            reply.status_code == 422 and "Inference-Header-Content-Length" in reply.json()["error"]
        )
    assert raw(server, {"inputs": [OK]}, model="other").status_code == 404
    reply = httpx.post(server.url + "/v2/models/scenes-small/versions/v0/infer", json={})
    assert reply.status_code == 404 and "v0" in reply.json()["error"]


def test_an_id_of_another_version_is_404(server, model):
    other = "v1" if model["version"] != "v1" else "v2"
    ids = PreferenceIds.create(tuple(TASKS), model["name"], other, None, 0.0)
    foreign = ids.encode(ids.parse(R, C)[1])  # a valid id, of the version not served
    reply = raw(server, {"inputs": [OK], "parameters": {"preference_id": foreign}})
    assert reply.status_code == 404, reply.text


def test_a_body_over_the_limit_is_413(server):
    big = np.zeros((1, 1024, 1024, 3), np.uint8)  # 3 MiB > max_body_bytes (2 MiB)
    tensor = {"name": "image", "shape": list(big.shape), "datatype": "UINT8"}
    tensor["parameters"] = {"binary_data_size": big.size}
    head = json.dumps({"inputs": [tensor]}).encode()
    reply = raw(server, head, big.tobytes())
    assert reply.status_code == 413 and "limit" in reply.json()["error"] + reply.text
    # answered by the gate, before routing: still the protocol's body and the route's label
    assert set(reply.json()) == {"error"}, reply.json()
    text = httpx.get(server.url + "/metrics").text
    assert 'endpoint="/v2/models/{model}/infer",method="POST",status="413"' in text


def test_infer_is_admitted_before_its_body_is_read():
    from service.gate import admitted

    assert admitted("POST", "/predict")
    assert admitted("POST", "/v2/models/scenes-small/infer")
    assert admitted("POST", "/v2/models/scenes-small/versions/v1/infer")
    assert not admitted("GET", "/v2/models/scenes-small/infer")
    assert not admitted("POST", "/v2/models/scenes-small/ready")
    assert not admitted("POST", "/v2/models/a/b/infer")


def test_the_stock_client_sees_the_status_and_reason(client):
    bad = httpclient.InferInput("image", [1, 8, 8, 3], "UINT8")
    bad.set_data_from_numpy(np.zeros((1, 8, 8, 3), np.uint8), binary_data=True)
    with pytest.raises(InferenceServerException) as err:
        client.infer("scenes-small", [bad], parameters={"r": "1,1", "c": 0})
    assert err.value.status() == "422" and "3 tasks" in err.value.message()


def test_json_bytes_are_base64(server, photo):
    data = base64.b64encode(PHOTO.read_bytes()).decode()
    reply = raw(
        server,
        {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [data]}],
         "outputs": [{"name": "depth"}]},
    )  # fmt: skip
    assert reply.status_code == 200, reply.text
    [out] = reply.json()["outputs"]
    assert out["shape"] == [1, 1, *photo.shape[:2]] and len(out["data"]) == photo[..., 0].size
