"""The Open Inference Protocol through the Ray Serve ingress (2 replicas on a local Ray).

The ingress derives the preference id from an infer request's parameters, as it does for
/predict, so repeated requests for a preference reach the replica that cached its sub-network.
Needs the ``ray`` extra (``make test-scale`` installs it); marked ``scale``.
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from service.oip_codec import preference_fields
from service.settings import Settings

from .test_service import png, random_image, save_tiny

ray = pytest.importorskip("ray", reason="Ray Serve tests need the ray extra (make test-scale)")
serve = pytest.importorskip("ray.serve")
httpclient = pytest.importorskip("tritonclient.http")

pytestmark = pytest.mark.scale

FRESH = [([0.6, 0.2, 0.2], 0.15), ([0.2, 0.7, 0.1], 0.35), ([0.1, 0.1, 0.8], 0.55),
         ([0.4, 0.4, 0.2], 0.75)]  # fmt: skip


@pytest.fixture(scope="module")
def url(tmp_path_factory) -> Iterator[str]:
    from service.ray_app import build_app

    from .test_service_ray import _free_port

    store = save_tiny(tmp_path_factory.mktemp("oip-ray"))
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = Settings(model_dir=store, backend="torch", max_wait_ms=2)
        serve.run(build_app(settings, 2), name="dymu", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def infer(client: httpx.Client, rgb: np.ndarray, r, c) -> httpx.Response:
    head = json.dumps(
        {
            "inputs": [{"name": "image", "shape": [1, *rgb.shape], "datatype": "UINT8",
                        "parameters": {"binary_data_size": rgb.size}}],
            "parameters": {"r": ",".join(map(str, r)), "c": c, "binary_data_output": True},
        }
    ).encode()  # fmt: skip
    return client.post(
        "/v2/models/tiny/infer",
        content=head + rgb.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(head))},
    )


def test_the_stock_client_through_the_ingress(url):
    rgb = random_image(3)
    with httpclient.InferenceServerClient(url.removeprefix("http://")) as client:
        assert client.is_model_ready("tiny")
        assert [o["name"] for o in client.get_model_metadata("tiny")["outputs"]] == [
            "segmentation", "depth", "normals"
        ]  # fmt: skip
        image = httpclient.InferInput("image", [1, *rgb.shape], "UINT8")
        image.set_data_from_numpy(rgb[None], binary_data=True)
        result = client.infer("tiny", [image], parameters={"r": "0.7,0.2,0.1", "c": 0.0})
    reply = httpx.post(
        url + "/predict",
        files={"image": png(rgb)},
        data={"r": "0.7,0.2,0.1", "c": "0", "format": "npz"},
        timeout=60,
    )
    expected = np.load(io.BytesIO(reply.content))
    np.testing.assert_allclose(result.as_numpy("depth")[0], expected["depth"], atol=1e-4)


def test_repeat_infers_reach_the_replica_that_cached_them(url):
    rgb = random_image(5)
    with httpx.Client(base_url=url, timeout=60) as client:
        for r, c in FRESH:
            reply = infer(client, rgb, r, c)
            assert reply.status_code == 200, reply.text
            assert reply.headers["x-dymu-cache"] == "miss"
        time.sleep(1.0)  # a replica reports its loaded ids to the router asynchronously
        cache, served = Counter(), Counter()
        for _ in range(5):
            for r, c in FRESH:
                reply = infer(client, rgb, r, c)
                assert reply.status_code == 200, reply.text
                cache[reply.headers["x-dymu-cache"]] += 1
                served[reply.headers["x-dymu-replica"]] += 1
    assert cache["hit"] >= 0.8 * sum(cache.values()), (cache, served)


def test_the_ingress_reads_the_preference_of_an_infer_request():
    head = json.dumps({"inputs": [], "parameters": {"r": "1,2,3", "c": 0.5}}).encode()
    assert preference_fields(head + b"\0" * 7, str(len(head))) == (None, [1.0, 2.0, 3.0], 0.5)
    head = json.dumps({"inputs": [], "parameters": {"preference_id": "v1_x"}}).encode()
    assert preference_fields(head, None) == ("v1_x", None, None)
