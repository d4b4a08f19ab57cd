"""How replies are written (docs/service.md, "Where the time goes"): a response's head and
body in one write (service/server.py, ``CoalescedWrites``), on a recording transport and then
under uvicorn with dymu's protocol on loopback, where a head sent before a slow body must
still arrive at once; and a body sent as a list of buffers (service/responses.py)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn

from service.responses import SMALL_PART, PartsResponse, merged
from service.server import CoalescedWrites, uvicorn_config
from service.settings import Settings


class Recording:
    """A transport that records what reaches it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[bytes, ...]]] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.calls.append(("write", (bytes(data),)))

    def writelines(self, chunks: Any) -> None:
        self.calls.append(("writelines", tuple(bytes(c) for c in chunks)))

    def close(self) -> None:
        self.calls.append(("close", ()))
        self.closing = True

    def abort(self) -> None:
        self.calls.append(("abort", ()))
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 1)}.get(name, default)


def on_a_loop(steps) -> list:
    """Run ``steps(wrapped, transport)`` (a coroutine function) on a fresh loop: the calls."""
    transport = Recording()

    async def main() -> None:
        await steps(CoalescedWrites(transport, gathers=False), transport)

    asyncio.run(main())
    return transport.calls


HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"


def test_a_head_and_its_body_leave_in_one_call():
    async def steps(w: CoalescedWrites, t: Recording) -> None:
        w.write(HEAD)
        assert t.calls == []  # held
        w.write(b"hello")
        await asyncio.sleep(0)

    assert on_a_loop(steps) == [("writelines", (HEAD, b"hello"))]


def test_a_held_write_leaves_at_the_end_of_the_loop_iteration():
    async def steps(w: CoalescedWrites, t: Recording) -> None:
        w.write(HEAD)
        await asyncio.sleep(0)  # the flush was scheduled before this task resumes
        assert t.calls == [("write", (HEAD,))]
        w.write(b"hello")  # a small write alone is held and flushed in turn
        await asyncio.sleep(0)

    assert on_a_loop(steps) == [("write", (HEAD,)), ("write", (b"hello",))]


def test_large_writes_pass_and_a_copy_is_avoided_without_writev():
    big = b"x" * (CoalescedWrites.JOIN_BYTES + 1)

    async def steps(w: CoalescedWrites, t: Recording) -> None:
        w.write(big)  # too large to hold
        w.write(HEAD)
        w.write(big)  # no gathering writelines: joining would copy it
        await asyncio.sleep(0)

    assert on_a_loop(steps) == [("write", (big,)), ("write", (HEAD,)), ("write", (big,))]

    transport = Recording()

    async def gathering() -> None:
        w = CoalescedWrites(transport, gathers=True)
        w.write(HEAD)
        w.write(big)

    asyncio.run(gathering())
    assert transport.calls == [("writelines", (HEAD, big))]


def test_close_sends_what_is_held_and_abort_drops_it():
    async def closing(w: CoalescedWrites, t: Recording) -> None:
        w.write(HEAD)
        w.close()
        await asyncio.sleep(0)  # the scheduled flush finds nothing left

    assert on_a_loop(closing) == [("write", (HEAD,)), ("close", ())]

    async def aborting(w: CoalescedWrites, t: Recording) -> None:
        w.write(HEAD)
        w.abort()
        await asyncio.sleep(0)

    assert on_a_loop(aborting) == [("abort", ())]


def test_everything_else_is_the_transports():
    t = Recording()
    w = CoalescedWrites(t, gathers=False)
    assert w.get_extra_info("peername") == ("127.0.0.1", 1)
    assert not w.is_closing()


# ------------------------------------------------------------------------ a real uvicorn
async def slow_body(scope: dict, receive: Any, send: Any) -> None:
    """Plain ASGI: the head at once, the body 0.5 s later (a slow stream)."""
    if scope["type"] == "lifespan":
        await receive()  # startup
        await send({"type": "lifespan.startup.complete"})
        await receive()  # shutdown
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"x-a", b"1")]})
    await asyncio.sleep(0.5)
    await send({"type": "http.response.body", "body": b"late", "more_body": False})


@contextlib.contextmanager
def serving(app: Any) -> Iterator[int]:
    """``app`` under uvicorn with dymu's protocol on a free loopback port: the port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn_config(app, Settings(), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture()
def slow_server() -> Iterator[int]:
    with serving(slow_body) as port:
        yield port


def test_a_head_sent_before_a_slow_body_arrives_at_once(slow_server):
    with socket.create_connection(("127.0.0.1", slow_server), timeout=10) as conn:
        t0 = time.perf_counter()
        conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        head = conn.recv(65_536)
        t_head = time.perf_counter() - t0
        rest = b""
        while not rest.endswith(b"late\r\n0\r\n\r\n"):
            rest += conn.recv(65_536)
    assert head.startswith(b"HTTP/1.1 200") and b"x-a: 1" in head
    assert t_head < 0.4  # not held until the body
    assert b"late" in rest and b"late" not in head


# ------------------------------------------------------------------- a body sent as parts
PARTS = [b"head:", memoryview(np.arange(300_000, dtype=np.float32).view(np.uint8)), b"", b":end"]


async def parts_app(scope: dict, receive: Any, send: Any) -> None:
    """Plain ASGI: ``/`` answers :data:`PARTS`, ``/empty`` no parts at all."""
    if scope["type"] == "lifespan":
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await send({"type": "lifespan.shutdown.complete"})
        return
    parts = PARTS if scope["path"] == "/" else []
    headers = {"x-parts": str(len(parts))}
    await PartsResponse(parts, headers=headers, media_type="application/x-npz")(
        scope, receive, send
    )


def test_a_body_of_parts_is_their_join_with_its_length():
    with serving(parts_app) as port, httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
        for _ in range(2):  # and again on the kept-alive connection
            reply = http.get("/")
            assert reply.status_code == 200
            assert reply.content == b"".join(PARTS)
            assert reply.headers["content-length"] == str(len(b"".join(PARTS)))
            assert reply.headers["content-type"] == "application/x-npz"
            assert reply.headers["x-parts"] == "4"
        empty = http.get("/empty")
        assert empty.content == b"" and empty.headers["content-length"] == "0"


def test_small_parts_are_joined_and_large_ones_kept():
    big = memoryview(bytearray(SMALL_PART))
    out = merged([b"a", b"", b"b", big, b"c", big, b"d", b"e"])
    assert out[0] == b"ab" and out[1] is big and out[2] == b"c" and out[3] is big
    assert out[4] == b"de" and len(out) == 5
    assert merged([]) == [] and merged([b""]) == []
