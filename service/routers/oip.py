"""The Open Inference Protocol (KServe v2 / Triton HTTP) on the dymu app: an ``APIRouter``.

``GET /v2`` (server metadata), ``GET /v2/models/{model}[/versions/{v}]`` (model metadata),
``.../ready`` and ``POST .../infer``. ``{model}`` is the artifact's name and ``{v}`` the served
version. The input ``image`` is UINT8 ``[B, H, W, 3]`` or BYTES ``[B]`` (PNG/JPEG/NPY files); there
is one FP32 output per task, the arrays of /predict's npz reply with a batch axis. The
preference and the task subset travel as request parameters (``preference_id``, or ``r`` as
comma-separated numbers and ``c``; ``tasks`` comma-separated); the reply's parameters carry the
cost, the architecture and the preference id. Binary tensor data (the
``Inference-Header-Content-Length`` extension) is read and written.

The predictions run through the app's own state (:class:`service.state.Service`) and the flow
/predict uses (service/inference.py): the same preference selection, cache, sub-network runners,
batcher, deadline and metrics. The gate admits an infer request before its body is read, as it
does /predict (service/gate.py). Errors
keep the app's status mapping (``service.errors.STATUS``) in the protocol's ``{"error": ...}``
body. docs/service.md, "Open Inference Protocol".
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

import dymu

from .. import errors
from ..errors import BadRequestError, UnknownModelError
from ..imaging import decode_image
from ..inference import Ran, deadline, run_images
from ..oip_codec import (
    IMAGE,
    InferRequest,
    error_body,
    parse_request,
    reply_parts,
    split_body,
)
from ..responses import Part, PartsResponse
from ..routing import LeanRoute
from ..runtime import LoadedModel, TaskSubset
from ..state import Service, service_from, service_of

HEADER_LENGTH = "Inference-Header-Content-Length"
#: The most images one infer request may carry.
MAX_BATCH = 64


def protocol_error(exc: Exception) -> JSONResponse:
    """An error in the protocol's body, ``{"error": "<code>: <reason>"}``, with the status
    (and headers, e.g. Retry-After) of the app's one mapping."""
    if isinstance(exc, RequestValidationError):
        exc = BadRequestError(str(exc.errors()[:3]))
    base = errors.error_response(exc)
    body = json.loads(base.body)
    headers = {k: v for k, v in base.headers.items() if k.lower() == "retry-after"}
    message = f"{body['error']}: {body['detail']}"
    return JSONResponse(error_body(message), base.status_code, headers=headers)


class ProtocolRoute(APIRoute):
    """A route whose errors are answered in the protocol's error body."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                return protocol_error(exc)

        return route


class LeanProtocolRoute(ProtocolRoute, LeanRoute):
    """The infer routes: the protocol's errors, without FastAPI's per-request dependency
    solving (service/routing.py)."""


router = APIRouter(route_class=ProtocolRoute, tags=["open inference protocol"])
Svc = Annotated[Service, Depends(service_of)]


def served(svc: Service, model: str, version: str | None) -> LoadedModel:
    """The loaded model, if ``model`` (and ``version``) name it; 503 before it is loaded."""
    lm = svc.require_ready()
    if model != lm.name:
        raise UnknownModelError(f"unknown model {model!r}; this server serves {lm.name!r}")
    if version is not None and version != lm.version:
        raise UnknownModelError(
            f"model {model!r} has no served version {version!r}; it serves {lm.version!r}"
        )
    return lm


def output_shape(lm: LoadedModel, task: str) -> list[int]:
    spec = lm.task_specs[task]
    if spec.kind == "classification":
        return [-1, spec.out_channels]
    return [-1, spec.out_channels, -1, -1]


# ---------------------------------------------------------------------------------- infer
async def infer_latest(request: Request, model: str) -> Response:
    """Predict a batch of images with the sub-network of a preference (JSON or binary)."""
    return await infer(request, service_from(request), model, None)


async def infer_version(request: Request, model: str, version: str) -> Response:
    """Infer with the served version (404 for any other)."""
    return await infer(request, service_from(request), model, version)


# registered before the metadata routes: routes are matched in order, and these are the hot ones
for _path, _endpoint in (
    ("/v2/models/{model}/infer", infer_latest),
    ("/v2/models/{model}/versions/{version}/infer", infer_version),
):
    router.add_api_route(_path, _endpoint, methods=["POST"], route_class_override=LeanProtocolRoute)


# ------------------------------------------------------------------------------- metadata
@router.get("/v2")
async def server_metadata() -> dict[str, Any]:
    """Server metadata: name, version and the protocol extensions supported."""
    return {"name": "dymu", "version": dymu.__version__, "extensions": ["binary_tensor_data"]}


def model_metadata(svc: Service, model: str, version: str | None = None) -> dict[str, Any]:
    lm = served(svc, model, version)
    return {
        "name": lm.name,
        "versions": [lm.version],
        "platform": f"dymu_{lm.backend}",
        "inputs": [{"name": IMAGE, "datatype": "UINT8", "shape": [-1, -1, -1, 3]}],
        "outputs": [
            {"name": t, "datatype": "FP32", "shape": output_shape(lm, t)} for t in lm.tasks
        ],
        "parameters": {
            "tasks": ",".join(lm.tasks),
            "default_preference_id": lm.default_id,
            "input_size": ",".join(map(str, lm.input_size)),
        },
    }


@router.get("/v2/models/{model}")
async def model_metadata_latest(svc: Svc, model: str) -> dict[str, Any]:
    """Model metadata: the input tensor, one output per task, the tasks and the default id."""
    return model_metadata(svc, model)


@router.get("/v2/models/{model}/versions/{version}")
async def model_metadata_version(svc: Svc, model: str, version: str) -> dict[str, Any]:
    """Model metadata of the served version (404 for any other)."""
    return model_metadata(svc, model, version)


@router.get("/v2/models/{model}/ready")
async def model_ready_latest(svc: Svc, model: str) -> dict[str, Any]:
    """200 once the model is loaded, verified and warmed up; 503 before, 404 another model."""
    lm = served(svc, model, None)
    return {"name": lm.name, "ready": True}


@router.get("/v2/models/{model}/versions/{version}/ready")
async def model_ready_version(svc: Svc, model: str, version: str) -> dict[str, Any]:
    """Readiness of the served version."""
    lm = served(svc, model, version)
    return {"name": lm.name, "ready": True}


async def infer(request: Request, svc: Service, model: str, version: str | None) -> Response:
    lm = served(svc, model, version)
    max_pixels = svc.settings.max_pixels
    async with deadline(request, svc) as t0:
        raw = await request.body()
        header, binary = split_body(raw, request.headers.get(HEADER_LENGTH))
        # one hop to an I/O thread reads the request and its images, one encodes the reply
        # (none for small images: Service.io; encoded images may decode large, so they hop)
        size = len(raw) if raw_pixels_only(header) else None
        req, xs = await svc.io(read_infer, lm, header, binary, max_pixels, data_bytes=size)
        subset, wanted = outputs_of(lm, req)
        pref, key = lm.ids.select(req.preference_id, req.r, req.c)
        ran = await run_images(svc, lm, key, pref, subset, xs)
        hw = (int(xs[0].shape[-2]), int(xs[0].shape[-1]))
        at, rgb_bytes = (subset, hw), len(xs) * hw[0] * hw[1] * 3
        body, json_size = await svc.io(
            reply_of, svc, lm, req, ran, at, wanted, t0, data_bytes=rgb_bytes
        )
    if json_size is None:
        return PartsResponse(body, media_type="application/json")
    return PartsResponse(
        body, media_type="application/octet-stream", headers={HEADER_LENGTH: str(json_size)}
    )


def raw_pixels_only(header: dict[str, Any]) -> bool:
    """Whether every input is raw UINT8 pixels (then the body's size bounds the work)."""
    inputs = header.get("inputs")
    return isinstance(inputs, list) and all(
        isinstance(i, dict) and i.get("datatype") == "UINT8" for i in inputs
    )


def read_infer(
    lm: LoadedModel, header: dict[str, Any], binary: bytes, max_pixels: int
) -> tuple[InferRequest, list[torch.Tensor]]:
    """The parsed request and its images as normalized tensors (on an I/O thread)."""
    req = parse_request(header, binary, max_pixels, MAX_BATCH)
    return req, image_tensors(lm, req, max_pixels)


def reply_of(
    svc: Service,
    lm: LoadedModel,
    req: InferRequest,
    ran: Ran,
    at: tuple[TaskSubset, tuple[int, int]],
    wanted: list[str],
    t0: float,
) -> tuple[list[Part], int | None]:
    """The reply's body as buffers (and the JSON header's length when binary): cost,
    parameters, outputs; ``at``: the task subset that ran and the input size."""
    subset, hw = at
    arrays0 = ran.outs[0].arrays
    n = len(ran.outs)
    cost = lm.cost(ran.entry.architecture, hw, subset)
    svc.metrics.flops.inc(cost.flops * n)
    reply = {
        "model_name": lm.name,
        "model_version": lm.version,
        **({"id": req.request_id} if req.request_id is not None else {}),
        "parameters": {
            "flops": cost.flops,
            "params": cost.params,
            "architecture_id": ran.entry.architecture.id,
            "preference_id": ran.entry.preference_id,
            "tasks": ",".join(subset.names),
            "images": n,
            "model_ms": round(max(o.model_s for o in ran.outs) * 1e3, 3),
            "batch_size": max(o.batch_size for o in ran.outs),
            "total_ms": round((time.perf_counter() - t0) * 1e3, 3),
            "cache": "miss" if ran.computed else "hit",
            "backend": ran.outs[0].backend,
        },
    }
    # one image: its arrays with a batch axis added (views, not copies)
    arrays = {
        t: arrays0[t][None] if n == 1 else np.stack([o.arrays[t] for o in ran.outs]) for t in wanted
    }
    binary_out = {t: req.binary.get(t, req.binary_default) for t in wanted}
    return reply_parts(reply, arrays, binary_out)


def outputs_of(lm: LoadedModel, req: InferRequest) -> tuple[TaskSubset, list[str]]:
    """(the task subset that runs, the outputs returned): ``tasks`` picks the subset; requested
    outputs must be among them (without ``tasks``, they are the subset)."""
    tasks = req.tasks
    if req.outputs is not None:
        unknown = [o for o in req.outputs if o not in lm.tasks]
        if unknown:
            raise BadRequestError(f"unknown outputs {unknown}; the outputs are {list(lm.tasks)}")
        if tasks is not None and not set(req.outputs) <= set(tasks):
            raise BadRequestError(f"outputs {req.outputs} are not all in tasks {tasks}")
    subset = lm.subset(tasks or req.outputs)
    wanted = [t for t in subset.names if req.outputs is None or t in req.outputs]
    return subset, wanted


def image_tensors(lm: LoadedModel, req: InferRequest, max_pixels: int) -> list[torch.Tensor]:
    """Normalized (3, H, W) tensors; every image of a request has the same size."""
    rgbs = req.images if req.images is not None else [
        decode_image(data, max_pixels) for data in req.encoded or []
    ]  # fmt: skip
    sizes = {rgb.shape[:2] for rgb in rgbs}
    if len(sizes) > 1:
        raise BadRequestError(
            f"the images of one request must have one size (the outputs are one tensor per"
            f" task); got {sorted(sizes)}"
        )
    return [lm.image_tensor(rgb) for rgb in rgbs]
