"""Reading requests, written once for the server (service/gate.py, the routers) and the Ray
ingress (service/ray_app.py): the body limit, strict JSON, and the /predict body.

Strict means: a JSON object or a form that names a field twice, or a field the endpoint does
not know, is refused (422, naming the field) instead of letting the last one win or ignoring
it; JSON nested deeper than the parser can follow is refused (422), not a 500. What a valid
preference is stays the core's decision (:func:`dymu.preference.canonicalize`): the values of
``r`` and ``c`` reach it as the client sent them (numbers, or the text of a form field parsed
as JSON), so the HTTP layer accepts exactly what :class:`dymu.Preference` accepts.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.types import Message

from .errors import (
    BadRequestError,
    ClientDisconnectedError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from .imaging import decode_base64
from .schemas import PredictJSON

M = TypeVar("M", bound=BaseModel)
#: A multipart /predict body holds one image file and a few short fields.
MAX_FORM_FILES = 2
MAX_FORM_FIELDS = 32
PREDICT_FIELDS = frozenset(PredictJSON.model_fields)
#: Form fields that hold a list and so may repeat (``tasks=depth&tasks=normals``, as an HTML
#: multi-select sends it); any other field given twice is refused.
LIST_FIELDS = frozenset({"tasks"})


# ------------------------------------------------------------------------------------ bodies
def check_declared_length(declared: str | None, limit: int) -> None:
    """Refuse a body by its Content-Length, before any of it is read."""
    if declared is None:
        return
    try:
        size = int(declared)
    except ValueError:
        raise BadRequestError("Content-Length is not an integer") from None
    if size > limit:
        raise too_large(size, limit)


def too_large(size: int, limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"the body has at least {size:,} bytes; the limit is {limit:,}")


async def read_limited(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """The body from ``chunks``, refused (413) as soon as it passes ``limit`` bytes."""
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise too_large(size, limit)
        parts.append(chunk)
    return b"".join(parts)


async def asgi_chunks(receive: Callable[[], Awaitable[Message]]) -> AsyncIterator[bytes]:
    """The body chunks of an ASGI request (:class:`ClientDisconnectedError` if it goes away)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnectedError("the client went away while sending the body")
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


def replayed(request: Request, body: bytes) -> Request:
    """A request over the same scope whose body is ``body`` (already read)."""

    async def receive() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(request.scope, receive)


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


# -------------------------------------------------------------------------------------- JSON
def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise BadRequestError(f"field {key!r} is given more than once")
        out[key] = value
    return out


def loads(raw: bytes | str) -> Any:
    """Strict JSON: no duplicated keys, no nesting deeper than the parser can follow."""
    try:
        return json.loads(raw, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise BadRequestError("the JSON body is nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequestError(f"the body is not valid JSON: {exc}") from exc


def validated(model: type[M], fields: Any) -> M:
    """``fields`` as ``model`` (unknown fields are refused: the schemas forbid extras)."""
    from fastapi.exceptions import RequestValidationError

    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from exc
    except RecursionError:
        raise BadRequestError("the JSON body is nested too deeply") from None


def form_value(text: str) -> Any:
    """A form field's text as the JSON value it spells ("0.5" -> 0.5, "true" -> True), else
    the text itself: the preference validator then accepts or refuses it as it would in JSON."""
    try:
        return loads(text)
    except BadRequestError:
        return text


def parse_r_text(text: str) -> Any:
    """``r`` from a form field: a JSON list or map, or comma-separated values."""
    text = text.strip()
    if text.startswith(("[", "{")):
        return loads(text)
    return [form_value(v.strip()) for v in text.split(",")]


# ----------------------------------------------------------------------------------- predict
@dataclass(frozen=True)
class PredictBody:
    """A parsed /predict body: its fields and the image (bytes, or base64 text from JSON)."""

    fields: PredictJSON
    image: bytes | str

    def image_bytes(self) -> bytes:
        return decode_base64(self.image) if isinstance(self.image, str) else self.image


def predict_json(raw: bytes) -> PredictBody:
    """A JSON /predict body (can be MBs: the server runs this on a worker thread)."""
    req = validated(PredictJSON, loads(raw))
    return PredictBody(req, req.image)


def _form_fields(items: list[tuple[str, Any]]) -> tuple[Any, dict[str, Any]]:
    image, fields, seen = None, {}, set()
    for name, value in items:
        if name not in PREDICT_FIELDS:
            raise BadRequestError(
                f"unknown form field {name!r}; the fields are {sorted(PREDICT_FIELDS)}"
            )
        if name in seen and name not in LIST_FIELDS:
            raise BadRequestError(f"form field {name!r} is given more than once")
        seen.add(name)
        if name == "image":
            image = value
        elif isinstance(value, UploadFile):
            raise BadRequestError(f"form field {name!r} must be a plain field, not a file")
        elif name in LIST_FIELDS:
            fields.setdefault(name, []).extend(t.strip() for t in value.split(","))
        elif value != "":
            fields[name] = value
    return image, fields


async def predict_form(request: Request) -> PredictBody:
    """A multipart /predict body: one ``image`` file (or text) and plain fields."""
    async with request.form(max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS) as form:
        image, fields = _form_fields(list(form.multi_items()))
        if image is None:
            raise BadRequestError("the multipart body needs an 'image' file field")
        data = await image.read() if isinstance(image, UploadFile) else image.encode()
    if "r" in fields:
        fields["r"] = parse_r_text(fields["r"])
    for name in ("c", "allow_degrade"):
        if name in fields:
            fields[name] = form_value(fields[name])
    if "budget" in fields:
        fields["budget"] = loads(fields["budget"])
    return PredictBody(validated(PredictJSON, {**fields, "image": ""}), data)


async def parse_predict(
    request: Request, off_loop: Callable[..., Awaitable[Any]] | None = None
) -> PredictBody:
    """The /predict body, multipart or JSON; ``off_loop(fn, *args)`` runs the JSON parse
    (a worker thread in the server) so that a large base64 body does not hold the loop."""
    ctype = content_type(request)
    if ctype == "multipart/form-data":
        return await predict_form(request)
    if ctype in ("application/json", ""):
        raw = await request.body()
        return await off_loop(predict_json, raw) if off_loop else predict_json(raw)
    raise UnsupportedMediaTypeError(
        f"unsupported body type {ctype!r}: send multipart/form-data or application/json"
    )
