"""What the HTTP layer refuses, and when, on a real uvicorn server on loopback (issue 15, item 5).

Strict parsing (deep nesting, duplicated and unknown fields, one preference validator),
admission before the body, the whole-request deadline, slow clients, SIGTERM draining and a
failed artifact at start. Raw sockets where a client must misbehave in ways httpx will not.
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dymu.errors import PreferenceError
from dymu.preference import normalize_preference
from service.client import DymuClient
from service.server import BackgroundServer

from .test_service import TASKS, png, random_image, running, save_tiny


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("strict"))


@pytest.fixture(scope="module")
def server(store) -> Iterator[BackgroundServer]:
    with running(store) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def image_b64() -> str:
    return base64.b64encode(png(random_image(0))).decode()


def raw_request(url: str, head: str, body: bytes = b"") -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(head.encode() + body)
    return sock


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def post_head(path: str, length: int, ctype: str = "application/json") -> str:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    )


# ----------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("path", ["/predict", "/preference"])
def test_deep_json_nesting_is_a_4xx_not_a_500(http, path):
    for depth in (100_000, 900):  # past the parser's limit; parsed, but deep in r
        deep = "[" * depth + "]" * depth
        body = (
            f'{{"image": "{image_b64()}", "r": {deep}}}'
            if path == "/predict"
            else (f'{{"r": {deep}}}')
        )
        res = http.post(path, content=body, headers={"content-type": "application/json"})
        assert res.status_code in (400, 422), res.text
        assert res.json()["detail"]
    assert http.get("/healthz").status_code == 200  # the server (and its loop) is fine


def test_duplicated_json_fields_are_refused_by_name(http):
    res = http.post(
        "/preference", content=b'{"r": [1, 0, 0], "c": 0.1, "c": 0.9}',
        headers={"content-type": "application/json"},
    )  # fmt: skip
    assert res.status_code == 422 and "'c'" in res.json()["detail"], res.text
    body = f'{{"image": "{image_b64()}", "preference_id": "a", "preference_id": "b"}}'
    res = http.post("/predict", content=body, headers={"content-type": "application/json"})
    assert res.status_code == 422 and "'preference_id'" in res.json()["detail"], res.text


@pytest.mark.parametrize("field", ["c", "preference_id", "image", "r", "format"])
def test_duplicated_form_fields_are_refused_by_name(http, field):
    image = ("image", ("x.png", png(random_image(1)), "image/png"))
    values = {"c": "0.5", "preference_id": "x", "r": "1,0,0", "format": "npz"}
    files = [image, image] if field == "image" else [image]
    data = {} if field == "image" else {field: [values[field], values[field]]}
    if field == "c":
        data["r"] = "1,0,0"
    res = http.post("/predict", files=files, data=data)
    assert res.status_code == 422, res.text
    assert f"'{field}'" in res.json()["detail"] and "more than once" in res.json()["detail"]


def test_unknown_fields_are_refused_by_name(http):
    res = http.post("/preference", json={"r": [1, 0, 0], "C": 1})
    assert res.status_code == 422 and "C" in res.json()["detail"], res.text
    res = http.post("/predict", json={"image": image_b64(), "r": [1, 0, 0], "C": 1})
    assert res.status_code == 422 and "C" in res.json()["detail"], res.text
    files = {"image": ("x.png", png(random_image(1)), "image/png")}
    res = http.post("/predict", files=files, data={"r": "1,0,0", "C": "1"})
    assert res.status_code == 422 and "'C'" in res.json()["detail"], res.text


R_VALUES = [[1, 0, 0], [True, 0, 0], ["1", 0, 0], [1, "0", 0], {"depth": 2}, {"depth": "2"},
            {"depth": True}, [1.5, 1, None], "1,0,0", [[1], 0, 0]]  # fmt: skip
C_VALUES = [0, 0.5, 1, True, False, "0.5", "1", None, [0.5], 2]


def core_accepts(r, c) -> bool:
    try:
        normalize_preference(r, 0.0 if c is None else c, TASKS)
    except PreferenceError:
        return False
    return True


def test_http_accepts_exactly_what_the_core_accepts(http):
    """One validator: for every (r, c) the HTTP answer is 200 iff dymu's validator accepts it
    (booleans and numbers spelled as strings are refused in JSON, as dymu.Preference does)."""
    seen = set()
    for r in R_VALUES:
        for c in C_VALUES:
            body = {"r": r} if c is None else {"r": r, "c": c}
            res = http.post("/preference", json=body)
            expected = 200 if core_accepts(r, c) else 422
            assert res.status_code == expected, (r, c, res.text)
            seen.add(expected)
    assert seen == {200, 422}


def test_form_fields_are_json_values_checked_by_the_core(http):
    """A form field is text: "0.5" is the number 0.5, "true" is the boolean (refused)."""
    files = {"image": ("x.png", png(random_image(2)), "image/png")}
    for r, c, ok in [("1,0,0", "0.5", True), ("[1, 0, 0]", "1", True), ("1,0,0", "true", False),
                     ("true,0,0", "0.5", False), ('["1", 0, 0]', "0", False),
                     ("1,0,0", "abc", False)]:  # fmt: skip
        res = http.post("/predict", files=files, data={"r": r, "c": c, "format": "npz"})
        assert res.status_code == (200 if ok else 422), (r, c, res.text)


# ----------------------------------------------------------------------- admission, deadline
def test_a_full_server_answers_503_before_reading_the_body(store):
    # 1 queued + 1 running: two stalled uploads fill the server
    with running(store, max_queue=1, max_batch_size=1, body_timeout_s=20) as srv:
        stalled = [raw_request(srv.url, post_head("/predict", 1000), b"{") for _ in range(2)]
        time.sleep(0.3)
        assert srv.service.in_flight == 2
        t0 = time.perf_counter()
        # a 10 MB body is announced but never sent: the answer cannot have waited for it
        sock = raw_request(srv.url, post_head("/predict", 10_000_000))
        reply = read_all(sock).decode("latin-1")
        elapsed = time.perf_counter() - t0
        assert reply.startswith("HTTP/1.1 503"), reply[:200]
        assert "retry-after: 1" in reply.lower() and "server is full" in reply
        assert elapsed < 2.0, elapsed
        for s in stalled:
            s.close()
        deadline = time.monotonic() + 10
        while srv.service.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.service.in_flight == 0  # the slots of the clients that left are free
        with DymuClient(srv.url) as client:
            assert client.predict(random_image(3), format="npz").outputs


def test_the_timeout_covers_the_whole_request(store):
    """The deadline starts when the request arrives: a body that takes longer than the
    request timeout is answered 504 (the old timeout only covered the wait in the queue)."""
    with running(store, request_timeout_s=1.0, body_timeout_s=30) as srv:
        body = f'{{"image": "{image_b64()}", "format": "npz"}}'.encode()
        sock = raw_request(srv.url, post_head("/predict", len(body)), body[:10])
        time.sleep(1.5)
        sock.sendall(body[10:])
        reply = read_all(sock).decode("latin-1")
        assert reply.startswith("HTTP/1.1 504"), reply[:300]
        assert "longer than 1 s" in reply
        with DymuClient(srv.url) as client:  # a prompt request is still served
            assert client.predict(random_image(3), format="npz").outputs


# ------------------------------------------------------------------------------ slow clients
def test_slow_headers_and_slow_bodies_are_cut_off(store):
    with running(store, header_timeout_s=0.5, body_timeout_s=0.5) as srv:
        t0 = time.perf_counter()
        sock = raw_request(srv.url, "POST /predict HTTP/1.1\r\nHost: x\r\n")  # no end of head
        assert read_all(sock) == b""  # closed without an answer
        assert time.perf_counter() - t0 < 5
        sock = raw_request(srv.url, post_head("/preference", 100), b'{"r": ')
        reply = read_all(sock).decode("latin-1")
        assert reply.startswith("HTTP/1.1 408"), reply[:200]
        assert "connection: close" in reply.lower()
        # a connection that sends nothing at all is closed too
        idle = raw_request(srv.url, "")
        assert read_all(idle) == b""
        # prompt clients on a kept-alive connection are not affected
        with httpx.Client(base_url=srv.url) as http:
            for _ in range(3):
                assert http.post("/preference", json={"r": [1, 0, 0]}).status_code == 200
                time.sleep(0.3)


# ------------------------------------------------------------------------- the process: CLI
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_process(store: Path, port: int, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dymu.cli", "serve", str(store), "--port", str(port),
         "--backend", "torch", "--device", "cpu", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "DYMU_LOG_LEVEL": "warning", **env},
    )  # fmt: skip


def test_sigterm_drains_in_flight_requests_and_exits_0(store):
    """A drain timeout shorter than the request timeout is raised to it: a request still
    running 2.5 s after SIGTERM (drain asked: 1 s; request timeout: 6 s) gets its answer."""
    port = free_port()
    proc = serve_process(
        store, port, DYMU_DRAIN_TIMEOUT_S="1", DYMU_REQUEST_TIMEOUT_S="6",
        DYMU_BODY_TIMEOUT_S="30",
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        with DymuClient(url) as client:
            client.wait_ready(timeout=90)
        body = f'{{"image": "{image_b64()}", "format": "npz"}}'.encode()
        sock = raw_request(url, post_head("/predict", len(body)), body[:10])
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        time.sleep(2.5)
        assert proc.poll() is None  # still draining
        sock.sendall(body[10:])
        reply = read_all(sock).decode("latin-1")
        assert reply.startswith("HTTP/1.1 200"), reply[:300]
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err


def test_a_corrupt_artifact_stops_dymu_serve_with_one_line(tmp_path):
    store = save_tiny(tmp_path, "corrupt")
    weights = max((store / "v1").iterdir(), key=lambda p: p.stat().st_size)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    proc = serve_process(store, free_port())
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("dymu: error: loading the model failed:"), err
    assert weights.name in lines[-1] and "sha256" in lines[-1]
    assert "Traceback" not in err


def test_stay_up_on_load_error_keeps_the_server_live_not_ready(tmp_path):
    store = save_tiny(tmp_path, "corrupt")
    weights = max((store / "v1").iterdir(), key=lambda p: p.stat().st_size)
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    port = free_port()
    proc = serve_process(store, port, "--stay-up-on-load-error")
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        status = None
        while time.monotonic() < deadline and status != "failed":
            try:
                status = httpx.get(url + "/readyz").json()["status"]
            except httpx.TransportError:
                time.sleep(0.2)
        assert status == "failed"
        assert httpx.get(url + "/healthz").status_code == 200
        assert httpx.get(url + "/readyz").status_code == 503
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0
