"""A typed Python client of the dymu service over httpx, sync and async.

    from service.client import DymuClient

    with DymuClient("http://127.0.0.1:8000") as client:
        client.wait_ready()
        pref = client.create_preference([0.6, 0.3, 0.1], c=0.5)
        result = client.predict("image.png", preference_id=pref.preference_id)
        result.outputs["depth"]      # (H, W) float32, decoded from the 16-bit PNG
        result.metrics.gflops         # what this prediction ran

``AsyncDymuClient`` has the same methods as coroutines. Errors raise :class:`DymuAPIError`
with the server's status, error code, reason and Retry-After.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from .encoders import read_npz
from .schemas import (
    ALLOW_DEGRADE_HEADER,
    NPZ_MEDIA_TYPE,
    AdminResult,
    CostMap,
    ModelInfo,
    PreferenceRecord,
    Readiness,
    RequestMetrics,
)

ImageInput = bytes | str | os.PathLike | np.ndarray | Any  # Any: a PIL image
Weights = Sequence[float] | Mapping[str, float]


class DymuAPIError(Exception):
    """A non-2xx answer: ``status``, ``error`` (code), ``detail`` (reason), ``retry_after``."""

    def __init__(self, response: httpx.Response) -> None:
        self.status = response.status_code
        self.headers = dict(response.headers)
        try:
            body = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
            body = {}
        if not isinstance(body, dict):
            body = {}
        self.error = str(body.get("error", "http_error"))
        self.detail = str(body.get("detail", response.text[:500]))
        ra = response.headers.get("retry-after")
        self.retry_after = float(ra) if ra and ra.replace(".", "", 1).isdigit() else None
        super().__init__(f"{self.status} {self.error}: {self.detail}")


@dataclass
class PredictResult:
    """Decoded outputs per task and the request's metrics.

    ``format="json"``: segmentation (H, W) class indices, depth (H, W) float32 (from the
    16-bit PNG and its scale), normals (H, W, 3) float32 in [-1, 1], classification
    probabilities (K,). ``format="npz"``: the raw float32 outputs, (C, H, W) or (K,).
    """

    outputs: dict[str, np.ndarray]
    metrics: RequestMetrics
    headers: dict[str, str]
    format: str
    encoded: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------ encoding
def image_bytes(image: ImageInput, image_format: str = "png") -> bytes:
    """The bytes to send for an image: bytes and files as they are; a uint8 array (H, W, 3) or
    (H, W), or a PIL image, encoded as ``image_format``: ``"png"`` (small on the wire) or
    ``"npy"`` (raw pixels: no encoding here and no decoding in the server, 3 bytes a pixel)."""
    if image_format not in ("png", "npy"):
        raise ValueError(f"image_format must be 'png' or 'npy', not {image_format!r}")
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            return f.read()
    from PIL import Image

    if isinstance(image, Image.Image) and image_format == "npy":
        image = np.asarray(image.convert("RGB") if image.mode not in ("L", "RGB") else image)
    if isinstance(image, np.ndarray) and image_format == "npy":
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(image), allow_pickle=False)
        return buf.getvalue()
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.ascontiguousarray(image))
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    raise TypeError(f"cannot send {type(image).__name__} as an image")


def decode_png(text: str) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(text))) as img:
        return np.asarray(img)


def decode_outputs(encoded: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """JSON outputs (PNG-encoded maps) -> arrays."""
    out: dict[str, np.ndarray] = {}
    for task, rec in encoded.items():
        kind = rec.get("kind")
        if kind == "segmentation":
            out[task] = decode_png(rec["png"]).astype(np.int64)
        elif kind == "depth":
            q = decode_png(rec["png"]).astype(np.float64)
            out[task] = (rec["offset"] + q * rec["scale"]).astype(np.float32)
        elif kind == "normals":
            out[task] = (decode_png(rec["png"]).astype(np.float32) / 255.0) * 2.0 - 1.0
        else:
            out[task] = np.asarray(rec.get("probabilities", []), dtype=np.float32)
    return out


def _predict_request(
    image: ImageInput,
    preference_id: str | None,
    r: Weights | None,
    c: float | None,
    tasks: Sequence[str] | None,
    format: str,
    transport: str,
    budget: Mapping[str, float] | None = None,
    allow_degrade: bool = False,
) -> dict[str, Any]:
    data = image_bytes(image)
    if transport == "json":
        body: dict[str, Any] = {"image": base64.b64encode(data).decode("ascii"), "format": format}
        if budget is not None:
            body["budget"] = dict(budget)
        if allow_degrade:
            body["allow_degrade"] = True
        if preference_id is not None:
            body["preference_id"] = preference_id
        if r is not None:
            body["r"] = dict(r) if isinstance(r, Mapping) else list(r)
        if c is not None:
            body["c"] = c
        if tasks is not None:
            body["tasks"] = list(tasks)
        return {"json": body, "headers": _degrade_headers(allow_degrade)}
    if transport != "multipart":
        raise ValueError("transport must be 'multipart' or 'json'")
    fields: dict[str, str] = {"format": format}
    if preference_id is not None:
        fields["preference_id"] = preference_id
    if r is not None:
        fields["r"] = json.dumps(dict(r) if isinstance(r, Mapping) else list(r))
    if c is not None:
        fields["c"] = repr(float(c))
    if tasks is not None:
        fields["tasks"] = ",".join(tasks)
    if budget is not None:
        fields["budget"] = json.dumps(dict(budget))
    if allow_degrade:
        fields["allow_degrade"] = "true"
    files = {"image": ("image", data, "application/octet-stream")}
    return {"files": files, "data": fields, "headers": _degrade_headers(allow_degrade)}


def _degrade_headers(allow_degrade: bool) -> dict[str, str]:
    """The header that lets even a full server admit the request to run degraded (the gate
    reads it before the body)."""
    return {ALLOW_DEGRADE_HEADER: "1"} if allow_degrade else {}


def _preference_body(
    r: Weights, c: float | None, budget: Mapping[str, float] | None, tasks: Sequence[str] | None
) -> dict[str, Any]:
    body: dict[str, Any] = {"r": dict(r) if isinstance(r, Mapping) else list(r)}
    if c is not None:
        body["c"] = c
    if budget is not None:
        body["budget"] = dict(budget)
    if tasks is not None:
        body["tasks"] = list(tasks)
    return body


def _check(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        raise DymuAPIError(response)
    return response


#: A declared Content-Length is trusted this far ahead of the bytes; a reply past it grows.
PREALLOCATE_MAX = 1 << 28


def _is_npz(response: httpx.Response) -> bool:
    return response.headers.get("content-type", "").startswith(NPZ_MEDIA_TYPE)


def _npz_buffer(response: httpx.Response) -> bytearray | None:
    """Room for an npz reply's bytes, gathered as they arrive (None: read the reply whole).
    httpx's ``read()`` joins its chunks into ``bytes``, arrays viewing ``bytes`` are read-only,
    and ``numpy.load`` copies twice more: one writable buffer that the arrays view instead
    saves ~2 ms on a 288x384 reply of 4.4 MB (docs/service.md, "The client")."""
    if response.status_code >= 400 or not _is_npz(response):
        return None
    length = response.headers.get("content-length", "")
    return bytearray(min(int(length), PREALLOCATE_MAX) if length.isdigit() else 0)


def _gather(buffer: bytearray, got: int, chunk: bytes) -> int:
    # in place within the declared length (a memcpy); past it (no or a wrong length) it grows
    buffer[got : got + len(chunk)] = chunk
    return got + len(chunk)


def _predict_result(
    response: httpx.Response, decode: bool = True, body: bytearray | None = None
) -> PredictResult:
    _check(response)
    headers = dict(response.headers)
    if _is_npz(response):
        outputs = read_npz(response.content if body is None else body)
        metrics = RequestMetrics.model_validate_json(str(outputs.pop("_metrics")))
        return PredictResult(outputs, metrics, headers, "npz")
    body_json = response.json()
    return PredictResult(
        decode_outputs(body_json["outputs"]) if decode else {},
        RequestMetrics.model_validate(body_json["metrics"]),
        headers,
        "json",
        body_json["outputs"],
    )


def _cost_map_params(c: float, resolution: int, tasks: Sequence[str] | None) -> dict[str, Any]:
    params: dict[str, Any] = {"c": c, "resolution": resolution}
    if tasks is not None:
        params["tasks"] = ",".join(tasks)
    return params


def _readiness(response: httpx.Response) -> Readiness:
    if response.status_code not in (200, 503):
        raise DymuAPIError(response)
    return Readiness.model_validate(response.json())


def _admin_headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -------------------------------------------------------------------------------- clients
class DymuClient:
    """Synchronous client. ``DymuClient(base_url)`` or ``DymuClient(client=httpx.Client(...))``."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        timeout: float = 60.0,
        client: httpx.Client | None = None,
    ) -> None:
        self._http = client or httpx.Client(base_url=base_url, timeout=timeout)

    def __enter__(self) -> DymuClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    @property
    def http(self) -> httpx.Client:
        return self._http

    def health(self) -> bool:
        return self._http.get("/healthz").status_code == 200

    def ready(self) -> Readiness:
        return _readiness(self._http.get("/readyz"))

    def wait_ready(self, timeout: float = 60.0, interval: float = 0.05) -> Readiness:
        """Poll /readyz until ready; raises TimeoutError (or DymuAPIError) otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                state = self.ready()
                if state.ready:
                    return state
                if state.status == "failed":
                    raise RuntimeError(f"the server failed to load its model: {state.detail}")
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server was not ready within {timeout} s")
            time.sleep(interval)

    def model(self) -> ModelInfo:
        return ModelInfo.model_validate(_check(self._http.get("/v1/model")).json())

    def create_preference(
        self,
        r: Weights,
        c: float | None = None,
        *,
        budget: Mapping[str, float] | None = None,
        tasks: Sequence[str] | None = None,
    ) -> PreferenceRecord:
        """POST /preference: ``(r, c)`` (c defaults to 0 on the server), or ``r`` under a
        ``budget`` (``{"max_gflops": x}`` or ``{"max_fraction": f}``) for ``tasks``."""
        body = _preference_body(r, c, budget, tasks)
        return PreferenceRecord.model_validate(
            _check(self._http.post("/preference", json=body)).json()
        )

    def get_preference(self, preference_id: str) -> PreferenceRecord:
        return PreferenceRecord.model_validate(
            _check(self._http.get(f"/preference/{preference_id}")).json()
        )

    def cost_map(
        self, c: float = 0.0, resolution: int = 20, tasks: Sequence[str] | None = None
    ) -> CostMap:
        """The cost of the arg-max tree over a grid on the simplex (GET /v1/cost-map)."""
        params = _cost_map_params(c, resolution, tasks)
        return CostMap.model_validate(_check(self._http.get("/v1/cost-map", params=params)).json())

    def predict(
        self,
        image: ImageInput,
        *,
        preference_id: str | None = None,
        r: Weights | None = None,
        c: float | None = None,
        tasks: Sequence[str] | None = None,
        format: str = "json",
        transport: str = "multipart",
        decode: bool = True,
        budget: Mapping[str, float] | None = None,
        allow_degrade: bool = False,
        image_format: str = "png",
    ) -> PredictResult:
        """Predict one image. ``decode=False`` leaves JSON outputs encoded (``.encoded``);
        ``image_format="npy"`` sends an array's raw pixels (:func:`image_bytes`)."""
        data = image_bytes(image, image_format)
        kwargs = _predict_request(
            data, preference_id, r, c, tasks, format, transport, budget, allow_degrade
        )
        with self._http.stream("POST", "/predict", **kwargs) as response:
            body = _npz_buffer(response)
            if body is None:
                response.read()
            else:
                got = 0
                for chunk in response.iter_bytes():
                    got = _gather(body, got, chunk)
                del body[got:]
        return _predict_result(response, decode, body)

    def metrics(self) -> str:
        return _check(self._http.get("/metrics")).text

    def reload(self, token: str) -> AdminResult:
        response = self._http.post("/admin/reload", headers=_admin_headers(token))
        return AdminResult.model_validate(_check(response).json())

    def clear_cache(self, token: str) -> AdminResult:
        response = self._http.post("/admin/cache/clear", headers=_admin_headers(token))
        return AdminResult.model_validate(_check(response).json())


class AsyncDymuClient:
    """Asynchronous client with the same methods as :class:`DymuClient`, as coroutines."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        timeout: float = 60.0,
        client: httpx.AsyncClient | None = None,
        max_connections: int = 100,
    ) -> None:
        limits = httpx.Limits(max_connections=max_connections)
        self._http = client or httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits)

    async def __aenter__(self) -> AsyncDymuClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    @property
    def http(self) -> httpx.AsyncClient:
        return self._http

    async def health(self) -> bool:
        return (await self._http.get("/healthz")).status_code == 200

    async def ready(self) -> Readiness:
        return _readiness(await self._http.get("/readyz"))

    async def wait_ready(self, timeout: float = 60.0, interval: float = 0.05) -> Readiness:
        deadline = time.monotonic() + timeout
        while True:
            try:
                state = await self.ready()
                if state.ready:
                    return state
                if state.status == "failed":
                    raise RuntimeError(f"the server failed to load its model: {state.detail}")
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server was not ready within {timeout} s")
            await asyncio.sleep(interval)

    async def model(self) -> ModelInfo:
        return ModelInfo.model_validate(_check(await self._http.get("/v1/model")).json())

    async def create_preference(
        self,
        r: Weights,
        c: float | None = None,
        *,
        budget: Mapping[str, float] | None = None,
        tasks: Sequence[str] | None = None,
    ) -> PreferenceRecord:
        """POST /preference: ``(r, c)`` (c defaults to 0 on the server), or ``r`` under a
        ``budget`` (``{"max_gflops": x}`` or ``{"max_fraction": f}``) for ``tasks``."""
        body = _preference_body(r, c, budget, tasks)
        response = await self._http.post("/preference", json=body)
        return PreferenceRecord.model_validate(_check(response).json())

    async def get_preference(self, preference_id: str) -> PreferenceRecord:
        response = await self._http.get(f"/preference/{preference_id}")
        return PreferenceRecord.model_validate(_check(response).json())

    async def cost_map(
        self, c: float = 0.0, resolution: int = 20, tasks: Sequence[str] | None = None
    ) -> CostMap:
        params = _cost_map_params(c, resolution, tasks)
        response = await self._http.get("/v1/cost-map", params=params)
        return CostMap.model_validate(_check(response).json())

    async def predict(
        self,
        image: ImageInput,
        *,
        preference_id: str | None = None,
        r: Weights | None = None,
        c: float | None = None,
        tasks: Sequence[str] | None = None,
        format: str = "json",
        transport: str = "multipart",
        decode: bool = True,
        budget: Mapping[str, float] | None = None,
        allow_degrade: bool = False,
        image_format: str = "png",
    ) -> PredictResult:
        data = image_bytes(image, image_format)
        kwargs = _predict_request(
            data, preference_id, r, c, tasks, format, transport, budget, allow_degrade
        )
        async with self._http.stream("POST", "/predict", **kwargs) as response:
            body = _npz_buffer(response)
            if body is None:
                await response.aread()
            else:
                got = 0
                async for chunk in response.aiter_bytes():
                    got = _gather(body, got, chunk)
                del body[got:]
        return _predict_result(response, decode, body)

    async def metrics(self) -> str:
        return _check(await self._http.get("/metrics")).text

    async def reload(self, token: str) -> AdminResult:
        response = await self._http.post("/admin/reload", headers=_admin_headers(token))
        return AdminResult.model_validate(_check(response).json())

    async def clear_cache(self, token: str) -> AdminResult:
        response = await self._http.post("/admin/cache/clear", headers=_admin_headers(token))
        return AdminResult.model_validate(_check(response).json())
