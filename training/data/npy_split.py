"""The per-sample ``.npy`` layout of preprocessed NYU-v2 (MTAN, Liu et al. 2019), read and written.

One split is one folder::

    <split_dir>/image/<i>.npy    (H, W, 3) float32, RGB in [0, 1]
    <split_dir>/label/<i>.npy    (H, W)    float, class index, -1 = unlabeled
    <split_dir>/depth/<i>.npy    (H, W, 1) float32, metres, 0 = invalid
    <split_dir>/normal/<i>.npy   (H, W, 3) float32, unit normals, 0 = invalid
    <split_dir>/meta.json        optional: generator, seed, n, size, classes

with ``i = 0 .. n-1``. The ``nyuv2`` loader reads ``<root>/train`` and ``<root>/val``; the
``scenes`` generator writes this layout (:func:`write_split`) and reads it back through the
same :class:`NpySplitDataset`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dymu.config import TaskSpec

from .base import DatasetError, MultiTaskDataset, RawSample

#: Folder of each dense task kind in this layout.
KIND_FOLDERS: dict[str, str] = {"segmentation": "label", "depth": "depth", "normals": "normal"}
META_FILE = "meta.json"

LAYOUT = (
    "<root>/{train,val}/image/<i>.npy (H,W,3 float in [0,1]), <root>/{train,val}/label/<i>.npy "
    "(H,W, -1 = unlabeled), <root>/{train,val}/depth/<i>.npy (H,W,1, 0 = invalid), "
    "<root>/{train,val}/normal/<i>.npy (H,W,3) — the preprocessed NYU-v2 layout of MTAN"
)


def _indices(folder: Path) -> list[int]:
    out = []
    for f in folder.glob("*.npy"):
        if f.stem.isdigit():
            out.append(int(f.stem))
    return sorted(out)


def read_meta(split_dir: str | Path) -> dict[str, Any]:
    """The split's ``meta.json`` as a dict (empty if there is none)."""
    f = Path(split_dir) / META_FILE
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"unreadable {f}: {exc}") from exc


class NpySplitDataset(MultiTaskDataset):
    """One split in the MTAN ``.npy`` layout, read lazily one sample at a time.

    Segmentation labels: -1 (and anything negative, non-finite or ``>= classes``) becomes the
    task's ``ignore_index``. Depth: non-finite or non-positive values become 0. Normals are
    renormalized to unit length; zero vectors stay 0 (invalid).
    """

    def __init__(
        self,
        split_dir: str | Path,
        tasks: Sequence[TaskSpec],
        *,
        layout: str = LAYOUT,
        **kwargs: Any,
    ) -> None:
        super().__init__(tasks, **kwargs)
        self.split_dir = Path(split_dir)
        for t in self.tasks:
            if t.kind not in KIND_FOLDERS:
                raise DatasetError(f"task {t.name!r} of kind {t.kind} has no folder in this layout")
        folders = ["image", *(KIND_FOLDERS[t.kind] for t in self.tasks)]
        missing = [f for f in folders if not (self.split_dir / f).is_dir()]
        if missing:
            raise DatasetError(
                f"no dataset at {self.split_dir} (missing {', '.join(m + '/' for m in missing)}); "
                f"expected layout: {layout}"
            )
        self.indices = _indices(self.split_dir / "image")
        if not self.indices:
            raise DatasetError(
                f"no samples in {self.split_dir / 'image'}; expected layout: {layout}"
            )
        have = set(self.indices)
        for f in folders[1:]:
            lacking = have - set(_indices(self.split_dir / f))
            if lacking:
                raise DatasetError(
                    f"{self.split_dir / f} lacks {len(lacking)} of the {len(have)} samples "
                    f"(e.g. {min(lacking)}.npy); expected layout: {layout}"
                )
        self.meta = read_meta(self.split_dir)

    def __len__(self) -> int:
        return len(self.indices)

    def raw(self, i: int) -> RawSample:
        k = self.indices[i]
        image = np.load(self.split_dir / "image" / f"{k}.npy")
        if image.dtype == np.uint8:
            image = image.astype(np.float32) / 255.0
        out: RawSample = {"image": image.astype(np.float32, copy=False)}
        for t in self.tasks:
            y = np.load(self.split_dir / KIND_FOLDERS[t.kind] / f"{k}.npy")
            if t.kind == "segmentation":
                y = y.reshape(y.shape[:2]).astype(np.float64)
                bad = ~np.isfinite(y) | (y < 0) | (y >= (t.classes or 0))
                y = np.where(bad, t.ignore_index if t.ignore_index is not None else -1, y)
                y = y.astype(np.int64)
            out[t.name] = y
        return out


def prepare_split_dir(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Make ``out_dir`` ready for a new split: refuse one that already holds samples unless
    ``overwrite``, which removes the old ``<i>.npy`` files (and ``meta.json``) first."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out} exists and is not a folder")
    if (out / "image").is_dir() and _indices(out / "image"):
        if not overwrite:
            raise DatasetError(f"{out} already holds a split; pass overwrite=True (--overwrite)")
        for key in ("image", "label", "depth", "normal"):
            if (out / key).is_dir():
                for f in (out / key).glob("*.npy"):
                    f.unlink()
        (out / META_FILE).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_samples(
    arrays: Mapping[str, np.ndarray],
    out_dir: str | Path,
    start: int = 0,
    *,
    ignore_index: int = 255,
) -> int:
    """Write samples ``start, start + 1, ...`` of ``arrays`` (``image`` (n,H,W,3) in [0, 1];
    optional ``label`` (n,H,W), ``depth`` (n,H,W) or (n,H,W,1), ``normal`` (n,H,W,3)) into
    ``out_dir`` in the MTAN layout; labels equal to ``ignore_index`` become -1. Returns n."""
    out = Path(out_dir)
    if "image" not in arrays:
        raise DatasetError("writing a split needs an 'image' array")
    images = np.asarray(arrays["image"])
    n = len(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise DatasetError(f"image must be (n, H, W, 3), got {images.shape}")
    folders = {"image": images}
    for key in ("label", "depth", "normal"):
        if key in arrays:
            arr = np.asarray(arrays[key])
            if len(arr) != n or arr.shape[1:3] != images.shape[1:3]:
                raise DatasetError(f"{key} has shape {arr.shape}, images {images.shape}")
            folders[key] = arr
    for key in folders:
        (out / key).mkdir(parents=True, exist_ok=True)
    for j in range(n):
        i = start + j
        np.save(out / "image" / f"{i}.npy", images[j].astype(np.float32, copy=False))
        if "label" in folders:
            lab = folders["label"][j].astype(np.float32)
            lab[folders["label"][j] == ignore_index] = -1.0
            np.save(out / "label" / f"{i}.npy", lab)
        if "depth" in folders:
            d = folders["depth"][j].astype(np.float32, copy=False)
            np.save(out / "depth" / f"{i}.npy", d.reshape(*d.shape[:2], 1))
        if "normal" in folders:
            np.save(
                out / "normal" / f"{i}.npy", folders["normal"][j].astype(np.float32, copy=False)
            )
    return n


def write_meta(out_dir: str | Path, meta: Mapping[str, Any]) -> Path:
    """Write ``meta.json`` (``format`` set to ``mtan-npy`` unless given)."""
    f = Path(out_dir) / META_FILE
    f.write_text(json.dumps({"format": "mtan-npy", **dict(meta)}, indent=2) + "\n")
    return f


def write_split(
    arrays: Mapping[str, np.ndarray],
    out_dir: str | Path,
    meta: Mapping[str, Any] | None = None,
    *,
    overwrite: bool = False,
    ignore_index: int = 255,
) -> Path:
    """Write ``arrays`` (see :func:`write_samples`) as one split in ``out_dir``: the per-sample
    ``.npy`` files and ``meta.json`` (``n`` and ``size`` filled in, then ``meta``, e.g.
    generator, seed, classes). Refuses a folder that already holds samples unless
    ``overwrite``. Returns ``out_dir``."""
    out = prepare_split_dir(out_dir, overwrite)
    n = write_samples(arrays, out, 0, ignore_index=ignore_index)
    size = list(np.asarray(arrays["image"]).shape[1:3])
    write_meta(out, {"n": n, "size": size, **dict(meta or {})})
    return out
