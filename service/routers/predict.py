"""/predict: one image through the sub-network of a preference, within the request's deadline.

The steps, each on the thread pool its work belongs to: parse the body (service/parsing.py),
pick the preference and resolve the task subset once, decode the image, find or build the
sub-network, queue the image for a batch, then compute the cost and encode the outputs. The
deadline set by the gate (arrival + ``request_timeout_s``) covers all of them: past it the
request is answered 504 and its queued image, if any, is dropped from the batch.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from fastapi import APIRouter, Request, Response

from dymu.cost import Cost

from ..errors import ERROR_RESPONSES
from ..imaging import declared_pixels, decode_image, encode_npz, encode_task
from ..inference import deadline, run_images
from ..parsing import PredictBody, parse_predict
from ..responses import Part, PartsResponse
from ..routing import LeanRoute
from ..runtime import LoadedModel, Output, PreferenceEntry, TaskSubset
from ..schemas import (
    CACHE_HEADER,
    DEGRADED_HEADER,
    HEADER_PREFIX,
    NPZ_MEDIA_TYPE,
    Prediction,
    PredictJSON,
    RequestMetrics,
)
from ..selection import Selected, select
from ..state import Service, service_from

# the hot path: called without FastAPI's per-request dependency solving (service/routing.py)
router = APIRouter(tags=["predict"], route_class=LeanRoute)

MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["image"],
    "additionalProperties": False,
    "properties": {
        "image": {
            "type": "string",
            "format": "binary",
            "description": "PNG, JPEG, or NPY (raw uint8 pixels, (H, W, 3) or (H, W))",
        },
        "preference_id": {"type": "string", "description": "from POST /preference"},
        "r": {
            "type": "string",
            "description": "inline r: JSON list or {task: weight} map, or comma-separated",
            "example": "[0.6, 0.3, 0.1]",
        },
        "c": {"type": "number", "description": "inline c in [0, 1] (with r; default 0)"},
        "budget": {
            "type": "string",
            "description": "instead of c: a JSON budget, with r",
            "example": '{"max_gflops": 0.25}',
        },
        "allow_degrade": {
            "type": "boolean",
            "description": "may run at the server's degrade c under load (DYMU_OVERLOAD=degrade)",
        },
        "tasks": {
            "type": "string",
            "description": "comma-separated task subset (default: all)",
            "example": "segmentation,depth",
        },
        "format": {"type": "string", "enum": ["json", "npz"], "default": "json"},
    },
}
OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": MULTIPART_SCHEMA},
            "application/json": {"schema": PredictJSON.model_json_schema()},
        },
    }
}
RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "JSON with PNG maps, or an .npz of float32 arrays",
        "content": {NPZ_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
    },
    **ERROR_RESPONSES,
}


@dataclass
class Served:
    """What one prediction produced, before it is encoded."""

    entry: PreferenceEntry
    computed: bool
    subset: TaskSubset
    hw: tuple[int, int]
    out: Output
    queue_s: float
    selected: Selected


@router.post("/predict", response_model=Prediction, responses=RESPONSES, openapi_extra=OPENAPI)
async def predict(request: Request) -> Response:
    """Predict one image with the sub-network of a preference.

    Send the image as a multipart file (`image`) or as JSON with base64. Pick the
    preference by `preference_id`, inline `r` (and `c`), or nothing (the server default);
    `tasks` restricts the run (and the reported cost) to a subset; a `budget` (with `r`, not
    `c`) runs the lowest c whose tree fits it; `allow_degrade` (or the header
    `X-Dymu-Allow-Degrade: 1`) lets a loaded server run a cheaper c. `format=json` returns
    PNG-encoded maps, `format=npz` float32 arrays. Metrics come in the body and as
    `X-Dymu-*` headers.
    """
    svc = service_from(request)
    lm = svc.require_ready()
    async with deadline(request, svc) as t0:
        body = await parse_predict(request, lambda fn, raw: svc.io(fn, raw, data_bytes=len(raw)))
        served = await _serve(svc, lm, body, request.scope.get("state", {}))
        return await _respond(svc, lm, body.fields, served, t0)


async def _serve(svc: Service, lm: LoadedModel, body: PredictBody, state: dict[str, Any]) -> Served:
    req = body.fields
    subset = lm.subset(req.tasks)
    sel = await select(svc, lm, req, subset, state)
    pref, key = sel.preference, sel.key

    # Inline (Service.io) only when the image *decodes* small: its header says how many pixels.
    if isinstance(body.image, bytes):  # a file: its header is read where it lies
        data: bytes | None = body.image
    else:  # base64 text: decoded on the loop only when short
        short = len(body.image) <= svc.settings.inline_io_bytes
        data = body.image_bytes() if short else None
    pixels = declared_pixels(data) if data is not None else None

    def decode() -> torch.Tensor:
        raw = data if data is not None else body.image_bytes()
        return lm.image_tensor(decode_image(raw, svc.settings.max_pixels))

    x = await svc.io(decode, data_bytes=None if pixels is None else 3 * pixels)
    limit = sel.queue_limit(svc.settings.max_queue)
    ran = await run_images(svc, lm, key, pref, subset, [x], limit)
    hw = (int(x.shape[-2]), int(x.shape[-1]))
    return Served(ran.entry, ran.computed, subset, hw, ran.outs[0], ran.queue_s, sel)


async def _respond(
    svc: Service, lm: LoadedModel, req: PredictJSON, s: Served, t0: float
) -> Response:
    names, specs = s.subset.names, lm.task_specs
    io = partial(svc.io, data_bytes=s.hw[0] * s.hw[1] * 3)  # inline for a small image
    if req.format == "npz":  # one hop to an I/O thread: the cost, then the archive
        metrics, parts = await io(_npz_reply, svc, lm, s, t0)
        return PartsResponse(parts, media_type=NPZ_MEDIA_TYPE, headers=_headers(metrics, s))
    # The cost and one PNG per task, encoded in parallel (zlib releases the GIL).
    side = partial(io, side_by_side=True)
    jobs = [side(lm.cost, s.entry.architecture, s.hw, s.subset)]
    jobs += [side(encode_task, specs[t].kind, s.out.arrays[t], specs[t].classes) for t in names]
    cost, *pngs = await asyncio.gather(*jobs)
    svc.metrics.flops.inc(cost.flops)
    metrics = _metrics(lm, s, cost, t0)
    body = Prediction(outputs=dict(zip(names, pngs)), metrics=metrics).model_dump()
    # Serialized on an I/O thread, ASCII-only: the base64 PNGs are ~0.4 MB at 288x384, and
    # JSONResponse's ensure_ascii=False encoder takes 3-4x longer, on the event loop.
    payload = await io(prediction_json, body["outputs"], body["metrics"])
    return Response(payload, media_type="application/json", headers=_headers(metrics, s))


def json_bytes(content: Any) -> bytes:
    """``content`` as compact JSON (what JSONResponse sends; non-ASCII text as escapes)."""
    return json.dumps(content, allow_nan=False, separators=(",", ":")).encode("ascii")


def prediction_json(outputs: dict[str, dict[str, Any]], metrics: dict[str, Any]) -> bytes:
    """``json_bytes({"outputs": outputs, "metrics": metrics})``, byte for byte, faster.

    Each task's base64 ``png`` is spliced in after the encoder has run on the rest: base64 needs
    no escaping, and the encoder's scan of the ~0.4 MB of it took 0.8 ms at 288x384.
    """
    token = secrets.token_hex(8)  # stands in for a PNG; no other string of the reply has it
    blobs: list[str] = []
    shallow: dict[str, dict[str, Any]] = {}
    for task, record in outputs.items():
        png = record.get("png")
        if isinstance(png, str) and png.isascii():
            shallow[task] = {**record, "png": f"{token}{len(blobs)}"}
            blobs.append(png)
        else:
            shallow[task] = record
    rest = json_bytes({"outputs": shallow, "metrics": metrics})
    pieces: list[bytes] = []
    for i, png in enumerate(blobs):  # json.dumps keeps the dicts' order: markers come in turn
        before, _, rest = rest.partition(f'"{token}{i}"'.encode())
        pieces += [before, b'"', png.encode("ascii"), b'"']
    return b"".join([*pieces, rest])


def _npz_reply(
    svc: Service, lm: LoadedModel, s: Served, t0: float
) -> tuple[RequestMetrics, list[Part]]:
    cost = lm.cost(s.entry.architecture, s.hw, s.subset)
    svc.metrics.flops.inc(cost.flops)
    metrics = _metrics(lm, s, cost, t0)
    arrays = {t: s.out.arrays[t] for t in s.subset.names}
    return metrics, encode_npz(arrays, metrics.model_dump())


def _metrics(lm: LoadedModel, s: Served, cost: Cost, t0: float) -> RequestMetrics:
    return RequestMetrics(
        flops=cost.flops,
        gflops=cost.gflops,
        params=cost.params,
        model_ms=round(s.out.model_s * 1e3, 3),
        queue_ms=round(s.queue_s * 1e3, 3),
        total_ms=round((time.perf_counter() - t0) * 1e3, 3),
        batch_size=s.out.batch_size,
        architecture_id=s.entry.architecture.id,
        preference_id=s.entry.preference_id,
        tasks=list(s.subset.names),
        input_size=list(s.hw),
        device=str(lm.device),
        backend=s.out.backend,
        c=s.entry.preference.c,
        requested_c=s.selected.requested.c,
        degraded=s.selected.degraded is not None,
        budget=s.selected.budget,
    )


def _headers(metrics: RequestMetrics, s: Served) -> dict[str, str]:
    headers = metric_headers(metrics)
    headers[CACHE_HEADER] = "miss" if s.computed else "hit"
    headers[DEGRADED_HEADER] = "1" if metrics.degraded else "0"
    return headers


def metric_headers(m: RequestMetrics) -> dict[str, str]:
    h = {
        "Flops": str(m.flops),
        "Params": str(m.params),
        "Model-Time-Ms": f"{m.model_ms:.3f}",
        "Queue-Time-Ms": f"{m.queue_ms:.3f}",
        "Total-Time-Ms": f"{m.total_ms:.3f}",
        "Batch-Size": str(m.batch_size),
        "Architecture-Id": m.architecture_id,
        "Preference-Id": m.preference_id,
        "Tasks": ",".join(m.tasks),
        "Device": m.device,
        "Backend": m.backend,
        "C": f"{m.c:g}",
    }
    out = {HEADER_PREFIX + k: v for k, v in h.items()}
    out["Server-Timing"] = (
        f"model;dur={m.model_ms:.3f}, queue;dur={m.queue_ms:.3f}, total;dur={m.total_ms:.3f}"
    )
    return out
