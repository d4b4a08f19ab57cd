"""dymu's benchmarks (docs/design.md §6), all returning :class:`MultiTaskDataset` samples.

============== ========================================= ======================================
name           tasks (loss scale, App. G)                data
============== ========================================= ======================================
scenes         segmentation 6 (1), depth (3), normals    rendered in memory, or read from a
               (10)                                      split written by ``dymu data scenes``
multidigits    left (1), right (1): 10-way each          scikit-learn's bundled digits
nyuv2          segmentation 13 (1), normals (10),        ``<root>/{train,val}``, MTAN layout
               depth (3)
pascal-context semseg 21 (1), human_parts 7 (2), sal     ``<root>``, PASCAL_MT layout
               (5) [+ normals (10), edge (50)]
cifar100-20    20 five-way tasks (1 each)                ``<root>/cifar-100-python``
============== ========================================= ======================================

Nothing downloads: a missing dataset raises :class:`DatasetError` naming the expected layout.

    >>> ds = build_dataset("scenes", "train", n=8)
    >>> sample = ds[0]                  # {"image": (3, 96, 128), "segmentation": (96, 128), ...}
    >>> dataset_tasks("pascal-context", tasks=3)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dymu.config import TaskSpec
from dymu.errors import ConfigError

from ..config import TrainConfig
from . import cifar, multidigits, npy_split, nyuv2, pascal, scenes
from .base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ArrayDataset,
    DatasetError,
    MultiTaskDataset,
    collate,
    resize_sample,
    to_sample,
)
from .npy_split import NpySplitDataset, read_meta, write_split
from .scenes import SCENE_CLASSES, render_scenes, scenes_tasks


@dataclass(frozen=True)
class DatasetEntry:
    """One registered benchmark: how to build it, its tasks, its splits and its layout."""

    name: str
    build: Callable[..., MultiTaskDataset]
    tasks: Callable[..., tuple[TaskSpec, ...]]
    splits: tuple[str, ...]
    layout: str
    description: str
    needs_root: bool

    @property
    def options(self) -> tuple[str, ...]:
        """The keyword options ``build`` takes (besides split and root)."""
        params = inspect.signature(self.build).parameters.values()
        return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


DATASETS: dict[str, DatasetEntry] = {
    e.name: e
    for e in (
        DatasetEntry(
            "scenes",
            scenes.build_scenes,
            scenes.scenes_dataset_tasks,
            ("train", "val"),
            scenes.LAYOUT,
            "procedurally rendered 3-D scenes: segmentation, depth, normals",
            needs_root=False,
        ),
        DatasetEntry(
            "multidigits",
            multidigits.build_multidigits,
            lambda **_: multidigits.multidigits_tasks(),
            ("train", "test"),
            "none (scikit-learn's bundled digits)",
            "MultiMNIST-style digit pairs: left, right",
            needs_root=False,
        ),
        DatasetEntry(
            "nyuv2",
            nyuv2.build_nyuv2,
            lambda **_: nyuv2.nyuv2_tasks(),
            ("train", "val"),
            npy_split.LAYOUT,
            "NYU-v2, 13 classes: segmentation, normals, depth",
            needs_root=True,
        ),
        DatasetEntry(
            "pascal-context",
            pascal.build_pascal,
            lambda tasks=5, **_: pascal.pascal_tasks(tasks),
            ("train", "val"),
            pascal.LAYOUT,
            "PASCAL-Context: semseg, human parts, saliency (+ normals, edges with tasks=5)",
            needs_root=True,
        ),
        DatasetEntry(
            "cifar100-20",
            cifar.build_cifar,
            lambda root=None, **_: cifar.cifar_tasks(root),
            ("train", "test"),
            cifar.LAYOUT,
            "CIFAR-100 as 20 five-way tasks",
            needs_root=True,
        ),
    )
}
#: Other accepted spellings.
ALIASES: dict[str, str] = {"pascal": "pascal-context", "cifar100": "cifar100-20", "nyu": "nyuv2"}


def get_entry(name: str) -> DatasetEntry:
    """The registry entry of ``name`` (or an alias), or a :class:`DatasetError`."""
    key = ALIASES.get(name, name)
    if key not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")
    return DATASETS[key]


def _check_options(entry: DatasetEntry, options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - set(entry.options))
    if unknown:
        raise DatasetError(
            f"{entry.name} takes no option {', '.join(unknown)}; "
            f"options: {', '.join(entry.options) or 'none'}"
        )


def build_dataset(
    name: str, split: str, root: str | Path | None = None, **options: Any
) -> MultiTaskDataset:
    """The ``split`` of benchmark ``name`` (see :data:`DATASETS`), from ``root`` for the
    datasets on disk. Options per dataset: ``DATASETS[name].options``."""
    entry = get_entry(name)
    _check_options(entry, options)
    if entry.needs_root and root is None:
        raise DatasetError(
            f"{entry.name} is read from disk: pass root=<dir> holding {entry.layout}"
        )
    if root is not None and entry.needs_root and not Path(root).expanduser().is_dir():
        raise DatasetError(f"no {entry.name} dataset at {root}; expected layout: {entry.layout}")
    return entry.build(split, root, **options)


def dataset_tasks(
    name: str, root: str | Path | None = None, **options: Any
) -> tuple[TaskSpec, ...]:
    """The tasks of ``name`` with the paper's loss scales, without loading any data (``root``
    matters only where the tasks depend on the files: scenes' class count, CIFAR's names)."""
    entry = get_entry(name)
    _check_options(entry, options)
    return entry.tasks(root=root, **options)


def split_dataset(
    config: TrainConfig, held_out: bool = False, calibration: bool = False
) -> MultiTaskDataset:
    """The training split (``data.options``), the held-out one (``data.val_options``) or the
    calibration split (``data.calibration_options``: the training source, images no stage
    trains on; docs/training.md, "The calibration split")."""
    entry = DATASETS.get(config.data.name)
    if entry is None:
        raise ConfigError(f"unknown dataset {config.data.name!r}; known: {sorted(DATASETS)}")
    if calibration and config.data.calibration_options is None:
        raise ConfigError("this config has no [data] calibration_options")
    if held_out:
        options = dict(config.data.val_options)
    else:
        options = dict(config.data.calibration_options if calibration else config.data.options)
    if not entry.needs_root and config.data.root is None and "size" in entry.options:
        options.setdefault("size", tuple(config.input_size))
    split = entry.splits[-1] if held_out else entry.splits[0]
    return build_dataset(config.data.name, split, config.data.root, **options)


__all__ = [
    "ALIASES",
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SCENE_CLASSES",
    "ArrayDataset",
    "DatasetEntry",
    "DatasetError",
    "MultiTaskDataset",
    "NpySplitDataset",
    "build_dataset",
    "collate",
    "dataset_tasks",
    "get_entry",
    "read_meta",
    "render_scenes",
    "resize_sample",
    "scenes_tasks",
    "split_dataset",
    "to_sample",
    "write_split",
]
