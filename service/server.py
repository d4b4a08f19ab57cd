"""Running the app under uvicorn: in the foreground (``dymu serve``) or on a background thread
(tests, benchmarks, notebooks)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn
from fastapi import FastAPI

from .app import create_app
from .settings import Settings


def uvicorn_config(app: FastAPI, settings: Settings, **overrides: Any) -> uvicorn.Config:
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "lifespan": "on",
        "timeout_graceful_shutdown": 10,
    }
    return uvicorn.Config(app, **{**options, **overrides})


def serve(settings: Settings) -> None:
    """Serve in the foreground until interrupted."""
    uvicorn.Server(uvicorn_config(create_app(settings), settings)).run()


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
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    @property
    def service(self):  # service.app.Service
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
