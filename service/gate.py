"""The outermost ASGI middleware: what happens to a request before any route sees it.

In order: the request's start time and deadline go into ``scope["state"]``; a /predict call
(or an Open Inference Protocol infer call, ``/v2/models/{model}[/versions/{v}]/infer``) is
admitted or refused (503 + Retry-After) *before its body is read*, so a full server answers in
milliseconds however large the body (with ``DYMU_OVERLOAD=degrade``, a request whose
``X-Dymu-Allow-Degrade`` header allows it is admitted past the limit to run degraded); a body
is read up to ``max_body_bytes`` (413 beyond, before the rest is read) within
``body_timeout_s`` (408, connection closed) and replayed to the app. Every request is counted
and timed per route template.
"""

from __future__ import annotations

import asyncio
import json
import time

from starlette.applications import Starlette
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import errors
from .errors import ClientDisconnectedError, RequestReadTimeoutError, ServiceError
from .oip_codec import INFER_PATH, error_body
from .parsing import asgi_chunks, check_declared_length, read_limited
from .schemas import ALLOW_DEGRADE_HEADER
from .state import Service

#: The routes admitted by :meth:`Service.admit` (the ones that queue work on the model) ...
ADMITTED = frozenset({("POST", "/predict")})
#: ... and the OIP infer routes' templates (their paths carry the model name and version).
INFER_TEMPLATES = ("/v2/models/{model}/infer", "/v2/models/{model}/versions/{version}/infer")
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def allows_degrade(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a request's ``X-Dymu-Allow-Degrade`` header is ``1`` or ``true``."""
    value = dict(headers).get(ALLOW_DEGRADE_HEADER.lower().encode(), b"")
    return value.strip().lower() in (b"1", b"true")


def admitted(method: str, path: str) -> bool:
    """Whether a request is admitted (or refused) before its body is read."""
    return (method, path) in ADMITTED or (method == "POST" and INFER_PATH.match(path) is not None)


class Gate:
    """Admission, body limit and timeout, and request metrics (see the module docstring)."""

    def __init__(self, app: ASGIApp, service: Service, api: Starlette) -> None:
        self.app = app
        self.service = service
        self.api = api
        self._paths: frozenset[str] | None = None

    def _endpoint(self, scope: Scope) -> str:
        """The route template, for the metrics' labels (never a raw id-bearing path)."""
        route = scope.get("route")  # set by the router once it matched
        if route is not None:
            return getattr(route, "path", "other")
        if self._paths is None:  # the app's fixed paths, for requests the gate answered
            self._paths = frozenset(p for p in self.api.openapi()["paths"] if "{" not in p)
        path = scope["path"]
        if path in self._paths:
            return path
        infer = INFER_PATH.match(path)
        return "unmatched" if infer is None else INFER_TEMPLATES[infer.group(1) is not None]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        state = scope.setdefault("state", {})
        state["t0"] = t0
        state["deadline"] = t0 + self.service.settings.request_timeout_s
        method, status = scope.get("method", "GET"), 500

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._handle(scope, receive, send_counted, method)
        finally:
            labels = (self._endpoint(scope), method, str(status))
            self.service.metrics.requests.labels(*labels).inc()
            self.service.metrics.request_seconds.labels(*labels).observe(time.perf_counter() - t0)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, method: str) -> None:
        taken = False  # admitted here: released when the request is done
        try:
            if admitted(method, scope["path"]):
                # Only /predict degrades (service/selection.py); OIP infer is admitted as ever.
                allow = scope["path"] == "/predict" and allows_degrade(scope.get("headers") or [])
                state = scope.setdefault("state", {})
                state["allow_degrade"] = allow
                state["over_admitted"] = self.service.admit(allow)
                taken = True
            if method in BODY_METHODS:
                receive = await self._read_body(scope, receive)
        except ClientDisconnectedError:
            pass  # nobody to answer
        except ServiceError as exc:
            await send_error(send, exc, oip=INFER_PATH.match(scope["path"]) is not None)
        else:
            await self.app(scope, receive, send)
        finally:
            if taken:
                self.service.release()

    async def _read_body(self, scope: Scope, receive: Receive) -> Receive:
        s = self.service.settings
        declared = dict(scope.get("headers") or []).get(b"content-length")
        check_declared_length(declared and declared.decode("latin-1"), s.max_body_bytes)
        try:
            async with asyncio.timeout(s.body_timeout_s):
                body = await read_limited(asgi_chunks(receive), s.max_body_bytes)
        except TimeoutError:
            raise RequestReadTimeoutError(
                f"the body was not received within {s.body_timeout_s:g} s"
            ) from None
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay


async def send_error(send: Send, exc: ServiceError, oip: bool = False) -> None:
    """An error answered by the gate itself; the connection closes (the rest of the body, if
    any, is never read). ``oip``: in the Open Inference Protocol's body."""
    status, code = errors.status_of(exc), errors.error_code(exc)
    fields = (
        error_body(f"{code}: {exc.detail}") if oip else errors.error_body(status, code, exc.detail)
    )
    body = json.dumps(fields).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
