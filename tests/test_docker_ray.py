"""docker-compose.ray.yml for real: dymu on Ray Serve in one container, 2 replicas.

Run by `make test-docker` after tests/test_docker.py (whose build made the `dymu:cpu` image
that docker/Dockerfile.ray starts from), marked `docker`. The API must become healthy, answer
a preference, predictions on service/example.png and an Open Inference Protocol request
through the Ray ingress (each reply names the replica that served it), and go down cleanly.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image

from .test_docker import PHOTO, Stack, assert_down, started

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    if subprocess.run(["docker", "image", "inspect", "dymu:cpu"], capture_output=True).returncode:
        pytest.fail("docker/Dockerfile.ray starts from dymu:cpu: run tests/test_docker.py first")
    s = Stack("docker-compose.ray.yml", "dymu-test-docker-ray")
    try:
        yield started(s, timeout=600)
    finally:
        s.down()


def test_predictions_through_the_ray_ingress(stack):
    with httpx.Client(base_url=stack.api, timeout=120) as client:
        pref = client.post("/preference", json={"r": [0.6, 0.3, 0.1], "c": 0.5})
        assert pref.status_code == 200, pref.text
        pid = pref.json()["preference_id"]
        replicas = set()
        for _ in range(3):
            reply = client.post(
                "/predict",
                files={"image": ("example.png", PHOTO.read_bytes(), "image/png")},
                data={"preference_id": pid},
            )
            assert reply.status_code == 200, reply.text
            assert set(reply.json()["outputs"]) == {"segmentation", "depth", "normals"}
            replicas.add(reply.headers["x-dymu-replica"])
        rgb = np.asarray(Image.open(PHOTO).convert("RGB"))
        head = json.dumps(
            {
                "inputs": [{"name": "image", "shape": [1, *rgb.shape], "datatype": "UINT8",
                            "parameters": {"binary_data_size": rgb.size}}],
                "outputs": [{"name": "depth"}],
                "parameters": {"preference_id": pid},
            }
        ).encode()  # fmt: skip
        reply = client.post(
            "/v2/models/scenes-small/infer",
            content=head + rgb.tobytes(),
            headers={"Inference-Header-Content-Length": str(len(head))},
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["parameters"]["preference_id"] == pid
        assert reply.headers["x-dymu-replica"] and reply.headers["x-dymu-cache"] in ("hit", "miss")


def test_down_leaves_nothing_running(stack):
    assert_down(stack)
