"""A lean HTTP/1.1 client for the request-path case (benchmarks/cases/request_path.py).

The benchmark measures the server, so the client must cost as little as it can on the cores it
shares with the server: bodies are encoded once before timing starts (multipart forms, OIP
binary requests), one keep-alive connection per client, and replies are read by their
``Content-Length`` without a general-purpose HTTP stack. ``Sync`` (a raw socket) times
sequential requests; :func:`closed_loop` runs concurrent clients on one asyncio loop over raw
streams. Measured here: receiving a 4.4 MB reply takes httpx ~8 ms more than ``http.client``,
and ``http.client`` ~0.1-0.2 ms more than the raw socket (docs/benchmarks.md, "Issue 15,
item 2").
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

OIP_HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass(frozen=True)
class Call:
    """One pre-encoded request: method, path, body and headers."""

    path: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    method: str = "POST"

    def head(self, host: str) -> bytes:
        """The request line and headers as bytes on the wire, up to the body."""
        lines = [f"{self.method} {self.path} HTTP/1.1", f"Host: {host}"]
        lines += [f"{k}: {v}" for k, v in self.headers.items()]
        lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def raw(self, host: str) -> bytes:
        """The request as bytes on the wire (for :func:`closed_loop`)."""
        return self.head(host) + self.body


def form_call(image: bytes, fields: dict[str, str], media_type: str = "image/png") -> Call:
    """``POST /predict`` as multipart: the image file and plain fields."""
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="image"'
        f"\r\nContent-Type: {media_type}\r\n\r\n".encode()
        + image
        + b"\r\n"
    ]
    for name, value in fields.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
            .encode()
        )  # fmt: skip
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return Call("/predict", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})


def oip_call(model: str, rgb: np.ndarray, preference_id: str) -> Call:
    """``POST /v2/models/{model}/infer``: raw UINT8 pixels in, binary FP32 outputs back."""
    header = {
        "inputs": [
            {
                "name": "image",
                "shape": [1, *rgb.shape],
                "datatype": "UINT8",
                "parameters": {"binary_data_size": rgb.size},
            }
        ],
        "parameters": {"preference_id": preference_id, "binary_data_output": True},
    }
    head = json.dumps(header).encode()
    body = head + np.ascontiguousarray(rgb, np.uint8).tobytes()
    headers = {"Content-Type": "application/octet-stream", OIP_HEADER_LENGTH: str(len(head))}
    return Call(f"/v2/models/{model}/infer", body, headers)


def server_times(headers: dict[str, str], body: bytes) -> tuple[float, float, int]:
    """(the server's model ms, total ms, batch size) of a /predict or OIP reply."""
    if "x-dymu-model-time-ms" in headers:
        return (
            float(headers["x-dymu-model-time-ms"]),
            float(headers["x-dymu-total-time-ms"]),
            int(headers["x-dymu-batch-size"]),
        )
    n = int(headers[OIP_HEADER_LENGTH.lower()])
    p = json.loads(body[:n])["parameters"]
    return float(p["model_ms"]), float(p["total_ms"]), int(p.get("batch_size", p["images"]))


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """A reply's status and headers (names lower-cased) from its status line and header lines."""
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return int(status_line.split()[1]), headers


class Sync:
    """One keep-alive connection for sequential timed requests, over a raw socket: the request
    line and headers go out with the pre-encoded body in one ``sendmsg`` (no copy of the body),
    and the reply is read by its ``Content-Length`` into one buffer (``http.client`` parses
    headers with the email package and reads through a buffered file: ~0.1-0.2 ms more per
    request, a few per cent of a 96x128 request)."""

    def __init__(self, host: str, port: int, timeout: float = 120.0) -> None:
        self.host = host
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._pending = b""  # bytes received past the previous reply (none with one in flight)

    def send(self, call: Call) -> tuple[dict[str, str], bytes]:
        """The reply's headers and body; raises unless its status is 200."""
        status, headers, body = self.request(call)
        if status != 200:
            raise RuntimeError(f"{call.path}: {status} {bytes(body[:300])!r}")
        return headers, body

    def request(self, call: Call) -> tuple[int, dict[str, str], bytes]:
        """Send ``call``; the reply's status, headers and body, whatever the status."""
        self.sock.sendmsg([call.head(self.host), call.body])
        return self._reply()

    def _reply(self) -> tuple[int, dict[str, str], bytes]:
        buf = self._pending
        while (end := buf.find(b"\r\n\r\n")) < 0:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            buf += chunk
        status, headers = parse_head(buf[:end])
        n = int(headers.get("content-length", "0"))
        body = bytearray(n)
        have = buf[end + 4 : end + 4 + n]
        body[: len(have)] = have
        view, got = memoryview(body), len(have)
        while got < n:
            k = self.sock.recv_into(view[got:])
            if not k:
                raise ConnectionError("the server closed the connection mid-reply")
            got += k
        self._pending = buf[end + 4 + n :]
        return status, headers, body  # a bytearray: no copy

    def close(self) -> None:
        self.sock.close()


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes
) -> tuple[dict[str, str], bytes]:
    writer.write(raw)
    status, headers = parse_head(await reader.readuntil(b"\r\n\r\n"))
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    if status != 200:
        raise RuntimeError(f"{status}: {body[:300]!r}")
    return headers, body


@dataclass
class LoadResult:
    """What :func:`closed_loop` saw: replies within the window and the server's batch sizes."""

    wall_s: float
    latencies_s: list[float]
    batches: list[int]

    @property
    def images_per_s(self) -> float:
        return len(self.latencies_s) / self.wall_s if self.wall_s else 0.0


async def closed_loop(host: str, port: int, call: Call, clients: int, seconds: float) -> LoadResult:
    """``clients`` connections, each sending ``call`` again as soon as its reply is in."""
    raw = call.raw(host)
    conns = [await asyncio.open_connection(host, port) for _ in range(clients)]
    await asyncio.gather(*(_exchange(r, w, raw) for r, w in conns))  # warm the connections
    latencies: list[float] = []
    batches: list[int] = []
    start = time.perf_counter()
    stop = start + seconds

    async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            headers, body = await _exchange(reader, writer, raw)
            latencies.append(time.perf_counter() - t0)
            batches.append(server_times(headers, body)[2])

    try:
        await asyncio.gather(*(worker(r, w) for r, w in conns))
    finally:
        for _, w in conns:
            w.close()
    return LoadResult(time.perf_counter() - start, latencies, batches)


def probe_statuses(
    host: str, port: int, call: Call, seconds: float, interval: float
) -> list[tuple[int, float]]:
    """(status, seconds) of ``call`` sent every ``interval`` s for ``seconds``, each on a new
    connection (a 503 closes it): how fast the server answers one more client while others load
    it. Run in a process of its own (:class:`ProbeProcess`) so that the load's client loop
    does not delay it."""
    seen: list[tuple[int, float]] = []
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:
        t0 = time.perf_counter()
        conn = Sync(host, port)
        try:
            status, _, _ = conn.request(call)
            seen.append((status, time.perf_counter() - t0))
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(max(0.0, interval - (time.perf_counter() - t0)))
    return seen


def _probe_main(args: tuple, out: Any) -> None:
    out.send(probe_statuses(*args))
    out.close()


class ProbeProcess:
    """:func:`probe_statuses` in a spawned process: ``start()``, then ``result()``."""

    def __init__(self, host: str, port: int, call: Call, seconds: float, interval: float) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self._recv, send = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(
            target=_probe_main, args=((host, port, call, seconds, interval), send), daemon=True
        )

    def start(self) -> ProbeProcess:
        self._proc.start()
        return self

    def result(self, timeout: float = 120.0) -> list[tuple[int, float]]:
        if not self._recv.poll(timeout):
            self._proc.kill()
            raise TimeoutError("the probe process did not report")
        seen = self._recv.recv()
        self._proc.join(5)
        return seen
