"""Liveness, readiness (ours and KServe v2's) and the Prometheus metrics."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse

from ..metrics import CONTENT_TYPE
from ..schemas import Health, Readiness
from ..state import Service, service_of

router = APIRouter(tags=["health"])
Svc = Annotated[Service, Depends(service_of)]
READY_RESPONSES = {503: {"model": Readiness, "description": "not ready yet"}}


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is alive (always 200 while it serves)."""
    return Health(status="alive")


@router.get("/readyz", response_model=Readiness, responses=READY_RESPONSES)
async def readyz(svc: Svc) -> JSONResponse:
    """200 once the model is loaded, verified and warmed up; 503 before (or if it failed,
    or while the server drains on SIGTERM)."""
    ok, lm = svc.ready, svc.current
    body = Readiness(
        ready=ok,
        status=svc.status,
        model=None if lm is None else lm.name,
        model_version=None if lm is None else lm.version,
        detail=svc.detail,
    )
    headers = {} if ok else {"Retry-After": str(svc.settings.retry_after_s)}
    return JSONResponse(body.model_dump(), 200 if ok else 503, headers=headers)


@router.get("/v2/health/live")
async def v2_live() -> dict[str, bool]:
    """KServe v2 liveness."""
    return {"live": True}


@router.get("/v2/health/ready", responses=READY_RESPONSES)
async def v2_ready(svc: Svc) -> JSONResponse:
    """KServe v2 readiness (200 + {"ready": true} when ready, else 503)."""
    ok = svc.ready
    return JSONResponse({"ready": ok}, 200 if ok else 503)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE.split(";")[0]: {}}}},
)
async def metrics(svc: Svc) -> Response:
    """Prometheus text exposition (all names prefixed dymu_, base units)."""
    lm = svc.current
    if lm is not None:
        svc.metrics.cache_entries.set(len(lm.cache))
        svc.metrics.cache_bytes.set(lm.cache.nbytes)
    if svc.batcher is not None:
        svc.metrics.queue_depth.set(svc.batcher.depth)
    return Response(svc.metrics.render(), media_type=CONTENT_TYPE)
