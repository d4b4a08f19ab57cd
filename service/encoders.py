"""Fast encoders of output maps: PNG and ``.npz`` bytes written directly from numpy arrays.

PNG (:func:`png_bytes`): every row gets the PNG "Up" filter (row minus the row above, modulo 256:
one vectorized numpy subtraction, where Pillow tries filters row by row in C) and is deflated at
level 1. A class map (8-bit grey) uses zlib's run-length strategy (``Z_RLE``): its filtered rows
are long runs of zeros. Depth and normals use Huffman coding alone (``Z_HUFFMAN_ONLY``): their
filtered rows are small, varied differences with few runs, which it packs to the same size as
``Z_RLE`` in less time (the shipped model's 288x384 normals: 126.8 against 127.1 KB, 1.21
against 1.65 ms; depth: 173.5 against 172.9 KB, 0.88 against 0.93 ms). On the shipped
model's 288x384 outputs this is 3-6x faster than Pillow's ``compress_level=1`` at about the
same size (docs/benchmarks.md, "Issue 15, item 2"). Any PNG
reader decodes it: it is a standard PNG (IHDR, one IDAT, IEND). Deflate and CRC-32 come from
zlib-ng (the ``zlib-ng`` package, the stdlib zlib's API): at level 1 it deflates ~1.8x faster
and its CRC-32 is vectorized (docs/benchmarks.md, "Issue 15, item 2").

``.npz`` (:func:`npz_parts`): the archive ``numpy.savez`` writes (uncompressed ZIP of ``.npy``
members), as a list of buffers: the ZIP and ``.npy`` headers, and the arrays' own memory. The
server writes them to the socket as they are (service/responses.py); ``numpy.load`` reads the
joined bytes. :func:`read_npz` reads such an archive back (the Python client's reply) as
views of the buffer it arrived in, each member's CRC-32 checked: ``numpy.load`` goes through
``zipfile``, the stdlib's CRC-32 and two copies, 2.3 ms for a 288x384 reply of 4.4 MB against
0.3 ms (docs/service.md, "The client").
"""

from __future__ import annotations

import io
import struct
from collections.abc import Mapping

import numpy as np
from zlib_ng import zlib_ng as zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: (PNG bit depth, colour type, bytes per pixel) by (dtype, channels)
_PNG_FORMATS = {
    ("uint8", 1): (8, 0, 1),  # grayscale
    ("uint16", 1): (16, 0, 2),  # 16-bit grayscale (big-endian samples)
    ("uint8", 3): (8, 2, 3),  # RGB
}
_FILTER_UP = 2


def _chunk(tag: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(data, zlib.crc32(tag))
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)


def png_bytes(arr: np.ndarray) -> bytes:
    """uint8 (H, W) -> grayscale, uint16 (H, W) -> 16-bit grayscale, uint8 (H, W, 3) -> RGB."""
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    fmt = _PNG_FORMATS.get((arr.dtype.name, channels))
    if fmt is None:
        raise ValueError(f"no PNG format for {arr.dtype} with {channels} channels")
    depth, colour, _ = fmt
    h, w = arr.shape[:2]
    samples = arr.astype(">u2", copy=False) if depth == 16 else arr
    rows = np.ascontiguousarray(samples).view(np.uint8).reshape(h, -1)
    filtered = np.empty((h, rows.shape[1] + 1), np.uint8)
    filtered[:, 0] = _FILTER_UP
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # uint8 arithmetic wraps mod 256
    strategy = zlib.Z_RLE if (depth, colour) == (8, 0) else zlib.Z_HUFFMAN_ONLY
    deflate = zlib.compressobj(1, zlib.DEFLATED, 15, 9, strategy)
    idat = deflate.compress(filtered) + deflate.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 0)
    return b"".join(
        [PNG_SIGNATURE, _chunk(b"IHDR", ihdr), _chunk(b"IDAT", idat), _chunk(b"IEND", b"")]
    )


# ------------------------------------------------------------------------------------- npz
_LOCAL = struct.Struct("<IHHHHHIIIHH")  # ZIP local file header
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")  # ZIP central directory entry
_END = struct.Struct("<IHHHHIIH")  # end of central directory


def _npy_header(arr: np.ndarray) -> bytes:
    header = np.lib.format.header_data_from_array_1_0(arr)
    buf = _Buffer()
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.data


class _Buffer:
    """The minimal file numpy's header writer needs."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


def npz_parts(arrays: Mapping[str, np.ndarray]) -> list[bytes | memoryview]:
    """An uncompressed ``.npz`` of ``arrays`` (member ``<name>.npy`` each) as the buffers that
    ``b"".join`` makes the file of: headers, and views of the arrays' memory (C-contiguous
    arrays are not copied; the views keep them alive)."""
    chunks: list[bytes | memoryview] = []
    central: list[bytes] = []
    offset = 0
    for name, value in arrays.items():
        arr = np.asarray(value)
        if arr.dtype.hasobject:
            raise ValueError(f"{name}: object arrays cannot be written to an npz")
        arr = arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)
        header = _npy_header(arr)
        data = memoryview(arr.reshape(-1).view(np.uint8))
        crc = zlib.crc32(data, zlib.crc32(header))
        size = len(header) + data.nbytes
        if offset + size >= 2**32 - 1:
            raise ValueError("the npz reply would need ZIP64 (over 4 GiB)")
        fname = f"{name}.npy".encode()
        local = _LOCAL.pack(0x04034B50, 20, 0, 0, 0, 0x21, crc, size, size, len(fname), 0)
        fields = (0, 0, 0, 0x21, crc, size, size, len(fname), 0, 0, 0, 0, 0o600 << 16, offset)
        central.append(_CENTRAL.pack(0x02014B50, 20, 20, *fields) + fname)
        chunks += [local, fname, header, data]
        offset += len(local) + len(fname) + size
    directory = b"".join(central)
    end = _END.pack(0x06054B50, 0, 0, len(central), len(central), len(directory), offset, 0)
    return [*chunks, directory + end]


_EOCD_SIGNATURE = b"PK\x05\x06"
_STORED = 0
#: ZIP fields that mean "see the ZIP64 extra field": such members go through numpy.load.
_ZIP64 = 0xFFFFFFFF


def read_npz(buffer: bytes | bytearray | memoryview) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` (member ``<name>.npy`` -> ``name``), as :func:`numpy.load`
    reads them: uncompressed members as views of ``buffer`` (writable when ``buffer`` is), with
    their CRC-32 checked; an archive with compressed or ZIP64 members is read by
    ``numpy.load``. Raises ``ValueError`` on a truncated or corrupt archive."""
    view = memoryview(buffer).cast("B")
    members = _central_directory(view)
    if members is None:
        with np.load(io.BytesIO(view), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    out = {}
    for name, crc, size, offset in members:
        member = _member_bytes(view, name, size, offset)
        if zlib.crc32(member) != crc:
            raise ValueError(f"npz member {name!r} fails its CRC-32 check")
        out[name.removesuffix(".npy")] = _npy_array(member, name)
    return out


def _central_directory(view: memoryview) -> list[tuple[str, int, int, int]] | None:
    """(name, CRC-32, size, local header offset) per member, or None when a member is
    compressed or ZIP64 (numpy.load's business)."""
    tail = bytes(view[-(_END.size + 65_535) :])  # the end record, after at most a 64 KB comment
    at = tail.rfind(_EOCD_SIGNATURE)
    if at < 0 or len(tail) - at < _END.size:
        raise ValueError("not an npz archive (no ZIP end of central directory)")
    *_, count, dir_size, dir_offset, _ = _END.unpack_from(tail, at)
    if _ZIP64 in (dir_size, dir_offset):
        return None
    if dir_offset + dir_size > len(view) - (len(tail) - at):
        raise ValueError("truncated or corrupt npz archive (its directory lies past its end)")
    members, pos = [], dir_offset
    for _ in range(count):
        fields = _CENTRAL.unpack_from(view, pos)
        method, (crc, csize, size, nlen, xlen, clen) = fields[4], fields[7:13]
        offset = fields[16]
        if method != _STORED or _ZIP64 in (csize, size, offset):
            return None
        name = bytes(view[pos + _CENTRAL.size : pos + _CENTRAL.size + nlen]).decode()
        members.append((name, crc, size, offset))
        pos += _CENTRAL.size + nlen + xlen + clen
    return members


def _member_bytes(view: memoryview, name: str, size: int, offset: int) -> memoryview:
    if offset + _LOCAL.size > len(view):
        raise ValueError(f"npz member {name!r}: truncated archive")
    local = _LOCAL.unpack_from(view, offset)
    start = offset + _LOCAL.size + local[9] + local[10]  # after the name and the extra field
    if local[0] != 0x04034B50 or start + size > len(view):
        raise ValueError(f"npz member {name!r}: truncated or corrupt archive")
    return view[start : start + size]


def _npy_array(member: memoryview, name: str) -> np.ndarray:
    """The ``.npy`` in ``member`` as a view of it (numpy's own header parser)."""
    head = io.BytesIO(member[: 65_536 + 12])  # magic, length and a header of at most 64 KB
    version = np.lib.format.read_magic(head)
    readers = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
    }
    if version not in readers:  # format 3.0 (UTF-8 field names): numpy reads it, with a copy
        return np.lib.format.read_array(io.BytesIO(member), allow_pickle=False)
    shape, fortran, dtype = readers[version](head)
    if dtype.hasobject:
        raise ValueError(f"npz member {name!r} holds Python objects, which are not read")
    data = member[head.tell() :]
    count = int(np.prod(shape, dtype=np.int64))
    if data.nbytes != count * dtype.itemsize:
        raise ValueError(f"npz member {name!r}: {data.nbytes} bytes for shape {shape} {dtype}")
    arr = np.frombuffer(data, dtype, count)
    return arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)
