"""A response whose body is a list of buffers, written to the socket as they are.

A binary reply (the Open Inference Protocol's binary tensors; an ``.npz`` of a 288x384
prediction is 4.4 MB) is a few headers and the model's output arrays. Joined into one
``bytes``, the arrays were copied into a freshly mapped block first; sent as parts, large
buffers go to uvicorn as ``http.response.body`` messages of their own and the kernel copies
them from the arrays' memory (docs/service.md, "Where the time goes"). The ``Content-Length``
is the parts' total, so the reply on the wire is unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from starlette.background import BackgroundTask
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

Part = bytes | memoryview

#: Parts smaller than this are joined with their neighbours: each part is one message through
#: the middleware and one transport write, ~10-20 us, more than copying a few KB.
SMALL_PART = 65_536


def merged(parts: Sequence[Part]) -> list[Part]:
    """``parts`` with runs of small ones joined (empty ones dropped); large ones as they are."""
    out: list[Part] = []
    run: list[Part] = []
    for part in parts:
        if len(part) >= SMALL_PART:
            if run:
                out.append(b"".join(run))
                run = []
            out.append(part)
        elif len(part):
            run.append(part)
    if run:
        out.append(b"".join(run))
    return out


class PartsResponse(Response):
    """``Response(b"".join(parts))``, byte for byte, without the join."""

    def __init__(
        self,
        parts: Sequence[Part],
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        media_type: str | None = None,
        background: BackgroundTask | None = None,
    ) -> None:
        self.parts = merged(parts)
        super().__init__(None, status_code, headers, media_type, background)
        length = str(sum(len(p) for p in self.parts)).encode("latin-1")
        self.raw_headers = [
            (k, length if k == b"content-length" else v) for k, v in self.raw_headers
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = {"type": "http.response.start", "status": self.status_code}
        await send({**start, "headers": self.raw_headers})
        last = len(self.parts) - 1
        for i, part in enumerate(self.parts):
            await send({"type": "http.response.body", "body": part, "more_body": i < last})
        if not self.parts:
            await send({"type": "http.response.body", "body": b""})
        if self.background is not None:
            await self.background()
