"""Images in, maps out: decoding with limits, input normalization, and output encodings.

Decoding never trusts the client: the format is sniffed from the bytes (PNG, JPEG, or raw
pixels as a NumPy ``.npy`` of uint8, (H, W, 3) or (H, W); anything else is 415), the pixel
count is checked from the header *before* the pixels are decoded (a decompression bomb is 413
without being inflated) and a truncated or corrupt file is 422. Raw pixels skip the decode
(2 ms for a 288x384 PNG, docs/service.md) for clients that hold frames already decoded.

Outputs are never JSON lists of floats: dense maps are PNGs (segmentation: class-index PNG,
8-bit up to 256 classes else 16-bit; depth: 16-bit PNG with ``depth = offset + value *
scale``; normals: RGB PNG with ``n = value / 255 * 2 - 1``) or float32 arrays in an ``.npz``.
"""

from __future__ import annotations

import base64
import io
import json
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

try:  # libspng's decoder: 8-bit PNGs in about half Pillow's time (docs/service.md)
    import pyspng
except ImportError:  # pragma: no cover - a serving install has it; Pillow decodes alone
    pyspng = None

from dymu.normalization import DATASET_NORMALIZATION, IMAGENET

from .encoders import npz_parts, png_bytes
from .errors import BadImageError, PayloadTooLargeError, UnsupportedMediaTypeError

# Our own pixel limit is checked before decoding; PIL's global bomb check would only warn.
Image.MAX_IMAGE_PIXELS = None

ACCEPTED_FORMATS = ("PNG", "JPEG")
NPY_MAGIC = b"\x93NUMPY"


def normalization_for(
    manifest: Mapping[str, Any],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """(mean, std, where it came from) for a model: the settings, else the manifest's
    ``input_normalization``, else its dataset's, else ImageNet's."""
    if mean is not None and std is not None:
        return tuple(mean), tuple(std), "settings"
    recorded = manifest.get("input_normalization")
    if recorded:
        return (tuple(mean or recorded["mean"]), tuple(std or recorded["std"]), "manifest")
    data = (manifest.get("training") or {}).get("data") or {}
    name = str(data.get("name") or "")
    found = DATASET_NORMALIZATION.get(name)
    source = f"dataset {name}" if found else "ImageNet (default)"
    m, s = found or IMAGENET
    return tuple(mean or m), tuple(std or s), source


def declared_pixels(data: bytes) -> int | None:
    """Width x height from a PNG/JPEG/NPY header, without decoding; None when it cannot be read
    (the decoder then says why). A few KB of PNG can declare millions of pixels."""
    if data.startswith(NPY_MAGIC):
        try:
            h, w = _npy_header(data)[0][:2]
        except BadImageError:
            return None
        return h * w
    try:
        w, h = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS).size
    except Exception:
        return None
    return w * h


def decode_image(data: bytes, max_pixels: int, min_side: int = 1) -> np.ndarray:
    """PNG/JPEG/NPY bytes -> uint8 RGB array (H, W, 3), enforcing the limits."""
    if not data:
        raise BadImageError("the image is empty (0 bytes)")
    if data.startswith(NPY_MAGIC):
        return _npy_rgb(data, max_pixels, min_side)
    try:
        img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError as exc:
        raise UnsupportedMediaTypeError(
            "the image is not a PNG, JPEG or NPY file (those are the formats accepted)"
        ) from exc
    except Image.DecompressionBombError as exc:  # pragma: no cover - limit disabled above
        raise PayloadTooLargeError(str(exc)) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImageError(f"cannot read the image header: {exc}") from exc
    w, h = img.size
    _check_size(w, h, max_pixels, min_side)
    fast = _spng_rgb(data, (h, w))  # before Pillow's load: one decoder decodes, not two
    if fast is not None:
        return fast
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
                arr = np.asarray(img, dtype=np.float64)
                top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
                arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
                return np.repeat(arr[:, :, None], 3, axis=2)
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        raise BadImageError(f"cannot decode the {img.format} image: {exc}") from exc


def _check_size(w: int, h: int, max_pixels: int, min_side: int) -> None:
    if w * h > max_pixels:
        raise PayloadTooLargeError(
            f"the image has {w}x{h} = {w * h:,} pixels; the limit is {max_pixels:,}"
        )
    if min(w, h) < min_side:
        raise BadImageError(f"the image is {w}x{h}; both sides must be at least {min_side} pixels")


def _npy_header(data: bytes) -> tuple[tuple[int, ...], bool, int]:
    """(shape, Fortran order, offset of the pixels) of a ``.npy`` image: uint8, (H, W, 3) or
    (H, W).

    NumPy's own header reader (a Python literal, never a pickle); anything else is 422 with the
    reason, before a pixel is read.
    """
    f = io.BytesIO(data)
    readers = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
    }
    try:
        version = np.lib.format.read_magic(f)
        if version not in readers:
            raise ValueError(f"NPY format version {version[0]}.{version[1]} (1.0 and 2.0 are read)")
        shape, fortran, dtype = readers[version](f)
    except (ValueError, SyntaxError, TypeError, EOFError) as exc:
        raise BadImageError(f"cannot read the NPY header: {exc}") from exc
    if dtype != np.uint8:
        raise BadImageError(f"an NPY image must be uint8; got {dtype}")
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] != 3):
        raise BadImageError(f"an NPY image must have shape (H, W, 3) or (H, W); got {shape}")
    return shape, fortran, f.tell()


def _npy_rgb(data: bytes, max_pixels: int, min_side: int) -> np.ndarray:
    shape, fortran, offset = _npy_header(data)
    h, w = shape[:2]
    _check_size(w, h, max_pixels, min_side)
    size = int(np.prod(shape))
    if len(data) - offset != size:
        raise BadImageError(
            f"the NPY image declares {shape} ({size:,} bytes of pixels) but holds "
            f"{len(data) - offset:,}"
        )
    pixels = np.frombuffer(data, np.uint8, size, offset).reshape(
        shape, order="F" if fortran else "C"
    )
    return pixels if pixels.ndim == 3 else np.repeat(pixels[:, :, None], 3, axis=2)


def _spng_rgb(data: bytes, hw: tuple[int, int]) -> np.ndarray | None:
    """An 8-bit PNG (grey, RGB, palette, with or without alpha) decoded by libspng to the same
    RGB bytes as Pillow's ``convert("RGB")`` (alpha dropped, palette expanded); None for any
    other file or when libspng refuses it, so that Pillow decodes it or says why."""
    # IHDR is the first chunk (the signature is 8 bytes, then length and tag): byte 24 is the
    # bit depth. Other depths are scaled differently by the two decoders, so they go to Pillow.
    if pyspng is None or len(data) < 26 or data[12:16] != b"IHDR" or data[24] != 8:
        return None
    try:
        rgb = pyspng.load(data, format="RGB")
    except Exception:
        return None
    return rgb if rgb.shape == (*hw, 3) and rgb.dtype == np.uint8 else None


def decode_base64(text: str) -> bytes:
    try:
        if text.startswith("data:") and "," in text:  # a data URL
            text = text.split(",", 1)[1]
        return base64.b64decode(text, validate=True)
    except (ValueError, TypeError) as exc:
        raise BadImageError(f"the image field is not valid base64: {exc}") from exc


def to_tensor(rgb: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (H, W, 3) -> normalized float32 (3, H, W): ``(rgb / 255 - mean) / std``.

    In numpy, single-threaded: torch's intra-op threads would compete with inference.
    """
    m = np.asarray(mean, dtype=np.float32) * 255.0
    s = np.asarray(std, dtype=np.float32) * 255.0
    chw = np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32)
    chw -= m[:, None, None]
    chw /= s[:, None, None]
    return torch.from_numpy(chw)


# ----------------------------------------------------------------------------------- outputs
def _png(arr: np.ndarray) -> str:
    """uint8 (H, W) -> L, uint16 (H, W) -> I;16, uint8 (H, W, 3) -> RGB (service/encoders.py)."""
    return base64.b64encode(png_bytes(arr)).decode("ascii")


def class_map(logits: np.ndarray) -> np.ndarray:
    """(C, H, W) logits -> (H, W) index of the largest, first on ties (``argmax(axis=0)``), as
    uint8 up to 256 classes, else uint16.

    One pass per class over contiguous planes, all in vectorized ufuncs: numpy's
    ``argmax(axis=0)`` walks the class axis with a stride of H*W, and at 288x384 with 6 classes
    takes ~15x as long.
    """
    n = logits.shape[0]
    labels = np.zeros(logits.shape[1:], np.uint8 if n <= 256 else np.uint16)
    best = logits[0].copy()
    leads = np.empty(logits.shape[1:], bool)
    step = np.empty_like(labels)
    for k in range(1, n):
        np.greater(logits[k], best, out=leads)  # strictly: a tie keeps the earlier class
        np.maximum(best, logits[k], out=best)
        np.multiply(leads, labels.dtype.type(k), out=step)  # k where class k now leads, else 0
        np.maximum(labels, step, out=labels)  # k is above every earlier label
    return labels


def encode_task(kind: str, out: np.ndarray, classes: int | None) -> dict[str, Any]:
    """One task's output (one image, no batch axis) as a JSON-ready record with PNGs."""
    if kind == "segmentation":
        labels, n = class_map(out), out.shape[0]
        png, bits = _png(labels), 8 * labels.itemsize
        return {
            "kind": kind,
            "encoding": f"png: class index per pixel ({bits}-bit grayscale)",
            "shape": list(labels.shape),
            "classes": n,
            "png": png,
        }
    if kind == "depth":
        d = out[0]
        lo, hi = float(np.nanmin(d)), float(np.nanmax(d))
        scale = (hi - lo) / 65535.0 if hi > lo else 1.0
        q = d - np.float32(lo)  # then in place: no temporaries of the map's size
        q *= np.float32(1.0 / scale)
        q += np.float32(0.5)
        q = np.clip(np.nan_to_num(q, copy=False), 0, 65535, out=q).astype(np.uint16)
        return {
            "kind": kind,
            "encoding": "png: 16-bit grayscale; depth = offset + value * scale",
            "shape": list(q.shape),
            "scale": scale,
            "offset": lo,
            "png": _png(q),
        }
    if kind == "normals":
        n = out * np.float32(127.5)  # round((n + 1) * 127.5), in place after the first op
        n += np.float32(128.0)
        n = np.clip(np.nan_to_num(n, copy=False), 0, 255, out=n)
        n = np.ascontiguousarray(n.astype(np.uint8).transpose(1, 2, 0))
        return {
            "kind": kind,
            "encoding": "png: RGB; normal = value / 255 * 2 - 1",
            "shape": list(n.shape[:2]),
            "png": _png(n),
        }
    # classification: K logits -> the label and its probabilities (K numbers, not a map)
    logits = out.astype(np.float64).reshape(-1)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    return {
        "kind": kind,
        "encoding": "label and class probabilities",
        "label": int(p.argmax()),
        "probabilities": [round(float(v), 6) for v in p],
        "classes": classes or len(p),
    }


def encode_npz(
    outputs: Mapping[str, np.ndarray], metrics: Mapping[str, Any]
) -> list[bytes | memoryview]:
    """Float32 arrays per task (no batch axis) and the metrics as a JSON string ``_metrics``:
    the ``.npz``'s buffers (``b"".join`` them for the file; the server sends them as they are)."""
    arrays = {k: np.asarray(v, dtype=np.float32) for k, v in outputs.items()}
    return npz_parts({**arrays, "_metrics": np.array(json.dumps(dict(metrics)))})
