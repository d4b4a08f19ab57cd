"""``nyuv2``: NYU-v2 (Silberman et al. 2012) in the common preprocessed layout of MTAN.

13-class semantic segmentation, surface normals and depth, read from ``<root>/train`` and
``<root>/val`` (795 and 654 images at 288x384 in the usual preprocessing) in the per-sample
``.npy`` layout of :mod:`training.data.npy_split`. Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from dymu.config import TaskSpec

from .base import IMAGENET_MEAN, IMAGENET_STD, DatasetError, Sample
from .npy_split import LAYOUT, NpySplitDataset

#: The 13 classes of Couprie et al. (2013), in label order (label -1: unlabeled).
NYU13_CLASSES: tuple[str, ...] = (
    "bed", "books", "ceiling", "chair", "floor", "furniture", "objects",
    "painting", "sofa", "table", "tv", "wall", "window",
)  # fmt: skip
SPLITS: dict[str, str] = {"train": "train", "val": "val", "test": "val"}


def nyuv2_tasks() -> tuple[TaskSpec, ...]:
    """Segmentation (13 classes), normals, depth, in the paper's order (T1, T2, T3; App. I)
    with its loss scales (App. G): seg 1, normals 10, depth 3."""
    return (
        TaskSpec(name="segmentation", kind="segmentation", classes=13, loss_scale=1.0),
        TaskSpec(name="normals", kind="normals", loss_scale=10.0),
        TaskSpec(name="depth", kind="depth", loss_scale=3.0),
    )


def split_dir(root: str | Path | None, split: str, name: str, layout: str) -> Path:
    """``<root>/<split folder>``, or a :class:`DatasetError` naming ``layout``."""
    if split not in SPLITS:
        raise DatasetError(f"{name} has splits train and val (test = val), not {split!r}")
    if root is None:
        raise DatasetError(f"{name} needs root=<dir> holding {layout}")
    return Path(root).expanduser() / SPLITS[split]


def build_nyuv2(
    split: str,
    root: str | Path | None = None,
    *,
    size: Sequence[int] | None = None,
    transform: Callable[[Sample], Sample] | None = None,
) -> NpySplitDataset:
    """The NYU-v2 split ``split`` under ``root``; ``size = (H, W)`` resizes on load (image
    bilinear, targets nearest). Images are normalized with ImageNet statistics."""
    d = split_dir(root, split, "nyuv2", LAYOUT)
    return NpySplitDataset(
        d,
        nyuv2_tasks(),
        layout=LAYOUT,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        size=size,
        transform=transform,
    )
