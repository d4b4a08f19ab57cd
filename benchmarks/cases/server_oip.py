"""The Open Inference Protocol variant of the server case (benchmarks/cases/server.py).

One request = ``POST /v2/models/{model}/infer`` with the binary tensor data extension: the
image goes as raw UINT8 pixels ``[1, H, W, 3]`` after the JSON header and every output comes
back as raw FP32 bytes (what a Triton/KServe client sends and receives), against /predict's
multipart upload of a PNG with an npz reply. The server's own times come from the reply's
parameters (``total_ms``, ``model_ms``, ``backend``).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable

import httpx
import numpy as np

from ..lean_http import OIP_HEADER_LENGTH, oip_call


def read_reply(reply: httpx.Response) -> tuple[dict, dict[str, np.ndarray]]:
    """(the JSON header, the outputs as arrays) of a binary infer reply."""
    n = int(reply.headers[OIP_HEADER_LENGTH])
    header = json.loads(reply.content[:n])
    arrays, pos = {}, n
    for out in header["outputs"]:
        size = out["parameters"]["binary_data_size"]
        data = np.frombuffer(reply.content[pos : pos + size], "<f4")
        arrays[out["name"]] = data.reshape(out["shape"])
        pos += size
    return header, arrays


def oip_variant(
    url: str, png: bytes, preference_id: str, log: list[tuple[float, float, str]]
) -> Callable[[], None]:
    """A timed call for ``interleave``; each call appends (total ms, model ms, backend)."""
    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    model = httpx.get(f"{url}/v1/model", timeout=60).json()["name"]
    client = httpx.Client(base_url=url, timeout=120)
    request = oip_call(model, rgb, preference_id)

    def call() -> None:
        reply = client.post(request.path, content=request.body, headers=request.headers)
        reply.raise_for_status()
        params, _ = read_reply(reply)
        p = params["parameters"]
        log.append((p["total_ms"], p["model_ms"], p["backend"]))

    return call
