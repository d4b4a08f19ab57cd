"""Errors of the service and the one place that maps every error to an HTTP status.

dymu's core raises typed errors (:mod:`dymu.errors`); the service adds its own for things only a
server has (bodies, images, queues, ids, admin). :data:`STATUS` maps each class to its status
code and :func:`install` registers one handler for all of them, so no endpoint picks a status
itself. Every error body is ``{"error": <code>, "detail": <reason>, "status": <status>}``.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dymu.errors import (
    ArchitectureError,
    ArtifactError,
    BudgetError,
    ConfigError,
    DymuError,
    InputError,
    PreferenceError,
    TaskError,
    validation_message,
)

from .schemas import ErrorBody

log = logging.getLogger("dymu.service")


class ServiceError(Exception):
    """An error of the service itself; subclasses are listed in :data:`STATUS`."""

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}


class BadRequestError(ServiceError):
    """A request whose fields are valid one by one but not together (422)."""


class NotReadyError(ServiceError):
    """The model is still loading or warming up (503 + Retry-After)."""


class OverloadedError(ServiceError):
    """The inference queue is full (503 + Retry-After)."""


class ReplicaFailedError(ServiceError):
    """Ray Serve: the replica serving the request died or became unreachable (503 +
    Retry-After); the other replicas, and its replacement, keep serving."""


class RequestTimeoutError(ServiceError):
    """The prediction did not finish within the per-request timeout (504)."""


class RequestReadTimeoutError(ServiceError):
    """The client sent the body too slowly (408; the connection is closed)."""


class ClientDisconnectedError(ServiceError):
    """The client went away before its request was read (nothing is answered)."""


class PayloadTooLargeError(ServiceError):
    """A body over the byte limit or an image over the pixel limit (413)."""


class UnsupportedMediaTypeError(ServiceError):
    """A body or an image of a type the server does not read (415)."""


class BadImageError(ServiceError):
    """An image that claims a supported format but cannot be decoded (422)."""


class MalformedPreferenceIdError(ServiceError):
    """A preference id that does not parse, fails its checksum or is not canonical (422)."""


class UnknownPreferenceIdError(ServiceError):
    """A well-formed preference id of another model or model version (404)."""


class UnknownModelError(ServiceError):
    """Open Inference Protocol: a model name or version this server does not serve (404)."""


class AdminDisabledError(ServiceError):
    """The admin surface is off: no token is configured (404)."""


class UnauthorizedError(ServiceError):
    """An admin call without a bearer token (401)."""


class ForbiddenError(ServiceError):
    """An admin call with the wrong token (403)."""


#: The one mapping from error class to HTTP status (most specific class first wins via MRO).
STATUS: dict[type[BaseException], int] = {
    # dymu core
    BudgetError: 422,  # malformed, with c, or below the cheapest tree (which it names)
    PreferenceError: 422,
    TaskError: 422,
    InputError: 422,
    ArchitectureError: 422,
    ConfigError: 422,
    ArtifactError: 409,  # only on an admin reload: the store's newest version is unusable
    DymuError: 422,
    # service
    BadRequestError: 422,
    NotReadyError: 503,
    OverloadedError: 503,
    ReplicaFailedError: 503,
    RequestTimeoutError: 504,
    RequestReadTimeoutError: 408,
    ClientDisconnectedError: 499,  # nginx's code: logged and counted, never seen by a client
    PayloadTooLargeError: 413,
    UnsupportedMediaTypeError: 415,
    BadImageError: 422,
    MalformedPreferenceIdError: 422,
    UnknownPreferenceIdError: 404,
    UnknownModelError: 404,
    AdminDisabledError: 404,
    UnauthorizedError: 401,
    ForbiddenError: 403,
}


#: The OpenAPI ``responses`` of the endpoints that take user input.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        404: "unknown preference id (another model version)",
        408: "the body was sent too slowly",
        413: "body or image too large",
        415: "not a PNG, JPEG or NPY image / unsupported body type",
        422: "invalid preference, budget (or one below the cheapest tree), task, id, image or "
        "field (unknown or given twice)",
        503: "not ready, draining, or full (Retry-After)",
        504: "the request ran past the per-request timeout",
    }.items()
}


def status_of(exc: BaseException) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def error_code(exc: BaseException) -> str:
    """``PreferenceError`` -> ``preference_error``; service errors drop the suffix
    (``PayloadTooLargeError`` -> ``payload_too_large``)."""
    code = re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()
    if isinstance(exc, ServiceError) and code.endswith("_error"):
        code = code[: -len("_error")]
    return code


def error_body(status: int, code: str, detail: str) -> dict:
    return {"error": code, "detail": detail, "status": status}


def error_response(exc: BaseException) -> JSONResponse:
    status = status_of(exc)
    detail = exc.detail if isinstance(exc, ServiceError) else str(exc)
    headers = dict(exc.headers) if isinstance(exc, ServiceError) else {}
    if status == 500:
        log.exception("unexpected error", exc_info=exc)
        detail = "internal error; the server log has the traceback"
    return JSONResponse(error_body(status, error_code(exc), detail), status, headers=headers)


def _validation_detail(exc: RequestValidationError) -> str:
    return validation_message(exc.errors(), 5, skip=("body",), root="body") or "invalid request"


def install(app: FastAPI) -> None:
    """Register the handlers: typed errors, request validation, routing errors, the rest."""

    async def typed(request: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)

    async def validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(
            error_body(422, "validation_error", _validation_detail(exc)), status_code=422
        )

    async def http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(
            error_body(exc.status_code, code, str(exc.detail)),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    app.add_exception_handler(ServiceError, typed)
    app.add_exception_handler(DymuError, typed)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http)
    app.add_exception_handler(Exception, typed)
