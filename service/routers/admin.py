"""The admin surface (bearer token; off unless DYMU_ADMIN_TOKEN is set): reload, clear cache."""

from __future__ import annotations

import hmac
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from ..errors import AdminDisabledError, ForbiddenError, UnauthorizedError
from ..schemas import AdminResult, ErrorBody
from ..state import Service, service_of

Svc = Annotated[Service, Depends(service_of)]


async def require_admin(request: Request) -> None:
    token = (await service_of(request)).settings.admin_token
    if token is None:
        raise AdminDisabledError("the admin surface is off: set DYMU_ADMIN_TOKEN to enable it")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise UnauthorizedError(
            "admin calls need 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
        raise ForbiddenError("wrong admin token")


def router(enabled: bool) -> APIRouter:
    """The admin routes; listed in the OpenAPI schema only when the surface is on."""
    r = APIRouter(
        tags=["admin"],
        dependencies=[Depends(require_admin)],
        include_in_schema=enabled,
        responses={code: {"model": ErrorBody} for code in (401, 403, 404, 409, 503)},
    )
    r.add_api_route("/admin/reload", admin_reload, methods=["POST"], response_model=AdminResult)
    r.add_api_route(
        "/admin/cache/clear", admin_clear_cache, methods=["POST"], response_model=AdminResult
    )
    return r


async def admin_reload(svc: Svc) -> AdminResult:
    """Load the model store again (its newest version), warm it up and switch to it.

    Requests in flight finish on the old model; the cache starts empty (ids of the old
    version get 404 afterwards if the version changed).
    """
    t0 = time.perf_counter()
    lm, previous = await svc.reload()
    return AdminResult(
        action="reload",
        model=lm.name,
        model_version=lm.version,
        previous_version=None if previous is None else previous.version,
        elapsed_ms=round((time.perf_counter() - t0) * 1e3, 3),
    )


async def admin_clear_cache(svc: Svc) -> AdminResult:
    """Drop every cached preference except the default (ids stay valid: rebuilt on use)."""
    t0 = time.perf_counter()
    lm = svc.require_ready()
    cleared = lm.cache.clear()
    if lm.pool is not None:
        lm.pool.clear()
    return AdminResult(
        action="clear_cache",
        model=lm.name,
        model_version=lm.version,
        cleared=cleared,
        elapsed_ms=round((time.perf_counter() - t0) * 1e3, 3),
    )
