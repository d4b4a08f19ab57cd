"""Open Inference Protocol (KServe v2) messages: parsing an infer request, encoding a reply.

Pure functions over bytes and numpy arrays (no app, no model), used by
:mod:`service.routers.oip`. Tensors come as JSON ``data`` (flat or nested, row-major) or, with
the binary tensor data extension, as raw bytes after a JSON header whose length is the
``Inference-Header-Content-Length`` header (each binary input says its size in
``parameters.binary_data_size``). Every malformed message raises :class:`BadRequestError`
(422) with the reason; the router maps errors to statuses through ``service.errors.STATUS``.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import BadRequestError, PayloadTooLargeError
from .parsing import loads

#: Input name of the image tensor.
IMAGE = "image"
#: Request parameters of dymu (the preference and the task subset) ...
PREFERENCE_PARAMETERS = ("preference_id", "r", "c", "tasks")
#: ... and those of the protocol and its clients, accepted and not used.
PROTOCOL_PARAMETERS = (
    "binary_data_output",
    "sequence_id",
    "sequence_start",
    "sequence_end",
    "priority",
    "timeout",
    "headers",
)
BINARY_SIZE = "binary_data_size"
#: The infer routes (with or without a version).
INFER_PATH = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/infer$")
DTYPES = {"UINT8": np.uint8, "FP32": np.float32, "BYTES": np.object_}


@dataclass
class InferRequest:
    """A parsed infer request: the images, the preference fields and the requested outputs."""

    images: list[np.ndarray] | None  # UINT8 (H, W, 3) each ...
    encoded: list[bytes] | None  # ... or BYTES: encoded PNG/JPEG/NPY files
    request_id: str | None
    preference_id: str | None = None
    r: list[float] | None = None
    c: float | str | None = None
    tasks: list[str] | None = None
    outputs: list[str] | None = None  # requested names (None: every task that ran)
    binary: dict[str, bool] = field(default_factory=dict)  # per requested output
    binary_default: bool = False


# ------------------------------------------------------------------------------------ request
def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """(the JSON header, the binary tensor data after it)."""
    size = len(body)
    if header_length is not None:
        try:
            size = int(header_length)
        except ValueError:
            raise BadRequestError(
                f"Inference-Header-Content-Length is not an integer: {header_length!r}"
            ) from None
        if not 0 < size <= len(body):
            raise BadRequestError(
                f"Inference-Header-Content-Length is {size}; the body has {len(body)} bytes"
            )
    header = loads(body[:size])  # strict, as every JSON body of the service
    if not isinstance(header, dict):
        raise BadRequestError("the inference request must be a JSON object")
    return header, body[size:]


def parse_request(
    header: dict[str, Any], binary: bytes, max_pixels: int, max_batch: int
) -> InferRequest:
    """Validate an infer request and read its image tensor."""
    unknown = set(header) - {"id", "parameters", "inputs", "outputs"}
    if unknown:
        raise BadRequestError(f"unknown fields in the inference request: {sorted(unknown)}")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequestError("id must be a string")
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequestError("inputs must be a non-empty list of tensors")
    names = [t.get("name") if isinstance(t, dict) else None for t in inputs]
    if names != [IMAGE]:
        raise BadRequestError(f"the model takes one input, {IMAGE!r}; got {names}")
    tensor = inputs[0]
    images, encoded = read_image_tensor(tensor, binary, max_pixels, max_batch)
    req = InferRequest(images=images, encoded=encoded, request_id=request_id)
    read_parameters(req, header.get("parameters"))
    read_outputs(req, header.get("outputs"))
    return req


def _shape(tensor: dict[str, Any]) -> list[int]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in shape
    ):
        raise BadRequestError(f"{IMAGE}: shape must be a list of integers, got {shape!r}")
    if any(d <= 0 for d in shape):
        raise BadRequestError(f"{IMAGE}: every dimension must be positive, got {shape}")
    return shape


def read_image_tensor(
    tensor: dict[str, Any], binary: bytes, max_pixels: int, max_batch: int
) -> tuple[list[np.ndarray] | None, list[bytes] | None]:
    """UINT8 [B, H, W, 3] -> B arrays; BYTES [B] -> B encoded files."""
    unknown = set(tensor) - {"name", "shape", "datatype", "parameters", "data"}
    if unknown:
        raise BadRequestError(f"{IMAGE}: unknown tensor fields {sorted(unknown)}")
    datatype = tensor.get("datatype")
    shape = _shape(tensor)
    if datatype == "UINT8":
        if len(shape) != 4 or shape[3] != 3:
            raise BadRequestError(f"{IMAGE}: UINT8 images have shape [B, H, W, 3], got {shape}")
        if shape[1] * shape[2] > max_pixels:
            raise PayloadTooLargeError(
                f"{IMAGE}: {shape[2]}x{shape[1]} = {shape[1] * shape[2]:,} pixels per image;"
                f" the limit is {max_pixels:,}"
            )
    elif datatype == "BYTES":
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise BadRequestError(f"{IMAGE}: BYTES images have shape [B] or [B, 1], got {shape}")
    else:
        raise BadRequestError(
            f"{IMAGE}: datatype must be UINT8 (pixels) or BYTES (PNG/JPEG/NPY files), "
            f"got {datatype!r}"
        )
    if shape[0] > max_batch:
        raise BadRequestError(f"{IMAGE}: a batch of {shape[0]} images; the limit is {max_batch}")
    raw = _tensor_bytes(tensor, binary)
    if raw is None and binary:
        raise BadRequestError(
            f"{len(binary)} bytes follow the JSON header but no input has {BINARY_SIZE}"
        )
    if datatype == "UINT8":
        arr = _uint8(tensor, raw, shape)
        return [np.ascontiguousarray(a) for a in arr], None
    files = _bytes_elements(tensor, raw)
    if len(files) != shape[0]:
        raise BadRequestError(f"{IMAGE}: shape {shape} needs {shape[0]} files, got {len(files)}")
    return None, files


def _tensor_bytes(tensor: dict[str, Any], binary: bytes) -> bytes | None:
    """The tensor's binary data (None when it comes as JSON ``data``)."""
    params = tensor.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequestError(f"{IMAGE}: parameters must be an object")
    size = params.get(BINARY_SIZE)
    if size is None:
        if "data" not in tensor:
            raise BadRequestError(f"{IMAGE}: no data, and no {BINARY_SIZE} parameter")
        return None
    if "data" in tensor:
        raise BadRequestError(f"{IMAGE}: give either data or {BINARY_SIZE}, not both")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise BadRequestError(f"{IMAGE}: {BINARY_SIZE} must be a non-negative integer")
    if size != len(binary):
        raise BadRequestError(
            f"{IMAGE}: {BINARY_SIZE} is {size} but {len(binary)} bytes follow the JSON header"
        )
    return binary


def _uint8(tensor: dict[str, Any], raw: bytes | None, shape: list[int]) -> np.ndarray:
    count = int(np.prod(shape))
    if raw is not None:
        if len(raw) != count:
            raise BadRequestError(
                f"{IMAGE}: shape {shape} needs {count:,} bytes of UINT8 data, got {len(raw):,}"
            )
        return np.frombuffer(raw, dtype=np.uint8).reshape(shape)
    try:
        values = np.asarray(tensor["data"])
    except ValueError as exc:  # ragged nested lists
        raise BadRequestError(f"{IMAGE}: data is not a rectangular array: {exc}") from None
    if values.size != count:
        raise BadRequestError(f"{IMAGE}: shape {shape} needs {count:,} values, got {values.size:,}")
    if values.dtype.kind not in "iu" or values.min() < 0 or values.max() > 255:
        raise BadRequestError(f"{IMAGE}: UINT8 data must be integers in [0, 255]")
    return values.astype(np.uint8).reshape(shape)


def _bytes_elements(tensor: dict[str, Any], raw: bytes | None) -> list[bytes]:
    """BYTES elements: length-prefixed (4-byte little-endian) binary, or base64 JSON strings."""
    if raw is None:
        data = tensor["data"]
        flat = data if isinstance(data, list) else [data]
        flat = [v[0] if isinstance(v, list) and len(v) == 1 else v for v in flat]
        if not all(isinstance(v, str) for v in flat):
            raise BadRequestError(f"{IMAGE}: BYTES data in JSON must be base64 strings")
        try:
            return [base64.b64decode(v, validate=True) for v in flat]
        except (binascii.Error, ValueError) as exc:
            raise BadRequestError(f"{IMAGE}: BYTES data is not valid base64: {exc}") from None
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise BadRequestError(f"{IMAGE}: truncated BYTES element length at byte {pos}")
        (n,) = struct.unpack_from("<I", raw, pos)
        if pos + 4 + n > len(raw):
            raise BadRequestError(f"{IMAGE}: a BYTES element of {n} bytes runs past the data")
        out.append(raw[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return out


def read_parameters(req: InferRequest, params: Any) -> None:
    """preference_id | r (comma-separated) [+ c], and tasks (comma-separated)."""
    if params is None:
        return
    if not isinstance(params, dict):
        raise BadRequestError("parameters must be an object")
    unknown = set(params) - set(PREFERENCE_PARAMETERS) - set(PROTOCOL_PARAMETERS)
    if unknown:
        raise BadRequestError(
            f"unknown parameters {sorted(unknown)}; dymu reads {list(PREFERENCE_PARAMETERS)}"
        )
    req.binary_default = params.get("binary_data_output") is True
    if (pid := params.get("preference_id")) is not None:
        req.preference_id = _string(pid, "preference_id")
    if (r := params.get("r")) is not None:
        req.r = _numbers(r)
    if (c := params.get("c")) is not None:
        if isinstance(c, bool) or not isinstance(c, (int, float, str)):
            raise BadRequestError(f"parameter c must be a number, got {c!r}")
        req.c = c
    if (tasks := params.get("tasks")) is not None:
        req.tasks = _names(_string(tasks, "tasks"), "tasks")


def _string(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadRequestError(f"parameter {name} must be a non-empty string, got {value!r}")
    return value.strip()


def _names(text: str, name: str) -> list[str]:
    names = [t.strip() for t in text.split(",")]
    if any(not t for t in names):
        raise BadRequestError(f"parameter {name} has an empty name: {text!r}")
    return names


def _numbers(r: Any) -> list[float]:
    """r: comma-separated numbers (OIP parameters are scalars), or one number."""
    if isinstance(r, (int, float)) and not isinstance(r, bool):
        return [float(r)]
    try:
        return [float(v) for v in _string(r, "r").split(",")]
    except ValueError:
        raise BadRequestError(
            f"parameter r must be comma-separated numbers (one per task), got {r!r}"
        ) from None


def read_outputs(req: InferRequest, outputs: Any) -> None:
    if outputs is None:
        return
    if not isinstance(outputs, list) or not all(
        isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs
    ):
        raise BadRequestError("outputs must be a list of {name, parameters} objects")
    req.outputs = [o["name"] for o in outputs]
    if len(set(req.outputs)) != len(req.outputs):
        raise BadRequestError(f"an output is requested twice: {req.outputs}")
    for o in outputs:
        params = o.get("parameters") or {}
        if not isinstance(params, dict):
            raise BadRequestError(f"output {o['name']}: parameters must be an object")
        req.binary[o["name"]] = params.get("binary_data", req.binary_default) is True


def preference_fields(
    body: bytes, header_length: str | None
) -> tuple[str | None, list[float] | None, float | str | None]:
    """(preference_id, r, c) of an infer request, read as the app reads them; the tensors are
    not read (the Ray ingress routes by preference with this: service/ray_app.py)."""
    header, _ = split_body(body, header_length)
    req = InferRequest(images=None, encoded=None, request_id=None)
    read_parameters(req, header.get("parameters"))
    return req.preference_id, req.r, req.c


# -------------------------------------------------------------------------------------- reply
def reply_parts(
    header: dict[str, Any], outputs: dict[str, np.ndarray], binary: dict[str, bool]
) -> tuple[list[bytes | memoryview], int | None]:
    """The reply body as buffers (``b"".join`` them for the bytes) and, when some output is
    binary, the JSON header's length: the JSON header, then each binary tensor's own memory
    (service/responses.py sends them without a copy)."""
    tensors: list[dict[str, Any]] = []
    chunks: list[memoryview] = []
    for name, arr in outputs.items():
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        tensor: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": list(arr.shape)}
        if binary.get(name):
            # the array's own bytes, not copied
            data = memoryview(arr.astype("<f4", copy=False).reshape(-1).view(np.uint8))
            tensor["parameters"] = {BINARY_SIZE: data.nbytes}
            chunks.append(data)
        else:
            tensor["data"] = arr.reshape(-1).tolist()
        tensors.append(tensor)
    text = json.dumps({**header, "outputs": tensors}, separators=(",", ":")).encode()
    if not chunks:
        return [text], None
    return [text, *chunks], len(text)


def error_body(message: str) -> dict[str, str]:
    """The protocol's error body."""
    return {"error": message}
