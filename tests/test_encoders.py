"""service/encoders.py: the PNGs and npz archives the service writes read back exactly."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from service.encoders import npz_parts, png_bytes, read_npz
from service.imaging import encode_npz

RNG = np.random.default_rng(0)


@pytest.mark.parametrize(
    "arr",
    [
        RNG.integers(0, 256, (7, 5), dtype=np.uint8),
        RNG.integers(0, 65536, (4, 9), dtype=np.uint16),
        RNG.integers(0, 256, (6, 3, 3), dtype=np.uint8),
        np.zeros((1, 1), np.uint8),
    ],
    ids=["gray8", "gray16", "rgb", "one-pixel"],
)
def test_png_reads_back_exactly(arr):
    img = Image.open(io.BytesIO(png_bytes(arr)))
    img.load()
    assert img.size == (arr.shape[1], arr.shape[0])
    assert np.array_equal(np.asarray(img).astype(np.int64), arr.astype(np.int64))


def test_png_refuses_other_formats():
    with pytest.raises(ValueError, match="no PNG format"):
        png_bytes(np.zeros((2, 2), np.float32))


def test_npz_reads_back_as_numpy_writes_it():
    arrays = {
        "a": RNG.standard_normal((3, 4, 5)).astype(np.float32),
        "strided": np.arange(6, dtype=np.float32)[::2],
        "empty": np.zeros((0, 3), np.float32),
        "_metrics": np.array(json.dumps({"x": 1})),
    }
    parts = npz_parts(arrays)
    views = [np.frombuffer(p, np.uint8) for p in parts if len(p)]
    assert any(np.shares_memory(v, arrays["a"]) for v in views)  # its own memory, not a copy
    data = b"".join(parts)
    assert zipfile.ZipFile(io.BytesIO(data)).testzip() is None  # every CRC checks
    with np.load(io.BytesIO(data)) as z:
        assert sorted(z.files) == sorted(arrays)
        for k, v in arrays.items():
            assert z[k].dtype == v.dtype and np.array_equal(z[k], v)


def test_encode_npz_keeps_float32_and_metrics():
    data = b"".join(encode_npz({"depth": np.ones((1, 2, 3), np.float64)}, {"model_ms": 1.5}))
    with np.load(io.BytesIO(data)) as z:
        assert z["depth"].dtype == np.float32 and z["depth"].shape == (1, 2, 3)
        assert json.loads(str(z["_metrics"])) == {"model_ms": 1.5}


def _reply_arrays() -> dict[str, np.ndarray]:
    return {
        "a": RNG.standard_normal((3, 4, 5)).astype(np.float32),
        "ints": np.arange(7, dtype=np.int16),
        "empty": np.zeros((0, 3), np.float32),
        "scalar": np.float64(2.5),
        "_metrics": np.array(json.dumps({"x": 1})),
    }


def test_read_npz_views_the_buffer_it_is_given():
    arrays = _reply_arrays()
    buffer = bytearray(b"".join(npz_parts(arrays)))
    out = read_npz(buffer)
    assert sorted(out) == sorted(arrays)
    for k, v in arrays.items():
        assert out[k].dtype == v.dtype and out[k].shape == np.shape(v)
        assert np.array_equal(out[k], v)
    assert np.shares_memory(out["a"], np.frombuffer(buffer, np.uint8))  # no copy
    assert out["a"].flags.writeable  # a bytearray's views are, as numpy.load's arrays
    assert not read_npz(bytes(buffer))["a"].flags.writeable


def test_read_npz_reads_what_numpy_writes():
    fortran = np.asfortranarray(RNG.standard_normal((3, 4)))
    buf = io.BytesIO()
    np.savez(buf, fortran=fortran, flags=np.array([True, False]), zero_d=np.int32(7))
    out = read_npz(buf.getvalue())
    assert out["fortran"].flags.f_contiguous and np.array_equal(out["fortran"], fortran)
    assert out["flags"].tolist() == [True, False] and out["zero_d"] == 7
    buf = io.BytesIO()
    np.savez_compressed(buf, x=np.arange(10))  # deflated members: read by numpy.load
    assert read_npz(buf.getvalue())["x"].tolist() == list(range(10))


def test_read_npz_refuses_corrupt_and_truncated_archives():
    arrays = _reply_arrays()
    data = bytearray(b"".join(npz_parts(arrays)))
    at = data.find(arrays["a"].tobytes()[:16])
    flipped = bytearray(data)
    flipped[at + 5] ^= 0xFF
    with pytest.raises(ValueError, match=r"'a\.npy' fails its CRC-32"):
        read_npz(flipped)
    with pytest.raises(ValueError, match="no ZIP end of central directory"):
        read_npz(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        read_npz(data[200:])  # the directory's offsets now point past the data


@pytest.mark.parametrize("declared", ["exact", "short", "long", "none"])
def test_the_client_gathers_an_npz_reply_whatever_length_it_declares(declared):
    import httpx

    from service.client import _gather, _npz_buffer

    arrays = _reply_arrays()
    data = b"".join(npz_parts(arrays))
    length = {"exact": len(data), "short": 100, "long": len(data) + 999, "none": None}[declared]
    headers = {"content-type": "application/x-npz"}
    if length is not None:
        headers["content-length"] = str(length)
    body = _npz_buffer(httpx.Response(200, headers=headers))
    assert len(body) == (length or 0)
    got = 0
    for start in range(0, len(data), 4096):  # as chunks arrive
        got = _gather(body, got, data[start : start + 4096])
    del body[got:]
    assert bytes(body) == data
    assert np.array_equal(read_npz(body)["a"], arrays["a"])
    assert _npz_buffer(httpx.Response(500, headers=headers)) is None
    assert _npz_buffer(httpx.Response(200, headers={"content-type": "application/json"})) is None
