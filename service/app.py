"""The FastAPI application: preference API, predictions, health, metrics and admin.

``create_app(settings)`` builds one app around a :class:`Service`. Start-up (the lifespan)
schedules the load in the background, so ``/healthz`` answers at once and ``/readyz`` says 503
until the artifact is verified, the default preference is materialized and a warm-up prediction
has run. Nothing blocking runs on the event loop: loading, materialization, image decoding and
encoding run on worker threads and inference on the batcher's threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any

import torch
from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import dymu

from . import errors
from .batching import Batcher
from .errors import (
    AdminDisabledError,
    BadRequestError,
    ForbiddenError,
    NotReadyError,
    PayloadTooLargeError,
    RequestTimeoutError,
    UnauthorizedError,
    UnsupportedMediaTypeError,
)
from .imaging import decode_base64, decode_image, encode_npz, encode_task
from .metrics import CONTENT_TYPE, Metrics
from .routers.oip import router as oip_router
from .runtime import LoadedModel, Output, PreferenceEntry, cost_out
from .schemas import (
    C_DESCRIPTION,
    AdminResult,
    CostMap,
    ErrorBody,
    Health,
    ModelInfo,
    Prediction,
    PredictJSON,
    PreferenceIn,
    PreferenceRecord,
    Readiness,
    RequestMetrics,
    TaskInfo,
)
from .settings import Settings

log = logging.getLogger("dymu.service")

HEADER_PREFIX = "X-Dymu-"
#: "hit" when the request's sub-network came from this process's preference cache, else "miss".
CACHE_HEADER = HEADER_PREFIX + "Cache"
NPZ_MEDIA_TYPE = "application/x-npz"

# The explorer page (docs/explorer.md): static files shipped in the package, served by the app.
STATIC_DIR = Path(__file__).parent / "static"
SAMPLE_IMAGE = Path(__file__).parent / "example.png"
# Everything the page loads comes from this server: the policy makes that a browser-enforced fact.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self';"
        " connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "Cache-Control": "no-cache",
}


# ----------------------------------------------------------------------------------- service
class Service:
    """State of one server: settings, metrics, the loaded model, executors and the batcher."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.current: LoadedModel | None = None
        self.status = "starting"
        self.detail: str | None = "the model has not been loaded yet"
        self.generation = 0
        self.batcher: Batcher | None = None
        self._control: ThreadPoolExecutor | None = None
        self._io: ThreadPoolExecutor | None = None
        self._inference: ThreadPoolExecutor | None = None
        self._load_task: asyncio.Task | None = None
        self._reload_lock: asyncio.Lock | None = None

    @property
    def ready(self) -> bool:
        return self.status == "ready" and self.current is not None

    # -- lifecycle ------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    async def start(self) -> None:
        s = self.settings
        if s.torch_threads:
            torch.set_num_threads(s.torch_threads)
        self._control = ThreadPoolExecutor(2, thread_name_prefix="dymu-control")
        self._io = ThreadPoolExecutor(
            min(8, max(2, os.cpu_count() or 2)), thread_name_prefix="dymu-io"
        )
        self._inference = ThreadPoolExecutor(s.inference_workers, thread_name_prefix="dymu-infer")
        self._reload_lock = asyncio.Lock()
        self.batcher = Batcher(
            self._run_batch,
            self._inference,
            workers=s.inference_workers,
            max_batch=s.max_batch_size,
            max_wait_s=s.max_wait_ms / 1000.0,
            max_queue=s.max_queue,
            retry_after_s=s.retry_after_s,
            metrics=self.metrics,
        )
        self.batcher.start()
        self._load_task = asyncio.get_running_loop().create_task(self._initial_load())

    async def stop(self) -> None:
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._load_task
        if self.batcher is not None:
            await self.batcher.stop()
        if self.current is not None:
            self.current.close()
        for ex in (self._control, self._io, self._inference):
            if ex is not None:
                ex.shutdown(wait=False, cancel_futures=True)
        self.status, self.detail = "stopped", "the server is shutting down"
        self.metrics.ready.set(0)

    async def _initial_load(self) -> None:
        try:
            lm = await self._prepare()
        except Exception as exc:
            log.exception("loading %s failed", self.settings.model_dir)
            self.status, self.detail = "failed", f"loading the model failed: {exc}"
            return
        self._install(lm)

    async def _prepare(self, initial: bool = True) -> LoadedModel:
        """Load and verify the artifact, materialize the default preference, warm up.

        On the initial load the steps show in /readyz; a reload keeps serving meanwhile.
        """

        def step(status: str, detail: str) -> None:
            if initial:
                self.status, self.detail = status, detail

        step("loading", f"loading and verifying {self.settings.model_dir}")
        lm = await self._in(self._control, LoadedModel.load, self.settings, self.metrics)
        step("warming up", "materializing the default preference")
        entry, _ = await self.entry(lm, lm.default_key, lm.default_preference, pin=True)
        if self.settings.warmup:
            step("warming up", "running the warm-up prediction")
            times = await self._in(self._control, lm.warm_up, entry)
            log.info("warm-up: %s", {k: f"{v * 1e3:.1f} ms" for k, v in times.items()})
        return lm

    def _install(self, lm: LoadedModel) -> None:
        old, self.current = self.current, lm
        self.generation += 1
        self.status, self.detail = "ready", None
        self.metrics.ready.set(1)
        self.metrics.model_info.info(
            {
                "name": str(lm.name),
                "version": str(lm.version),
                "artifact_sha256": str(lm.checksum),
                "tasks": ",".join(lm.tasks),
                "device": str(lm.device),
                "backend": lm.backend,
            }
        )
        if old is not None:
            old.close()

    async def _in(self, executor: ThreadPoolExecutor | None, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    def require_ready(self) -> LoadedModel:
        lm = self.current
        if lm is None or self.status not in ("ready",):
            raise NotReadyError(
                f"the model is not ready ({self.status}: {self.detail})",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )
        return lm

    # -- preferences ----------------------------------------------------------------------------
    async def entry(
        self, lm: LoadedModel, key: Any, pref: dymu.Preference, pin: bool = False
    ) -> tuple[PreferenceEntry, bool]:
        async def create() -> PreferenceEntry:
            return await self._in(self._control, lm.build_entry, pref, key)

        return await lm.cache.get_or_create(key, create, pin=pin)

    async def runner(self, lm: LoadedModel, entry: PreferenceEntry, task_idx: tuple[int, ...]):
        runner = entry.runners.get(task_idx)
        if runner is None:
            runner = await self._in(self._control, lm.runner, entry, task_idx)
            lm.cache.enforce(keep=entry.key)
        return runner

    def record(
        self, lm: LoadedModel, entry: PreferenceEntry, cached: bool, t0: float
    ) -> PreferenceRecord:
        full = entry.runners.get(tuple(range(len(lm.tasks))))
        return PreferenceRecord(
            preference_id=entry.preference_id,
            model=str(lm.name),
            model_version=str(lm.version),
            r=list(entry.preference.r),
            r_by_task=dict(zip(lm.tasks, entry.preference.r)),
            c=entry.preference.c,
            architecture=lm.architecture_out(entry.architecture),
            cost=cost_out(entry.cost, lm.anchor_cost, lm.input_size),
            cached=cached,
            compute_ms=round(entry.compute_s * 1e3, 3),
            elapsed_ms=round((time.perf_counter() - t0) * 1e3, 3),
            backends={
                "torch": "ready",
                "onnx": full.onnx_status if full is not None else "disabled",
            },
        )

    # -- inference ------------------------------------------------------------------------------
    def _run_batch(self, payloads: list[tuple[LoadedModel, Any, torch.Tensor]]) -> list[Output]:
        lm = payloads[0][0]
        return lm.run_batch([(runner, x) for _, runner, x in payloads])

    # -- admin ----------------------------------------------------------------------------------
    async def reload(self) -> tuple[LoadedModel, LoadedModel | None]:
        assert self._reload_lock is not None
        async with self._reload_lock:
            previous = self.current
            try:
                lm = await self._prepare(initial=previous is None)
            except Exception as exc:
                if previous is None:
                    self.status, self.detail = "failed", f"loading the model failed: {exc}"
                raise
            self._install(lm)
            return lm, previous


# -------------------------------------------------------------------------------- middleware
class Gate:
    """Outermost ASGI middleware: request metrics per route template and the body limit.

    The body is read here, up to ``max_body_bytes`` (413 beyond, before the rest is read),
    and replayed to the app.
    """

    def __init__(self, app: ASGIApp, service: Service, router_app: FastAPI) -> None:
        self.app = app
        self.service = service
        self.router_app = router_app

    def _endpoint(self, scope: Scope) -> str:
        for route in self.router_app.router.routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return getattr(route, "path", "other")
        return "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        scope.setdefault("state", {})["t0"] = t0
        endpoint = self._endpoint(scope)
        method = scope.get("method", "GET")
        status = 500

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if method in ("POST", "PUT", "PATCH"):
                replay = await self._read_body(scope, receive, send_counted)
                if replay is None:
                    return
                await self.app(scope, replay, send_counted)
            else:
                await self.app(scope, receive, send_counted)
        finally:
            labels = (endpoint, method, str(status))
            self.service.metrics.requests.labels(*labels).inc()
            self.service.metrics.request_seconds.labels(*labels).observe(time.perf_counter() - t0)

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> Receive | None:
        limit = self.service.settings.max_body_bytes
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await _send_error(send, 400, "bad_request", "Content-Length is not an integer")
                return None
            if declared > limit:
                await _send_error(send, *_too_large(declared, limit))
                return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _send_error(send, *_too_large(size, limit))
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay


def _too_large(size: int, limit: int) -> tuple[int, str, str]:
    exc = PayloadTooLargeError(f"the body has at least {size:,} bytes; the limit is {limit:,}")
    return 413, errors.error_code(exc), exc.detail


async def _send_error(send: Send, status: int, code: str, detail: str) -> None:
    body = json.dumps(errors.error_body(status, code, detail)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


# --------------------------------------------------------------------------- predict parsing
MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["image"],
    "properties": {
        "image": {"type": "string", "format": "binary", "description": "PNG or JPEG file"},
        "preference_id": {"type": "string", "description": "from POST /preference"},
        "r": {
            "type": "string",
            "description": "inline r: JSON list or {task: weight} map, or comma-separated",
            "example": "[0.6, 0.3, 0.1]",
        },
        "c": {"type": "number", "description": "inline c in [0, 1] (with r; default 0)"},
        "tasks": {
            "type": "string",
            "description": "comma-separated task subset (default: all)",
            "example": "segmentation,depth",
        },
        "format": {"type": "string", "enum": ["json", "npz"], "default": "json"},
    },
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        404: "unknown preference id (another model version)",
        413: "body or image too large",
        415: "not a PNG or JPEG image / unsupported body type",
        422: "invalid preference, task, id or image",
        503: "not ready, or the queue is full (Retry-After)",
        504: "the prediction ran past the per-request timeout",
    }.items()
}


def parse_r_text(text: str) -> Any:
    text = text.strip()
    if text.startswith(("[", "{")):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadRequestError(f"r is not valid JSON: {exc}") from exc
    try:
        return [float(v) for v in text.split(",")]
    except ValueError as exc:
        raise BadRequestError(
            f"r must be a JSON list/map or comma-separated numbers: {exc}"
        ) from exc


def _str_field(form: Any, name: str) -> str | None:
    value = form.get(name)
    if value is None:
        return None
    if isinstance(value, UploadFile):
        raise BadRequestError(f"form field {name!r} must be a plain field, not a file")
    return value


async def _parse_multipart(request: Request) -> tuple[bytes, PredictJSON]:
    async with request.form(max_files=2, max_fields=32) as form:
        image = form.get("image")
        if image is None:
            raise BadRequestError("the multipart body needs an 'image' file field")
        data = await image.read() if isinstance(image, UploadFile) else image.encode()
        fields: dict[str, Any] = {"image": ""}
        if (pid := _str_field(form, "preference_id")) not in (None, ""):
            fields["preference_id"] = pid
        if (r := _str_field(form, "r")) not in (None, ""):
            fields["r"] = parse_r_text(r)
        if (c := _str_field(form, "c")) not in (None, ""):
            fields["c"] = c
        tasks = [t for v in form.getlist("tasks") if isinstance(v, str) for t in v.split(",")]
        if any(isinstance(v, UploadFile) for v in form.getlist("tasks")):
            raise BadRequestError("form field 'tasks' must be a plain field, not a file")
        if tasks:
            fields["tasks"] = [t.strip() for t in tasks]
        if (fmt := _str_field(form, "format")) not in (None, ""):
            fields["format"] = fmt
    return data, _validated(fields)


def _validated(fields: Any) -> PredictJSON:
    try:
        return PredictJSON.model_validate(fields)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from exc


def _parse_json(raw: bytes) -> tuple[bytes, PredictJSON]:
    """JSON body -> (image bytes, request); runs on a worker thread (bodies can be MBs)."""
    try:
        fields = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequestError(f"the body is not valid JSON: {exc}") from exc
    req = _validated(fields)
    return decode_base64(req.image), req


def _headers(m: RequestMetrics) -> dict[str, str]:
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
    }
    out = {HEADER_PREFIX + k: v for k, v in h.items()}
    out["Server-Timing"] = (
        f"model;dur={m.model_ms:.3f}, queue;dur={m.queue_ms:.3f}, total;dur={m.total_ms:.3f}"
    )
    return out


# ---------------------------------------------------------------------------------------- app
DESCRIPTION = """\
Serve a controllable dynamic multi-task network: post a preference (r, c), get its
tree-structured sub-network, and predict with it. Every prediction reports what it cost.
See docs/service.md.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    svc = Service(settings)
    app = FastAPI(
        title="dymu",
        version=dymu.__version__,
        description=DESCRIPTION,
        lifespan=svc.lifespan,
    )
    app.state.service = svc
    errors.install(app)
    app.add_middleware(Gate, service=svc, router_app=app)
    admin_enabled = settings.admin_token is not None

    # -- health ---------------------------------------------------------------------------------
    def readiness() -> JSONResponse:
        ok = svc.ready
        lm = svc.current
        body = Readiness(
            ready=ok,
            status=svc.status,
            model=None if lm is None else lm.name,
            model_version=None if lm is None else lm.version,
            detail=svc.detail,
        )
        headers = {} if ok else {"Retry-After": str(settings.retry_after_s)}
        return JSONResponse(body.model_dump(), 200 if ok else 503, headers=headers)

    ready_responses = {503: {"model": Readiness, "description": "not ready yet"}}

    @app.get("/healthz", response_model=Health, tags=["health"])
    async def healthz() -> Health:
        """The process is alive (always 200 while it serves)."""
        return Health(status="alive")

    @app.get("/readyz", response_model=Readiness, responses=ready_responses, tags=["health"])
    async def readyz() -> JSONResponse:
        """200 once the model is loaded, verified and warmed up; 503 before (or if it failed)."""
        return readiness()

    @app.get("/v2/health/live", tags=["health"])
    async def v2_live() -> dict[str, bool]:
        """KServe v2 liveness."""
        return {"live": True}

    @app.get("/v2/health/ready", tags=["health"], responses=ready_responses)
    async def v2_ready() -> JSONResponse:
        """KServe v2 readiness (200 + {"ready": true} when ready, else 503)."""
        ok = svc.ready
        return JSONResponse({"ready": ok}, 200 if ok else 503)

    # -- model ----------------------------------------------------------------------------------
    @app.get("/v1/model", response_model=ModelInfo, tags=["model"], responses=ERROR_RESPONSES)
    async def model_info() -> ModelInfo:
        """Tasks, N, L, input size, version, artifact checksum and anchor cost."""
        lm = svc.require_ready()
        model = lm.model
        return ModelInfo(
            name=lm.name,
            version=lm.version,
            path=lm.manifest.get("path"),
            tasks=[
                TaskInfo(name=t.name, kind=t.kind, classes=t.classes) for t in model.config.tasks
            ],
            n_tasks=model.n_tasks,
            n_layers=model.n_layers,
            input_size=list(lm.input_size),
            in_channels=model.config.in_channels,
            artifact_sha256=lm.checksum,
            files=lm.manifest.get("files", {}),
            anchor_cost=cost_out(lm.anchor_cost, lm.anchor_cost, lm.input_size),
            control_params=model.control_params,
            input_normalization={"mean": lm.mean, "std": lm.std, "source": lm.norm_source},
            device=str(lm.device),
            backend=lm.backend,
            default_preference_id=lm.default_id,
            cache={
                "entries": len(lm.cache),
                "bytes": lm.cache.nbytes,
                "max_entries": lm.cache.max_entries,
                "max_bytes": lm.cache.max_bytes,
            },
            batching={
                "max_batch_size": settings.max_batch_size,
                "max_wait_ms": settings.max_wait_ms,
                "max_queue": settings.max_queue,
                "request_timeout_s": settings.request_timeout_s,
            },
        )

    @app.get("/v1/cost-map", response_model=CostMap, tags=["model"], responses=ERROR_RESPONSES)
    async def cost_map(
        c: Annotated[float, Query(description=C_DESCRIPTION)] = 0.0,
        resolution: Annotated[
            int, Query(ge=1, le=100, description="grid step 1/resolution on each axis of r")
        ] = 20,
        tasks: Annotated[
            str | None,
            Query(
                description="comma-separated task subset whose paths are counted (default: all)",
                examples=["segmentation,depth"],
            ),
        ] = None,
    ) -> CostMap:
        """The cost over the simplex for one c (the paper's Figure 5), in one request.

        For every r on the grid {k / resolution} of the simplex: the edge hypernet's arg-max
        tree and its analytic FLOPs and params at the model's input size. No image, no BN
        deltas, nothing materialized or cached; at most 5,151 points.
        """
        lm = svc.require_ready()
        subset = [t.strip() for t in tasks.split(",")] if tasks else None
        return await svc._in(svc._control, lm.cost_map, c, resolution, subset)

    # -- preferences ----------------------------------------------------------------------------
    @app.post(
        "/preference",
        response_model=PreferenceRecord,
        tags=["preference"],
        responses=ERROR_RESPONSES,
    )
    async def create_preference(body: PreferenceIn) -> PreferenceRecord:
        """Compute (or find in the cache) the sub-network of a preference (r, c).

        Returns its id, the normalized (r, c), the tree, its cost at the model's input size,
        whether it came from the cache and how long computing it took.
        """
        t0 = time.perf_counter()
        lm = svc.require_ready()
        pref, key = lm.parse(body.r, body.c)
        entry, computed = await svc.entry(lm, key, pref)
        return svc.record(lm, entry, not computed, t0)

    @app.get(
        "/preference/{preference_id}",
        response_model=PreferenceRecord,
        tags=["preference"],
        responses=ERROR_RESPONSES,
    )
    async def get_preference(preference_id: str) -> PreferenceRecord:
        """The record of a preference id; rebuilt on demand if it is not in the cache."""
        t0 = time.perf_counter()
        lm = svc.require_ready()
        pref, key = lm.decode_id(preference_id)
        entry, computed = await svc.entry(lm, key, pref)
        return svc.record(lm, entry, not computed, t0)

    # -- predict --------------------------------------------------------------------------------
    @app.post(
        "/predict",
        tags=["predict"],
        response_model=Prediction,
        responses={
            200: {
                "description": "JSON with PNG maps, or an .npz of float32 arrays",
                "content": {NPZ_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
            },
            **ERROR_RESPONSES,
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {"schema": MULTIPART_SCHEMA},
                    "application/json": {"schema": PredictJSON.model_json_schema()},
                },
            }
        },
    )
    async def predict(request: Request) -> Response:
        """Predict one image with the sub-network of a preference.

        Send the image as a multipart file (`image`) or as JSON with base64. Pick the
        preference by `preference_id`, inline `r` (and `c`), or nothing (the server default);
        `tasks` restricts the run (and the reported cost) to a subset. `format=json` returns
        PNG-encoded maps, `format=npz` float32 arrays. Metrics come in the body and as
        `X-Dymu-*` headers.
        """
        t0 = request.scope.get("state", {}).get("t0", time.perf_counter())
        lm = svc.require_ready()
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            data, req = await _parse_multipart(request)
        elif ctype in ("application/json", ""):
            data, req = await svc._in(svc._io, _parse_json, await request.body())
        else:
            raise UnsupportedMediaTypeError(
                f"unsupported body type {ctype!r}: send multipart/form-data or application/json"
            )

        pref, key = lm.ids.select(req.preference_id, req.r, req.c)
        task_idx = lm.task_indices(req.tasks)
        names = [lm.tasks[i] for i in task_idx]

        def decode() -> torch.Tensor:
            rgb = decode_image(data, settings.max_pixels)
            return lm.image_tensor(rgb)

        x = await svc._in(svc._io, decode)
        hw = (int(x.shape[-2]), int(x.shape[-1]))
        entry, computed = await svc.entry(lm, key, pref)
        runner = await svc.runner(lm, entry, task_idx)

        assert svc.batcher is not None
        job = svc.batcher.submit((svc.generation, key, task_idx, hw), (lm, runner, x))
        remaining = settings.request_timeout_s - (time.perf_counter() - t0)
        try:
            out: Output = await asyncio.wait_for(asyncio.shield(job.future), max(remaining, 0))
        except TimeoutError:
            job.future.cancel()
            svc.metrics.timeouts.inc()
            raise RequestTimeoutError(
                f"the prediction took longer than {settings.request_timeout_s:g} s"
            ) from None
        queue_s = (job.started or job.enqueued) - job.enqueued

        # The cost and one PNG per task, encoded in parallel (zlib releases the GIL).
        specs = lm.task_specs
        jobs = [svc._in(svc._io, lm.model.cost, entry.architecture, hw, names)]
        if req.format == "json":
            jobs += [
                svc._in(svc._io, encode_task, specs[t].kind, out.arrays[t], specs[t].classes)
                for t in names
            ]
        cost, *pngs = await asyncio.gather(*jobs)
        encoded = dict(zip(names, pngs))
        svc.metrics.flops.inc(cost.flops)
        metrics = RequestMetrics(
            flops=cost.flops,
            gflops=cost.gflops,
            params=cost.params,
            model_ms=round(out.model_s * 1e3, 3),
            queue_ms=round(queue_s * 1e3, 3),
            total_ms=round((time.perf_counter() - t0) * 1e3, 3),
            batch_size=out.batch_size,
            architecture_id=entry.architecture.id,
            preference_id=entry.preference_id,
            tasks=names,
            input_size=list(hw),
            device=str(lm.device),
            backend=out.backend,
        )
        headers = _headers(metrics)
        headers[CACHE_HEADER] = "miss" if computed else "hit"
        if req.format == "npz":
            arrays = {t: out.arrays[t] for t in names}
            payload = await svc._in(svc._io, encode_npz, arrays, metrics.model_dump())
            return Response(payload, media_type=NPZ_MEDIA_TYPE, headers=headers)
        body = Prediction(outputs=encoded, metrics=metrics)
        return JSONResponse(body.model_dump(), headers=headers)

    # -- the explorer page ----------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    @app.get("/explorer", include_in_schema=False)
    async def explorer() -> FileResponse:
        """The preference explorer (docs/explorer.md); it talks to this API only."""
        return FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)

    @app.get("/explorer/example.png", include_in_schema=False)
    async def explorer_sample() -> FileResponse:
        """The bundled sample image (the one the README's curl calls post)."""
        return FileResponse(SAMPLE_IMAGE, media_type="image/png")

    app.mount("/explorer/static", StaticFiles(directory=STATIC_DIR), name="explorer-static")

    # -- metrics --------------------------------------------------------------------------------
    @app.get(
        "/metrics",
        tags=["health"],
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE.split(";")[0]: {}}}},
    )
    async def metrics() -> Response:
        """Prometheus text exposition (all names prefixed dymu_, base units)."""
        lm = svc.current
        if lm is not None:
            svc.metrics.cache_entries.set(len(lm.cache))
            svc.metrics.cache_bytes.set(lm.cache.nbytes)
        if svc.batcher is not None:
            svc.metrics.queue_depth.set(svc.batcher.depth)
        return Response(svc.metrics.render(), media_type=CONTENT_TYPE)

    # -- admin ----------------------------------------------------------------------------------
    def admin(request: Request) -> None:
        token = settings.admin_token
        if token is None:
            raise AdminDisabledError("the admin surface is off: set DYMU_ADMIN_TOKEN to enable it")
        auth = request.headers.get("authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise UnauthorizedError(
                "admin calls need 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
            raise ForbiddenError("wrong admin token")

    admin_responses = {
        code: {"model": ErrorBody} for code in (401, 403, 404, 409, 503)
    }  # fmt: skip

    @app.post(
        "/admin/reload",
        response_model=AdminResult,
        dependencies=[Depends(admin)],
        tags=["admin"],
        include_in_schema=admin_enabled,
        responses=admin_responses,
    )
    async def admin_reload() -> AdminResult:
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

    @app.post(
        "/admin/cache/clear",
        response_model=AdminResult,
        dependencies=[Depends(admin)],
        tags=["admin"],
        include_in_schema=admin_enabled,
        responses=admin_responses,
    )
    async def admin_clear_cache() -> AdminResult:
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

    app.router.routes.extend(oip_router.routes)  # Open Inference Protocol: service/routers/oip.py
    return app
