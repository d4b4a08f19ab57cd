"""Running the app under uvicorn: in the foreground (``dymu serve``) or on a background thread
(tests, benchmarks, notebooks).

What uvicorn does not do, :class:`DymuServer` adds:

* a header read timeout (``header_timeout_s``): uvicorn's ``timeout_keep_alive`` only covers
  the idle time between requests and is reset by every byte, so a client that trickles its
  request line and headers would hold a connection for ever; the protocol below closes it.
  (The body read timeout is the gate's, service/gate.py: a 408.)
* SIGTERM drains: the service stops admitting at once (/readyz and new predictions answer
  503), in-flight requests get ``drain_s`` (at least the request timeout) to finish, and the
  process exits 0 (uvicorn re-raises the signal, which would exit 143: a failed container).
* a response's head and body leave in one write (:class:`CoalescedWrites`), where uvicorn
  makes two.
* a model that fails to load or verify at start stops the server, and ``dymu serve`` exits
  non-zero with the reason (``exit_on_load_error``; off: stay up, live but not ready).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from dymu.errors import DymuError

from .app import create_app
from .settings import Settings
from .state import Service


class CoalescedWrites:
    """A transport whose small writes wait for the next write, or at most for the end of this
    event-loop iteration, so that a response's head and body leave in one system call.

    uvicorn writes the status line and headers, then the body, as two ``transport.write``
    calls. With ``TCP_NODELAY`` each is a segment of its own, and on loopback each wakes the
    client: two syscalls and two wake-ups per reply, ~0.1 ms of a 96x128 prediction
    (docs/service.md, "Where the time goes"). Everything but ``write`` is the transport's own;
    ``close`` and ``write_eof`` send what is held first, ``abort`` drops it.
    """

    #: Writes up to this size are held (a response head is a few hundred bytes).
    HOLD_BYTES = 4096
    #: Without a gathering ``writelines`` (the stdlib loop joins), a held write is coalesced
    #: only with bodies up to this size: beyond it the copy costs more than the syscall.
    JOIN_BYTES = 65_536

    def __init__(self, transport: asyncio.Transport, gathers: bool | None = None) -> None:
        self._transport = transport
        self._held: bytes | None = None
        # uvloop writes a list of buffers with one writev; asyncio 3.11 joins them (a copy).
        uvloop = type(transport).__module__.startswith("uvloop")
        self._gathers = uvloop if gathers is None else gathers

    def write(self, data: bytes | bytearray | memoryview) -> None:
        held = self._held
        if held is not None:
            self._held = None
            if self._gathers or len(data) <= self.JOIN_BYTES:
                self._transport.writelines((held, data))
                return
            self._transport.write(held)
        elif len(data) <= self.HOLD_BYTES:
            self._held = bytes(data)
            asyncio.get_running_loop().call_soon(self.flush)
            return
        self._transport.write(data)

    def writelines(self, chunks: Iterable[bytes | bytearray | memoryview]) -> None:
        for chunk in chunks:
            self.write(chunk)

    def flush(self) -> None:
        """Send the held write, if any (scheduled by :meth:`write` for the loop's next turn)."""
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + len(self._held or b"")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescedHead:
    """Protocol mixin: the connection's writes go through :class:`CoalescedWrites`."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescedWrites(transport))  # type: ignore[misc]


class HeaderTimeout:
    """Protocol mixin: a request's line and headers must arrive within ``header_timeout``
    seconds of the connection (or of the first byte after the previous response)."""

    header_timeout: float = 10.0
    _header_timer: asyncio.TimerHandle | None = None
    _timed_cycle: Any = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[misc]
        self._timed_cycle = self.cycle  # type: ignore[attr-defined]
        self._arm()

    def data_received(self, data: bytes) -> None:
        idle = self.cycle is None or self.cycle.response_complete  # type: ignore[attr-defined]
        if idle and self._header_timer is None:
            self._timed_cycle = self.cycle  # type: ignore[attr-defined]
            self._arm()
        super().data_received(data)  # type: ignore[misc]
        if self.cycle is not self._timed_cycle:  # type: ignore[attr-defined]
            self._disarm()  # the headers are in: a new request cycle started

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        self._header_timer = loop.call_later(self.header_timeout, self._expire)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expire(self) -> None:
        self._header_timer = None
        self.transport.close()  # type: ignore[attr-defined]


def protocol_class(header_timeout: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools when installed, else h11) with the header timeout and
    coalesced writes."""
    base: type = H11Protocol
    with contextlib.suppress(ImportError):
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        base = HttpToolsProtocol
    bases = (HeaderTimeout, CoalescedHead, base)
    return type("DymuProtocol", bases, {"header_timeout": header_timeout})


def uvicorn_config(app: FastAPI, settings: Settings, **overrides: Any) -> uvicorn.Config:
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "lifespan": "on",
        "timeout_graceful_shutdown": settings.drain_s,
        "http": protocol_class(settings.header_timeout_s),
    }
    return uvicorn.Config(app, **{**options, **overrides})


class DymuServer(uvicorn.Server):
    """uvicorn's server, draining on SIGTERM and stopping when the model fails to load."""

    def __init__(self, config: uvicorn.Config, service: Service) -> None:
        super().__init__(config)
        self.service = service
        self.load_error: str | None = None  # why the server stopped itself

    def _check_load(self) -> bool:
        svc = self.service
        if svc.status == "failed" and svc.settings.exit_on_load_error:
            self.load_error = svc.detail or "loading the model failed"
        return self.load_error is not None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.service.drain()
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        return self._check_load() or await super().on_tick(counter)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)
        # After a drain SIGTERM is a clean exit (0); Ctrl-C still ends as an interrupt (130).
        if signal.SIGINT in self._captured_signals:
            signal.raise_signal(signal.SIGINT)


def serve(settings: Settings) -> None:
    """Serve in the foreground until SIGTERM / Ctrl-C (or a model that fails to load)."""
    app = create_app(settings)
    server = DymuServer(uvicorn_config(app, settings), app.state.service)
    server.run()
    if server.load_error is not None:
        raise DymuError(server.load_error)


class BackgroundServer:
    """A real uvicorn server on a free loopback port, on a daemon thread.

    ``with BackgroundServer(settings) as server: httpx.get(server.url + "/healthz")``. The
    socket is bound before the thread starts, so ``url`` is valid at once; readiness is the
    app's business (poll /readyz).
    """

    def __init__(self, settings: Settings, app: FastAPI | None = None, **config: Any) -> None:
        self.settings = settings
        self.app = app or create_app(settings)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = uvicorn_config(self.app, settings, **{"log_level": "warning", **config})
        self.server = DymuServer(cfg, self.app.state.service)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    @property
    def service(self) -> Service:
        return self.app.state.service

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread died while starting")
            if time.monotonic() > deadline:
                raise TimeoutError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
