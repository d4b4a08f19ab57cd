"""`docker compose up` for real: the README's compose file on a real Docker engine.

Run by `make test-docker` (docker/test-docker.sh installs and starts the engine and builds the
base images first), marked `docker` so that `make test` leaves it out. The stack is built and
started once for the module: the API image from docker/Dockerfile and Prometheus with
docker/prometheus.yml and its rules. The tests wait for the API's healthcheck, post a preference
and predictions on a real photo (service/example.png), ask Prometheus' HTTP API whether it
scrapes the API and counts those requests, and finally take everything down.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT / "service" / "example.png"
PROJECT = "dymu-test-docker"
PREDICTS = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """A compose file under a project name of its own, on free host ports."""

    def __init__(self, file: str = "docker-compose.yml", project: str = PROJECT) -> None:
        self.file, self.project = file, project
        self.api_port, self.prom_port = free_port(), free_port()
        self.env = {
            **os.environ,
            "DYMU_API_PORT": str(self.api_port),
            "DYMU_PROMETHEUS_PORT": str(self.prom_port),
        }
        self.api = f"http://127.0.0.1:{self.api_port}"
        self.prometheus = f"http://127.0.0.1:{self.prom_port}"

    def compose(self, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
        compose = shutil.which("docker-compose") or "docker-compose"
        cmd = [compose, "-f", self.file, "-p", self.project, *args]
        return subprocess.run(
            cmd, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).stdout.strip()

    def health(self) -> str:
        out = subprocess.run(
            ["docker", "inspect", "-f", "{{.State.Health.Status}}", self.container("api")],
            capture_output=True,
            text=True,
        )
        return out.stdout.strip()

    def logs(self) -> str:
        return self.compose("logs", "--no-color", "--tail", "60").stdout

    def down(self) -> subprocess.CompletedProcess:
        return self.compose("down", "-v", "--remove-orphans", timeout=300)


def started(s: Stack, timeout: float = 300) -> Stack:
    """``up -d --build``, then wait for the API's healthcheck."""
    if shutil.which("docker-compose") is None or shutil.which("docker") is None:
        pytest.fail("docker and docker-compose are needed: run `make test-docker`")
    s.down()
    t0 = time.monotonic()
    up = s.compose("up", "-d", "--build")
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    print(f"\n{s.file}: up -d --build {time.monotonic() - t0:.0f} s")
    deadline = time.monotonic() + timeout
    while (state := s.health()) != "healthy":
        assert state in ("starting", ""), f"the API is {state}:\n{s.logs()}"
        assert time.monotonic() < deadline, f"not healthy after {timeout:g} s:\n{s.logs()}"
        time.sleep(2)
    print(f"{s.file}: healthy after {time.monotonic() - t0:.0f} s")
    return s


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    s = Stack()
    try:
        yield started(s)
    finally:
        s.down()


def test_the_api_is_healthy_and_runs_as_a_non_root_user(stack):
    uid = subprocess.run(
        ["docker", "exec", stack.container("api"), "id", "-u"], capture_output=True, text=True
    )
    assert uid.returncode == 0 and uid.stdout.strip() not in ("", "0"), uid
    # the healthcheck is the image's python calling /readyz (nothing the image lacks)
    image = subprocess.run(
        ["docker", "inspect", "-f", "{{json .Config.Healthcheck.Test}}", stack.container("api")],
        capture_output=True,
        text=True,
    )
    test = json.loads(image.stdout)
    assert test[:2] == ["CMD", "python"] and "/readyz" in test[-1]
    ready = httpx.get(stack.api + "/readyz").json()
    assert ready["ready"] is True and ready["model"] == "scenes-small"
    # torch in the image is the CPU build
    cuda = subprocess.run(
        ["docker", "exec", stack.container("api"), "python", "-c",
         "import torch; print(torch.version.cuda)"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert cuda.stdout.strip() == "None", cuda


def test_a_preference_and_predictions_on_a_real_photo(stack):
    with httpx.Client(base_url=stack.api, timeout=60) as client:
        pref = client.post("/preference", json={"r": [0.6, 0.3, 0.1], "c": 0.5})
        assert pref.status_code == 200, pref.text
        pid = pref.json()["preference_id"]
        image = PHOTO.read_bytes()
        for i in range(PREDICTS):
            fmt = "npz" if i % 2 else "json"
            reply = client.post(
                "/predict",
                files={"image": ("example.png", image, "image/png")},
                data={"preference_id": pid, "format": fmt},
            )
            assert reply.status_code == 200, reply.text
            assert reply.headers["X-Dymu-Preference-Id"] == pid
            if fmt == "npz":
                with np.load(io.BytesIO(reply.content)) as z:
                    assert z["depth"].shape == (1, 96, 128)
            else:
                assert set(reply.json()["outputs"]) == {"segmentation", "depth", "normals"}


def query(stack: Stack, expr: str) -> list[dict]:
    reply = httpx.get(stack.prometheus + "/api/v1/query", params={"query": expr}, timeout=10)
    assert reply.json()["status"] == "success", reply.text
    return reply.json()["data"]["result"]


def until(stack: Stack, expr: str, expected: float, timeout: float = 60) -> None:
    deadline, got = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            got = [float(r["value"][1]) for r in query(stack, expr)]
        except httpx.TransportError:
            got = "prometheus not answering"
        if got == [expected]:
            return
        time.sleep(1)
    pytest.fail(f"{expr} = {got} after {timeout:g} s; expected {expected}")


def test_prometheus_scrapes_the_api_and_counts_the_requests(stack):
    until(stack, 'up{job="dymu"}', 1.0)
    until(
        stack,
        'sum(dymu_http_requests_total{job="dymu",endpoint="/predict",status="200"})',
        PREDICTS,
    )
    until(stack, 'sum(dymu_http_requests_total{job="dymu",endpoint="/preference"})', 1)
    until(stack, 'dymu_ready{job="dymu"}', 1.0)
    rules = httpx.get(stack.prometheus + "/api/v1/rules").json()["data"]["groups"]
    names = {r["name"] for g in rules for r in g["rules"]}
    assert {"DymuNotReady", "DymuHigh503Rate", "dymu:http_request_duration_seconds:p95_5m"} <= names


def assert_down(stack: Stack) -> None:
    """``down -v`` leaves no container, volume or network of the project."""
    down = stack.down()
    assert down.returncode == 0, down.stderr
    label = f"label=com.docker.compose.project={stack.project}"
    for kind in (["ps", "-aq"], ["volume", "ls", "-q"], ["network", "ls", "-q"]):
        left = subprocess.run(
            ["docker", *kind, "--filter", label], capture_output=True, text=True, check=True
        )
        assert left.stdout.strip() == "", (kind, left.stdout)


def test_down_leaves_nothing_running(stack):
    assert_down(stack)
